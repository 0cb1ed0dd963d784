//! The bin-manager client: the protocol's five calls, the batched check and the downloads, all
//! through the agent's one HTTP client ([`crate::agent::http`]), with
//! timeouts, a bearer token sent only to the configured API and download
//! origins (never to a proxy), JSON answers capped at 1 MiB, and downloads
//! streamed to a sink with their length checked.

use crate::agent::http::{self, proxy::Proxies, Method};
use crate::error::{Error, Result};
use crate::json::Value;
use crate::protocol::{self, BinInfo, Registration};
use std::io::Read;
use std::time::{Duration, Instant};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = http::MAX_REDIRECTS;
/// Largest JSON answer read.
pub const MAX_JSON: usize = 1 << 20;
/// Download read size (also the block size handed to the hashers).
pub const CHUNK: usize = 128 * 1024;

/// What `POST check` answered.
#[derive(Debug)]
pub enum Checked {
    /// `200`: the answer's `data`, and its `ETag` (if any).
    Answer {
        /// The answer's `ETag`.
        etag: Option<String>,
        /// The answer's `data`.
        data: Value,
    },
    /// `304 Not Modified`: the answer held is still the answer.
    NotModified,
    /// `404`/`405`: a server without the batched check.
    Unsupported,
}

/// Where an interrupted download goes on: the bytes already on disk and
/// the validator they were received under.
#[derive(Clone, Debug)]
pub struct From {
    /// Bytes on disk.
    pub offset: u64,
    /// The `ETag` they came with (a strong one: only those resume).
    pub etag: String,
    /// The whole file's length, as announced then.
    pub total: Option<u64>,
}

/// How an answer continues the file, told before its first block.
#[derive(Clone, Debug, PartialEq)]
pub struct Begin {
    /// The blocks go at this offset: 0 starts the file over (truncate it),
    /// else it is the resume point asked for.
    pub offset: u64,
    /// The whole file's length, when announced.
    pub total: Option<u64>,
    /// The answer's strong `ETag`: without one, the download cannot resume.
    pub etag: Option<String>,
    /// Why a resume asked for starts over instead.
    pub restart: Option<String>,
}

/// Where and how to talk to bin-manager.
#[derive(Clone, Debug)]
pub struct Client {
    /// API base, without a trailing slash: `http://127.0.0.1:8081/api/v1`.
    pub api: String,
    /// Download base, without a trailing slash.
    pub download_base: String,
    /// Bearer token (never logged).
    pub token: Option<String>,
    /// Deadline in seconds for each API request (connect, send, answer).
    pub timeout: u64,
    /// Deadline in seconds for each whole download.
    pub download_timeout: u64,
    /// This node's cpuArch, sent as `arch=` so the server can pick a build.
    pub arch: String,
    /// This node's name, sent as `node=` so that a staged rollout can
    /// answer the build this node should run (and a server with manual
    /// admission knows who asks).
    pub node: String,
    /// This node's token from the server (never logged), sent as
    /// `X-Node-Token` with every request to the configured origins.
    pub node_token: Option<String>,
    /// The proxies from the environment (none with `--no-proxy`).
    pub proxies: Proxies,
}

impl Client {
    /// `GET keepalive?node=`: `Some` when the server knows this node, `None` on 404.
    pub fn keepalive_get(&self, node: &str) -> Result<Option<Value>> {
        let url = format!("{}/keepalive?node={}", self.api, protocol::encode(node));
        let resp = self.send(Method::Get, &url, None)?;
        if resp.status == 404 {
            return Ok(None);
        }
        self.json(resp).map(Some)
    }

    /// `POST keepalive?node=` with the registration body; the answer's data.
    pub fn keepalive_post(&self, reg: &Registration) -> Result<Value> {
        let url = format!(
            "{}/keepalive?node={}",
            self.api,
            protocol::encode(&reg.name)
        );
        let resp = self.send(Method::Post, &url, Some(reg.to_json()))?;
        self.json(resp)
    }

    /// `GET bins/NAME`: what the server publishes for this binary.
    pub fn bin_info(&self, name: &str, version: Option<&str>) -> Result<BinInfo> {
        let url = format!(
            "{}/bins/{}{}",
            self.api,
            protocol::encode(name),
            self.query(version)
        );
        let resp = self.send(Method::Get, &url, None)?;
        let url = resp.url.clone();
        protocol::bin_info(&url, &self.json(resp)?)
    }

    /// `POST check`: the batched check of [`crate::agent::batch`], `body`
    /// being the request's JSON. `etag` (of the answer the agent holds to
    /// the same request) goes as `If-None-Match`.
    pub fn check(&self, body: String, etag: Option<&str>) -> Result<Checked> {
        let url = format!("{}/check", self.api);
        let headers: Vec<(&'static str, String)> = etag
            .map(|e| ("If-None-Match", e.to_string()))
            .into_iter()
            .collect();
        let mut resp = self.send_with(Method::Post, &url, Some(body), &headers)?;
        match resp.status {
            304 => return Ok(Checked::NotModified),
            // The seed's server, the original Go server: no such route.
            404 | 405 => return Ok(Checked::Unsupported),
            _ => {}
        }
        let etag = resp.etag.take();
        match self.json(resp) {
            Ok(data) => Ok(Checked::Answer { etag, data }),
            // A seed-style server answering its errors with HTTP 200.
            Err(Error::Server {
                status: 200,
                message,
                ..
            }) if message.starts_with("code 404:") || message.starts_with("code 405:") => {
                Ok(Checked::Unsupported)
            }
            Err(e) => Err(e),
        }
    }

    /// `POST bins/NAME?node=NODE`: reports the hash this node now runs
    /// (`node=` is an extension a seed-only server ignores).
    pub fn report_hash(&self, node: &str, name: &str, md5: &str) -> Result<()> {
        let url = format!(
            "{}/bins/{}?node={}",
            self.api,
            protocol::encode(name),
            protocol::encode(node)
        );
        let resp = self.send(Method::Post, &url, Some(protocol::hash_report(md5)))?;
        self.json(resp).map(drop)
    }

    /// The URL a binary is downloaded from: its own `downloadUrl`, else the
    /// download base with the name (and `arch=`/`version=` for bin-manager).
    pub fn download_url(&self, name: &str, own: Option<&str>, version: Option<&str>) -> String {
        match own {
            Some(url) => url.to_string(),
            None => format!(
                "{}/{}{}",
                self.download_base,
                protocol::encode(name),
                self.query(version)
            ),
        }
    }

    /// Streams `url` into `sink` in blocks of up to [`CHUNK`]; refuses files over `max` bytes and
    /// bodies shorter than their `Content-Length`. `on_start` learns, before
    /// the first block, where the blocks go and how long the whole file is
    /// ([`Begin`]). Returns the whole file's length (resumed bytes included).
    ///
    /// With `from`, asks only for the rest (`Range: bytes=N-` under
    /// `If-Range`), and takes only a `206` whose `Content-Range` starts at N
    /// and has the expected total; anything else starts over from byte 0
    /// (a `200` is the whole file, never the rest to append).
    ///
    /// `sink(buf, n)`: the first `n` bytes of `buf` are the next ones. The
    /// sink may keep `buf` by swapping in another buffer of [`CHUNK`] bytes
    /// (whose contents do not matter), so blocks are handed on, not copied.
    pub fn download(
        &self,
        url: &str,
        max: u64,
        from: Option<&From>,
        on_start: &mut dyn FnMut(&Begin) -> Result<()>,
        sink: &mut dyn FnMut(&mut Vec<u8>, usize) -> Result<()>,
    ) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(self.download_timeout.max(1));
        let mut ask = from.filter(|f| f.offset > 0 && strong(&f.etag).is_some());
        let mut restart = None;
        // At most two requests: a refused resume asks once more, for everything.
        let (mut resp, offset, total) = loop {
            let headers: Vec<(&str, String)> = match ask {
                Some(f) => vec![
                    ("Range", format!("bytes={}-", f.offset)),
                    ("If-Range", f.etag.clone()),
                ],
                None => Vec::new(),
            };
            let mut resp = http::send(&http::Request {
                method: Method::Get,
                url,
                body: None,
                credentials: &|u| self.credentials(u),
                headers: &headers,
                timeout: Duration::from_secs(self.timeout.max(1)),
                deadline,
                proxies: &self.proxies,
            })?;
            if matches!(resp.status, 429 | 503) {
                return Err(busy(resp));
            }
            let got = resp.content_range.clone().unwrap_or_default();
            if let (Some(f), 416) = (ask, resp.status) {
                // Nothing left to send: complete if the file has exactly this length.
                let whole = got.strip_prefix("bytes */").and_then(|t| t.parse().ok());
                if whole == Some(f.offset) && f.total.is_none_or(|t| t == f.offset) {
                    on_start(&Begin {
                        offset: f.offset,
                        total: whole,
                        etag: strong(&f.etag),
                        restart: None,
                    })?;
                    return Ok(f.offset);
                }
                restart = Some(format!(
                    "the server cannot send bytes {}- (416, Content-Range \"{got}\")",
                    f.offset
                ));
                ask = None;
                continue;
            }
            if !(200..300).contains(&resp.status) {
                let url = resp.url.clone();
                let mut body = Vec::new();
                let _ = Read::take(&mut resp, 4096).read_to_end(&mut body);
                let status = i32::from(resp.status);
                return Err(protocol::unwrap_answer(&url, status, &resp.reason, &body)
                    .err()
                    .unwrap_or(Error::Server {
                        url,
                        status,
                        message: resp.reason.clone(),
                    }));
            }
            let Some(f) = ask else {
                break (resp, 0, None);
            };
            if resp.status != 206 {
                restart = Some(format!(
                    "the server sent the whole file (status {}), not the rest",
                    resp.status
                ));
                break (resp, 0, None);
            }
            match content_range(&got) {
                Some((start, total))
                    if start == f.offset
                        && f.total.is_none_or(|t| t == total)
                        && resp.length.is_none_or(|l| start + l == total) =>
                {
                    break (resp, start, Some(total));
                }
                _ => {
                    restart = Some(format!(
                        "the server answered 206 with Content-Range \"{}\", not bytes {}-{}",
                        crate::protocol::one_line(&got, 100),
                        f.offset,
                        f.total.map(|t| format!("…/{t}")).unwrap_or_default()
                    ));
                    ask = None;
                }
            }
        };
        let url = resp.url.clone();
        let total = total.or(resp.length);
        if let Some(len) = total.filter(|&len| len > max) {
            return Err(Error::Size {
                url,
                msg: format!(
                    "announces {} ({len} bytes), over the limit of {}",
                    crate::log::size(len),
                    crate::log::size(max)
                ),
            });
        }
        on_start(&Begin {
            offset,
            total,
            etag: resp.etag.as_deref().and_then(strong),
            restart,
        })?;
        let mut buf = vec![0u8; CHUNK];
        let mut got: u64 = 0;
        loop {
            let n = match resp.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.transfer_error(&url, offset + got, e)),
            };
            if n == 0 {
                break;
            }
            got += n as u64;
            if offset + got > max {
                return Err(Error::Size {
                    url,
                    msg: format!("body exceeds the limit of {}", crate::log::size(max)),
                });
            }
            sink(&mut buf, n)?;
            if buf.len() != CHUNK {
                buf.resize(CHUNK, 0); // a sink that swapped in another size
            }
        }
        match resp.length {
            Some(len) if got != len => Err(Error::Truncated {
                url,
                got: offset + got,
                len: offset + len,
            }),
            _ => Ok(offset + got),
        }
    }

    /// The headers `url` may receive: the bearer token and the node token,
    /// for the configured origins only.
    fn credentials(&self, url: &str) -> Vec<(&'static str, String)> {
        if !self.trusts(url) {
            return Vec::new();
        }
        let bearer = self
            .token
            .as_ref()
            .map(|t| ("Authorization", format!("Bearer {t}")));
        let node = self.node_token.clone().map(|t| ("X-Node-Token", t));
        bearer.into_iter().chain(node).collect()
    }

    /// Whether `url` may receive the token: only the configured API and
    /// download origins do — never a binary's own `downloadUrl` elsewhere,
    /// nor a host a redirect points to.
    fn trusts(&self, url: &str) -> bool {
        http::same_origin(url, &self.api) || http::same_origin(url, &self.download_base)
    }

    fn query(&self, version: Option<&str>) -> String {
        let mut q = format!(
            "?arch={}&node={}",
            protocol::encode(&self.arch),
            protocol::encode(&self.node)
        );
        if let Some(v) = version {
            q.push_str(&format!("&version={}", protocol::encode(v)));
        }
        q
    }

    /// Reads a JSON answer (≤ 1 MiB) and unwraps its envelope.
    fn json(&self, mut resp: http::Response) -> Result<Value> {
        let mut body = Vec::new();
        Read::take(&mut resp, MAX_JSON as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => Error::Protocol {
                    url: resp.url.clone(),
                    msg: format!("reading the answer: {e}"),
                },
                _ => Error::Http {
                    url: resp.url.clone(),
                    msg: format!("reading the answer: {e}"),
                },
            })?;
        if body.len() > MAX_JSON {
            return Err(Error::Protocol {
                url: resp.url,
                msg: "answer larger than 1 MiB".into(),
            });
        }
        protocol::unwrap_answer(&resp.url, i32::from(resp.status), &resp.reason, &body)
    }

    /// Sends one API request (redirects followed, within [`Client::timeout`]).
    /// A `429` or `503` is [`Error::Busy`]: the server asks to be left alone.
    fn send(&self, method: Method, url: &str, body: Option<String>) -> Result<http::Response> {
        self.send_with(method, url, body, &[])
    }

    /// [`Client::send`] with more request headers.
    fn send_with(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
        headers: &[(&'static str, String)],
    ) -> Result<http::Response> {
        let timeout = Duration::from_secs(self.timeout.max(1));
        let resp = http::send(&http::Request {
            method,
            url,
            body: body.as_deref().map(str::as_bytes),
            credentials: &|u| self.credentials(u),
            headers,
            timeout,
            deadline: Instant::now() + timeout,
            proxies: &self.proxies,
        })?;
        match resp.status {
            429 | 503 => Err(busy(resp)),
            _ => Ok(resp),
        }
    }

    fn transfer_error(&self, url: &str, got: u64, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::InvalidData {
            return Error::Protocol {
                url: url.to_string(),
                msg: format!("{e} after {got} bytes"),
            };
        }
        let msg = if is_timeout(&e) {
            format!(
                "download did not finish within {} s (got {got} bytes)",
                self.download_timeout
            )
        } else {
            format!("connection broke after {got} bytes: {e}")
        };
        Error::Http {
            url: url.to_string(),
            msg,
        }
    }
}

/// A `429`/`503` answer as [`Error::Busy`]: its `Retry-After` read, its
/// message from the envelope when it has one (else the reason phrase).
fn busy(mut resp: http::Response) -> Error {
    let mut body = Vec::new();
    let _ = Read::take(&mut resp, 4096).read_to_end(&mut body);
    let status = i32::from(resp.status);
    let message = match protocol::unwrap_answer(&resp.url, status, &resp.reason, &body) {
        Err(Error::Server { message, .. }) => message,
        _ => resp.reason.clone(),
    };
    let now = crate::log::unix_now();
    Error::Busy {
        retry_after: resp
            .retry_after
            .as_deref()
            .and_then(|v| crate::agent::backoff::parse_retry_after(v, now)),
        url: resp.url,
        status: resp.status,
        message,
    }
}

/// A strong ETag (`"…"`), the only kind `If-Range` may carry.
fn strong(etag: &str) -> Option<String> {
    let e = etag.trim();
    (e.len() >= 2 && e.starts_with('"') && e.ends_with('"')).then(|| e.to_string())
}

/// `bytes START-END/TOTAL` → (START, TOTAL), with END the last byte.
fn content_range(v: &str) -> Option<(u64, u64)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.parse().ok()?,
        end.parse::<u64>().ok()?,
        total.parse().ok()?,
    );
    (start <= end && end.checked_add(1) == Some(total)).then_some((start, total))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_content_range_and_a_strong_etag_are_taken() {
        assert_eq!(content_range("bytes 100-999/1000"), Some((100, 1000)));
        assert_eq!(content_range(" bytes 0-0/1 "), Some((0, 1)));
        // Not to the end, unknown total, reversed, not bytes, garbage.
        assert_eq!(content_range("bytes 100-998/1000"), None);
        assert_eq!(content_range("bytes 100-999/*"), None);
        assert_eq!(content_range("bytes 9-1/2"), None);
        assert_eq!(content_range("items 0-9/10"), None);
        assert_eq!(content_range("bytes */1000"), None);
        assert_eq!(strong("\"abc\""), Some("\"abc\"".into()));
        assert_eq!(strong("W/\"abc\""), None);
        assert_eq!(strong("abc"), None);
        assert_eq!(strong("\""), None);
    }
}
