//! The bin-manager client (the only minreq user): the protocol's five calls,
//! with timeouts, a bearer token sent only to the configured API and
//! download origins, at most three
//! redirects followed by hand, JSON answers capped at 1 MiB, and downloads
//! streamed to a sink with their length checked.

use crate::agent::fetch;
use crate::error::{Error, Result};
use crate::json::Value;
use crate::protocol::{self, BinInfo, Registration};
use minreq::{Method, Request, ResponseLazy};
use std::io::Read;
use std::time::{Duration, Instant};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 3;
/// Largest JSON answer read.
pub const MAX_JSON: usize = 1 << 20;
/// Largest response header block accepted.
const MAX_HEADERS: usize = 64 * 1024;
/// Download read size (also the block size handed to the hashers).
pub const CHUNK: usize = 128 * 1024;

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
}

/// A response whose body has not been read yet.
pub struct Response {
    /// The URL finally answered (after redirects).
    pub url: String,
    /// HTTP status.
    pub status: i32,
    /// `Content-Length`, if given.
    pub length: Option<u64>,
    inner: ResponseLazy,
}

impl Client {
    /// `GET keepalive?node=`: `Some` when the server knows this node, `None` on 404.
    pub fn keepalive_get(&self, node: &str) -> Result<Option<Value>> {
        let url = format!("{}/keepalive?node={}", self.api, protocol::encode(node));
        let resp = self.send(Method::Get, &url, None, self.timeout)?;
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
        let resp = self.send(Method::Post, &url, Some(reg.to_json()), self.timeout)?;
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
        let resp = self.send(Method::Get, &url, None, self.timeout)?;
        let url = resp.url.clone();
        protocol::bin_info(&url, &self.json(resp)?)
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
        let resp = self.send(
            Method::Post,
            &url,
            Some(protocol::hash_report(md5)),
            self.timeout,
        )?;
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

    /// Streams `url` into `sink` in blocks (through [`crate::agent::fetch`], which
    /// reads bodies in large blocks); refuses bodies over `max` bytes and
    /// bodies shorter than their `Content-Length`. `on_start` learns the
    /// announced length before the first block. Returns the byte count.
    ///
    /// `sink(buf, n)`: the first `n` bytes of `buf` are the next ones. The
    /// sink may keep `buf` by swapping in another buffer of [`CHUNK`] bytes
    /// (whose contents do not matter), so blocks are handed on, not copied.
    pub fn download(
        &self,
        url: &str,
        max: u64,
        on_start: &mut dyn FnMut(Option<u64>),
        sink: &mut dyn FnMut(&mut Vec<u8>, usize) -> Result<()>,
    ) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(self.download_timeout.max(1));
        let mut resp = fetch::get(
            url,
            &|u| self.credentials(u),
            Duration::from_secs(self.timeout.max(1)),
            deadline,
        )?;
        let url = resp.url.clone();
        if !(200..300).contains(&resp.status) {
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
        if let Some(len) = resp.length.filter(|&len| len > max) {
            return Err(Error::Size {
                url,
                msg: format!(
                    "announces {} ({len} bytes), over the limit of {}",
                    crate::log::size(len),
                    crate::log::size(max)
                ),
            });
        }
        on_start(resp.length);
        let mut buf = vec![0u8; CHUNK];
        let mut total: u64 = 0;
        loop {
            let n = match resp.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.transfer_error(&url, total, e)),
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > max {
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
            Some(len) if total != len => Err(Error::Size {
                url,
                msg: format!("truncated: got {total} of {len} bytes"),
            }),
            _ => Ok(total),
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
        let o = origin(url);
        o == origin(&self.api) || o == origin(&self.download_base)
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
    fn json(&self, mut resp: Response) -> Result<Value> {
        let body = read_capped(&mut resp, MAX_JSON + 1)?;
        if body.len() > MAX_JSON {
            return Err(Error::Protocol {
                url: resp.url,
                msg: "answer larger than 1 MiB".into(),
            });
        }
        protocol::unwrap_answer(&resp.url, resp.status, &resp.inner.reason_phrase, &body)
    }

    /// Sends one request, following up to [`MAX_REDIRECTS`] redirects. The
    /// token goes only to the origin it was configured for.
    fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
        timeout: u64,
    ) -> Result<Response> {
        let mut url = url.to_string();
        let mut method = method;
        for _ in 0..=MAX_REDIRECTS {
            crate::debug!(
                "{} {url}",
                if matches!(method, Method::Post) {
                    "posting to"
                } else {
                    "asking"
                }
            );
            let mut req = Request::new(method.clone(), url.as_str())
                .with_timeout(timeout.max(1))
                .with_follow_redirects(false)
                .with_max_headers_size(MAX_HEADERS)
                .with_max_status_line_length(8 * 1024)
                .with_header(
                    "User-Agent",
                    concat!("bin-proxy/", env!("CARGO_PKG_VERSION")),
                );
            for (name, value) in self.credentials(&url) {
                req = req.with_header(name, value);
            }
            if let Some(body) = &body {
                req = req
                    .with_header("Content-Type", "application/json")
                    .with_body(body.clone());
            }
            let inner = req.send_lazy().map_err(|e| http_error(&url, timeout, e))?;
            let status = inner.status_code;
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let Some(location) = inner.headers.get("location") else {
                    return Err(Error::Protocol {
                        url,
                        msg: format!("redirect {status} without a Location"),
                    });
                };
                url = resolve(&url, location).ok_or_else(|| Error::Protocol {
                    url: url.clone(),
                    msg: format!(
                        "redirect to an unsupported location \"{}\"",
                        protocol::one_line(location, 200)
                    ),
                })?;
                if status == 303 {
                    method = Method::Get;
                }
                continue;
            }
            let length = inner
                .headers
                .get("content-length")
                .and_then(|v| v.trim().parse().ok());
            return Ok(Response {
                url,
                status,
                length,
                inner,
            });
        }
        Err(Error::Protocol {
            url,
            msg: format!("more than {MAX_REDIRECTS} redirects"),
        })
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

fn read_capped(resp: &mut Response, cap: usize) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    Read::take(&mut resp.inner, cap as u64)
        .read_to_end(&mut body)
        .map_err(|e| Error::Http {
            url: resp.url.clone(),
            msg: format!("reading the answer: {e}"),
        })?;
    Ok(body)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) || e.to_string().contains("timeout")
}

/// Maps minreq's errors: network trouble (worth a retry) becomes
/// [`Error::Http`]; a malformed answer (which a retry would only repeat)
/// becomes [`Error::Protocol`].
fn http_error(url: &str, timeout: u64, e: minreq::Error) -> Error {
    use minreq::Error as M;
    if matches!(
        e,
        M::HeadersOverflow
            | M::StatusLineOverflow
            | M::MalformedChunkLength
            | M::MalformedChunkEnd
            | M::MalformedContentLength
            | M::InvalidUtf8InResponse
    ) {
        return Error::Protocol {
            url: url.to_string(),
            msg: e.to_string(),
        };
    }
    let msg = match &e {
        minreq::Error::IoError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is bin-manager running and the address right?)".to_string()
        }
        minreq::Error::IoError(io) if is_timeout(io) => format!("no answer within {timeout} s"),
        minreq::Error::AddressNotFound => "could not resolve the host name".to_string(),
        other => match other.to_string() {
            m if m.contains("invalid peer certificate") => {
                format!("{m} (is the server's CA in the system store, or in SSL_CERT_FILE?)")
            }
            m => m,
        },
    };
    Error::Http {
        url: url.to_string(),
        msg,
    }
}

/// `scheme://host:port` of a URL (the part a token is bound to).
fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    let end = url[rest..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| rest + i);
    &url[..end]
}

/// Resolves a redirect `Location` against the URL that answered.
pub fn resolve(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    if location.starts_with("http://") || location.starts_with("https://") {
        Some(location.to_string())
    } else if location.starts_with("//") {
        let scheme = &base[..base.find("://")?];
        Some(format!("{scheme}:{location}"))
    } else if location.starts_with('/') {
        Some(format!("{}{location}", origin(base)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_redirects() {
        assert_eq!(origin("http://h:1/api/v1?x"), "http://h:1");
        assert_eq!(origin("https://h"), "https://h");
        assert_eq!(
            resolve("http://h:1/a/b", "/c?d").as_deref(),
            Some("http://h:1/c?d")
        );
        assert_eq!(
            resolve("https://h/a", "//o/p").as_deref(),
            Some("https://o/p")
        );
        assert_eq!(
            resolve("http://h/a", "http://o/p").as_deref(),
            Some("http://o/p")
        );
        assert_eq!(resolve("http://h/a", "ftp://o/p"), None);
        assert_eq!(resolve("http://h/a", "relative"), None);
    }
}
