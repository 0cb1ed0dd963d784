//! The agent's only HTTP client: every request it makes (the API calls and
//! the downloads) goes through [`send`]. HTTP/1.1 by hand on httparse and
//! rustls 0.21 + ring, because that is smaller and faster than the crates
//! that would do it for us (ARCHITECTURE.md, "Decisions"): the head is
//! parsed by httparse, the body comes straight off the socket (or rustls)
//! into the caller's buffer in large blocks. Redirects (at most three, each
//! asked again which credentials it may receive), `Content-Length` and
//! chunked framing, a deadline on every read, proxies from the environment
//! ([`proxy`]) and IPv6 literals ([`url`]).

pub mod conn;
pub mod proxy;
pub mod url;

use crate::error::{Error, Result};
use conn::Conn;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};
pub use url::{resolve, same_origin};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 3;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest status line accepted.
const MAX_STATUS_LINE: usize = 8 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 64;

/// The two methods the protocol uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST, with a JSON body.
    Post,
}

/// One request, before redirects.
pub struct Request<'a> {
    /// GET or POST.
    pub method: Method,
    /// Where to.
    pub url: &'a str,
    /// The JSON body of a POST.
    pub body: Option<&'a [u8]>,
    /// The headers a URL may receive (Authorization, X-Node-Token); asked
    /// again after each redirect. Never sent to a proxy itself.
    pub credentials: &'a dyn Fn(&str) -> Vec<(&'static str, String)>,
    /// More request headers, sent to every URL (`Range`, `If-Range`).
    pub headers: &'a [(&'a str, String)],
    /// Bounds connecting and receiving the head of each answer.
    pub timeout: Duration,
    /// Bounds everything, body included.
    pub deadline: Instant,
    /// The proxies to use.
    pub proxies: &'a proxy::Proxies,
}

/// A response whose body is being streamed.
pub struct Response {
    /// The URL that finally answered.
    pub url: String,
    /// HTTP status.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// `Content-Length`, when the body has one.
    pub length: Option<u64>,
    /// `Retry-After`, as sent (read by [`crate::agent::backoff`]).
    pub retry_after: Option<String>,
    /// `ETag`, as sent.
    pub etag: Option<String>,
    /// `Content-Range`, as sent.
    pub content_range: Option<String>,
    location: Option<String>,
    body: BufReader<Conn>,
    framing: Framing,
}

enum Framing {
    Length(u64),
    /// Bytes left in the current chunk; `None` before the first size line.
    Chunked(Option<u64>),
    Close,
    Done,
}

/// Sends `req`, following up to [`MAX_REDIRECTS`] redirects (a 303 turns a
/// POST into a GET).
pub fn send(req: &Request) -> Result<Response> {
    let mut url = req.url.to_string();
    let mut method = req.method;
    for _ in 0..=MAX_REDIRECTS {
        crate::debug!(
            "{} {url}",
            if method == Method::Post {
                "posting to"
            } else {
                "asking"
            }
        );
        let body = req.body.filter(|_| method == Method::Post);
        let resp = once(req, method, &url, body)?;
        if !matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
            return Ok(resp);
        }
        let Some(location) = resp.location.clone() else {
            return Err(Error::Protocol {
                url,
                msg: format!("redirect {} without a Location", resp.status),
            });
        };
        url = resolve(&url, &location).ok_or_else(|| Error::Protocol {
            url: url.clone(),
            msg: format!(
                "redirect to an unsupported location \"{}\"",
                crate::protocol::one_line(&location, 200)
            ),
        })?;
        if resp.status == 303 {
            method = Method::Get;
        }
    }
    Err(Error::Protocol {
        url,
        msg: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

fn once(req: &Request, method: Method, url: &str, body: Option<&[u8]>) -> Result<Response> {
    let http = |msg: String| Error::Http {
        url: url.to_string(),
        msg,
    };
    let target = url::Target::parse(url).ok_or_else(|| Error::Protocol {
        url: url.to_string(),
        msg: "not an http:// or https:// URL".into(),
    })?;
    let head_deadline = req.deadline.min(Instant::now() + req.timeout);
    let proxy = req.proxies.for_target(&target);
    let conn = conn::open(&target, proxy, req.timeout, head_deadline).map_err(|f| {
        if f.protocol {
            Error::Protocol {
                url: url.to_string(),
                msg: f.msg,
            }
        } else {
            http(f.msg)
        }
    })?;
    // Through a plain-HTTP proxy the request names the whole URL; its
    // credentials are the origin's, passed on by the proxy, never
    // Proxy-Authorization.
    let path = match proxy {
        Some(_) if !target.https => format!("http://{}{}", target.authority, target.path),
        _ => target.path.clone(),
    };
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bin-proxy/{}\r\nAccept: */*\r\nConnection: close\r\n",
        if method == Method::Post { "POST" } else { "GET" },
        target.authority,
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in (req.credentials)(url).iter().chain(req.headers) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut w = io::BufWriter::with_capacity(16 * 1024, conn);
    w.write_all(head.as_bytes())
        .and_then(|()| w.write_all(body.unwrap_or_default()))
        .and_then(|()| w.flush())
        .map_err(|e| http(conn::describe(&e, req.timeout, "")))?;
    let conn = w.into_inner().map_err(|e| http(e.to_string()))?;

    let mut body = BufReader::with_capacity(64 * 1024, conn);
    let head = read_head(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => Error::Protocol {
            url: url.to_string(),
            msg: e.to_string(),
        },
        _ => http(conn::describe(&e, req.timeout, "")),
    })?;
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let malformed = |msg: String| Error::Protocol {
        url: url.to_string(),
        msg: format!("malformed response head: {msg}"),
    };
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(malformed("incomplete".into())),
        Err(e) => return Err(malformed(e.to_string())),
    }
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let status = parsed.code.unwrap_or(0);
    // A plain-HTTP proxy answers its own refusals (an ACL, a filter, a
    // login it wants): a 407 always is the proxy's, and so is a 403 that is
    // not bin-manager's JSON. Neither is the server's word on this node or
    // build: it is an unreachable server, and the error names the proxy.
    if let Some(p) = proxy.filter(|_| !target.https) {
        let json = header("content-type").is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        if status == 407 || (status == 403 && !json) {
            return Err(http(format!(
                "proxy {} refused the request: {status} {}",
                p.authority,
                crate::protocol::one_line(parsed.reason.unwrap_or(""), 200)
            )));
        }
    }
    let chunked =
        header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let length = match header("content-length") {
        Some(v) if !chunked => Some(
            v.parse::<u64>()
                .map_err(|_| malformed(format!("Content-Length \"{v}\"")))?,
        ),
        _ => None,
    };
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked(None),
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    };
    body.get_mut().set_deadline(req.deadline);
    Ok(Response {
        url: url.to_string(),
        status,
        reason: parsed.reason.unwrap_or("").to_string(),
        length,
        retry_after: header("retry-after"),
        etag: header("etag"),
        content_range: header("content-range"),
        location: header("location"),
        body,
        framing,
    })
}

impl Read for Response {
    /// Reads body bytes (never the framing). A body that ends before its
    /// `Content-Length` simply ends: the caller compares the count.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.framing {
                Framing::Done => return Ok(0),
                Framing::Close => return self.body.read(buf),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(0);
                }
                Framing::Length(left) => {
                    let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.body.read(&mut buf[..max])?;
                    *left -= n as u64;
                    if n == 0 {
                        self.framing = Framing::Done; // cut short: the caller sees fewer bytes
                    }
                    return Ok(n);
                }
                Framing::Chunked(Some(0)) => {
                    expect_crlf(&mut self.body)?;
                    self.framing = Framing::Chunked(None);
                }
                Framing::Chunked(Some(left)) => {
                    let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.body.read(&mut buf[..max])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "chunked body cut short",
                        ));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                Framing::Chunked(None) => {
                    let size = chunk_size(&mut self.body)?;
                    if size == 0 {
                        skip_trailers(&mut self.body)?;
                        self.framing = Framing::Done;
                    } else {
                        self.framing = Framing::Chunked(Some(size));
                    }
                }
            }
        }
    }
}

/// Reads the response head up to and including the blank line.
fn read_head(r: &mut BufReader<Conn>) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    loop {
        let n = r
            .by_ref()
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut head)?;
        if !head.is_empty() && !b"HTTP/".starts_with(&head[..head.len().min(5)]) {
            // What a TLS port answers a plain request (tls_hint knows the words).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid HTTP version: the answer does not start with HTTP/",
            ));
        }
        if n == 0 {
            // Nothing at all is also what a TLS port answers a plain
            // request: tls_hint knows these words.
            let msg = if head.is_empty() {
                "connection closed: the server did not provide a status line"
            } else {
                "connection closed before the end of the response head"
            };
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(head);
        }
        if !head[..head.len().min(MAX_STATUS_LINE)].contains(&b'\n')
            && head.len() >= MAX_STATUS_LINE
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "status line longer than 8 KiB",
            ));
        }
        if head.len() >= MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response headers larger than 64 KiB",
            ));
        }
    }
}

fn chunk_size(r: &mut BufReader<Conn>) -> io::Result<u64> {
    let l = conn::line(r, 1024)?;
    let hex = l.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "malformed chunk size"))
}

fn expect_crlf(r: &mut BufReader<Conn>) -> io::Result<()> {
    match conn::line(r, 2)?.as_str() {
        "" => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed chunk end",
        )),
    }
}

fn skip_trailers(r: &mut BufReader<Conn>) -> io::Result<()> {
    for _ in 0..MAX_HEADERS {
        if conn::line(r, 8 * 1024)?.is_empty() {
            return Ok(());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many trailers",
    ))
}

/// Decodes `%XX` escapes (userinfo of a proxy URL).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}
