//! Bytes to request heads and responses to bytes: the request line and
//! headers parsed by httparse (the only httparse user on the server side)
//! with the server's limits, and a response's status line and headers.

use super::server::Conn;
use super::{Body, Payload, Request, Response, MAX_HEAD};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Body deadline: this much time, plus one second per this many bytes.
const BODY_BASE: Duration = Duration::from_secs(10);
const BODY_MIN_RATE: u64 = 256 * 1024;

pub(super) fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// What scanning a request head found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scan {
    /// No end yet.
    Partial,
    /// The head ends here (after its blank line).
    Complete(usize),
    /// A line ends in a bare LF: refused at once, never waited on (HTTP/1.1
    /// lines end in CRLF, and a parser that also took bare LF could read
    /// the same bytes as different requests than a proxy in front of it).
    BareLf,
}

/// Scans `bytes` for the end of a request head, from `from` on (bytes
/// before it were scanned already).
pub(super) fn scan_head(bytes: &[u8], from: usize) -> Scan {
    for (i, &b) in bytes.iter().enumerate().skip(from) {
        if b != b'\n' {
            continue;
        }
        if i == 0 || bytes[i - 1] != b'\r' {
            return Scan::BareLf;
        }
        if i >= 3 && &bytes[i - 3..=i] == b"\r\n\r\n" {
            return Scan::Complete(i + 1);
        }
    }
    Scan::Partial
}

pub(super) struct Head {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body_len: u64,
    pub(super) keep_alive: bool,
}

impl Head {
    /// The request handlers see; its body (if any) comes from `conn`, within
    /// the body deadline counted from `now`.
    pub(super) fn into_request<'a>(
        self,
        peer: SocketAddr,
        conn: Option<&'a mut Conn>,
        now: Instant,
    ) -> Request<'a> {
        let deadline = now + BODY_BASE + Duration::from_secs(self.body_len / BODY_MIN_RATE);
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            headers: self.headers,
            peer,
            body_len: self.body_len,
            body: Body {
                conn,
                left: self.body_len,
                deadline,
            },
        }
    }

    /// The request target as sent, for the access log.
    pub(super) fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

pub(super) fn parse_head(head: &[u8]) -> Result<Head, Response> {
    if head.len() > MAX_HEAD {
        return Err(Response::error(431, "request head too large"));
    }
    if scan_head(head, 0) == Scan::BareLf {
        return Err(bare_lf());
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Response::error(400, "incomplete request head"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(431, "too many headers"))
        }
        Err(e) => return Err(Response::error(400, &format!("malformed request: {e}"))),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some() {
        return Err(Response::error(
            411,
            "send a Content-Length; chunked request bodies are not accepted",
        ));
    }
    let body_len = content_length(&headers)?;
    let connection = get("connection").unwrap_or("").to_ascii_lowercase();
    let keep_alive = if version == 1 {
        !connection.contains("close")
    } else {
        connection.contains("keep-alive")
    };
    // Absolute-form targets (`http://host/path`) are allowed by HTTP/1.1.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/", |j| &target[i + 3 + j..]),
        None => target,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body_len,
        keep_alive,
    })
}

/// The one `Content-Length` (0 when there is none): plain digits only.
/// Two of them, even equal, or a value like `+2`, `2, 2` or `0x10` is a 400
/// (and the connection is closed): a server that read such a head another
/// way than the proxy in front of it would run the rest of the body as a
/// second request.
fn content_length(headers: &[(String, String)]) -> Result<u64, Response> {
    let mut values = headers.iter().filter(|(k, _)| k == "content-length");
    let Some((_, v)) = values.next() else {
        return Ok(0);
    };
    if values.next().is_some() {
        return Err(Response::error(400, "more than one Content-Length header"));
    }
    let invalid = || Response::error(400, "invalid Content-Length: plain digits only");
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    v.parse().map_err(|_| invalid())
}

/// The answer to a head with a bare-LF line end.
pub(super) fn bare_lf() -> Response {
    Response::error(400, "malformed request: lines must end in CRLF")
}

/// The status line and headers, then the body if `with_body` and in memory.
pub(super) fn encode(resp: &Response, keep_alive: bool, with_body: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + if with_body { resp.len() as usize } else { 0 });
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    if resp.status != 204 {
        // RFC 9110 §8.6: never on a 204, which has no body by definition.
        let _ = write!(out, "Content-Length: {}\r\n", resp.len());
    }
    for (k, v) in &resp.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    if let (Payload::Bytes(bytes), true) = (&resp.body, with_body) {
        out.extend_from_slice(bytes);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(
            b"GET /api/v1/bins/a?arch=x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
        )
        .ok()
        .unwrap();
        assert_eq!(
            (
                h.method.as_str(),
                h.path.as_str(),
                h.query.as_str(),
                h.body_len,
                h.keep_alive
            ),
            ("GET", "/api/v1/bins/a", "arch=x", 3, true)
        );
        let h = parse_head(b"GET http://h:1/x?y HTTP/1.0\r\n\r\n")
            .ok()
            .unwrap();
        assert_eq!(
            (h.path.as_str(), h.query.as_str(), h.keep_alive),
            ("/x", "y", false)
        );
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .ok()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .err()
                .unwrap()
                .status,
            411
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
                .err()
                .unwrap()
                .status,
            400
        );
        assert_eq!(parse_head(b"NOT HTTP\r\n\r\n").err().unwrap().status, 400);
        for bad in [
            "Content-Length: +2",
            "Content-Length: -1",
            "Content-Length: 2, 2",
            "Content-Length: 0x10",
            "Content-Length: 1e3",
            "Content-Length: 2 2",
            "Content-Length:",
            "Content-Length: 99999999999999999999999",
            "Content-Length: 2\r\nContent-Length: 2",
            "Content-Length: 2\r\ncontent-length: 02",
        ] {
            let head = format!("POST / HTTP/1.1\r\n{bad}\r\n\r\n");
            let status = parse_head(head.as_bytes()).err().map(|r| r.status);
            assert_eq!(status, Some(400), "{bad:?}");
        }
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\nHost: h\n\n")
                .err()
                .unwrap()
                .status,
            400
        );
    }

    #[test]
    fn head_scans() {
        let check = |bytes: &[u8], from: usize, expected: Scan| {
            assert_eq!(
                scan_head(bytes, from),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        };
        check(
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\nrest",
            0,
            Scan::Complete(27),
        );
        check(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 20, Scan::Complete(27));
        check(b"GET / HTTP/1.1\r\nHost: h\r\n", 0, Scan::Partial);
        check(b"GET / HTTP/1.1\nHost: h", 0, Scan::BareLf);
        check(b"GET / HTTP/1.1\r\nHost: h\n", 0, Scan::BareLf);
        check(b"\n", 0, Scan::BareLf);
        assert_eq!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]).err().unwrap().status,
            431
        );
    }
}
