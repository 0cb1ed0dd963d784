//! The download path: one streaming HTTP/1.1 GET whose body is read in large
//! blocks. minreq 2 (which serves the API calls) hands a body over one byte
//! per iterator step, which made it the slowest part of an upgrade; here the
//! response head is parsed by httparse and the body comes straight off the
//! socket (or rustls) into the caller's buffer. Redirects (at most three),
//! `Content-Length` and chunked framing, and a deadline on every read.

use crate::error::{Error, Result};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 3;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 64;

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

/// GETs `url`, following up to three redirects. `credentials` gives the
/// headers a URL may receive (Authorization, X-Node-Token; it is asked again
/// after each redirect). `connect` bounds connecting and receiving the head;
/// `deadline` bounds everything, body included.
pub fn get(
    url: &str,
    credentials: &dyn Fn(&str) -> Vec<(&'static str, String)>,
    connect: Duration,
    deadline: Instant,
) -> Result<Response> {
    let mut url = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let resp = get_once(&url, &credentials(&url), connect, deadline)?;
        if !matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
            return Ok(resp.inner);
        }
        let Some(location) = resp.header_location.clone() else {
            return Err(Error::Protocol {
                url,
                msg: format!("redirect {} without a Location", resp.inner.status),
            });
        };
        url = crate::agent::client::resolve(&url, &location).ok_or_else(|| Error::Protocol {
            url: url.clone(),
            msg: format!(
                "redirect to an unsupported location \"{}\"",
                crate::protocol::one_line(&location, 200)
            ),
        })?;
    }
    Err(Error::Protocol {
        url,
        msg: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

struct Once {
    inner: Response,
    header_location: Option<String>,
}

impl std::ops::Deref for Once {
    type Target = Response;
    fn deref(&self) -> &Response {
        &self.inner
    }
}

fn get_once(
    url: &str,
    credentials: &[(&str, String)],
    connect: Duration,
    deadline: Instant,
) -> Result<Once> {
    let http = |msg: String| Error::Http {
        url: url.to_string(),
        msg,
    };
    let target = Target::parse(url).ok_or_else(|| Error::Protocol {
        url: url.to_string(),
        msg: "not an http:// or https:// URL".into(),
    })?;
    let head_deadline = deadline.min(Instant::now() + connect);
    let tcp = dial(&target.host, target.port, connect).map_err(|e| http(describe(&e, connect)))?;
    let mut conn = Conn::new(tcp, &target, head_deadline).map_err(|e| match e {
        Error::Http { msg, .. } => http(msg),
        other => other,
    })?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bin-proxy/{}\r\nAccept: */*\r\nConnection: close\r\n",
        target.path,
        target.authority,
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in credentials {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    conn.write_all(request.as_bytes())
        .map_err(|e| http(describe(&e, connect)))?;

    let mut body = BufReader::with_capacity(64 * 1024, conn);
    let head = read_head(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => Error::Protocol {
            url: url.to_string(),
            msg: e.to_string(),
        },
        _ => http(describe(&e, connect)),
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
    body.get_mut().deadline = deadline;
    Ok(Once {
        header_location: header("location"),
        inner: Response {
            url: url.to_string(),
            status,
            reason: parsed.reason.unwrap_or("").to_string(),
            length,
            body,
            framing,
        },
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
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response head",
            ));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response headers larger than 64 KiB",
            ));
        }
    }
}

fn line(r: &mut BufReader<Conn>, max: u64) -> io::Result<String> {
    let mut bytes = Vec::new();
    r.by_ref().take(max).read_until(b'\n', &mut bytes)?;
    if !bytes.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed chunked body",
        ));
    }
    Ok(String::from_utf8_lossy(&bytes).trim().to_string())
}

fn chunk_size(r: &mut BufReader<Conn>) -> io::Result<u64> {
    let l = line(r, 1024)?;
    let hex = l.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "malformed chunk size"))
}

fn expect_crlf(r: &mut BufReader<Conn>) -> io::Result<()> {
    match line(r, 2)?.as_str() {
        "" => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed chunk end",
        )),
    }
}

fn skip_trailers(r: &mut BufReader<Conn>) -> io::Result<()> {
    for _ in 0..MAX_HEADERS {
        if line(r, 8 * 1024)?.is_empty() {
            return Ok(());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many trailers",
    ))
}

/// The parts of a URL a GET needs.
struct Target {
    https: bool,
    host: String,
    port: u16,
    /// `host[:port]` as written, for the Host header.
    authority: String,
    /// Path and query, at least "/".
    path: String,
}

impl Target {
    fn parse(url: &str) -> Option<Target> {
        let (https, rest) = match url.split_once("://")? {
            ("http", rest) => (false, rest),
            ("https", rest) => (true, rest),
            _ => return None,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let path = path.split('#').next().unwrap_or("");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let authority = authority.rsplit('@').next()?; // never send userinfo in Host
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']')?;
                (
                    host.to_string(),
                    after.strip_prefix(':').map(str::parse).transpose().ok()?,
                )
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
                None => (authority.to_string(), None),
            },
        };
        if host.is_empty() {
            return None;
        }
        let port = port.unwrap_or(if https { 443 } else { 80 });
        Some(Target {
            https,
            host,
            port,
            authority: authority.to_string(),
            path,
        })
    }
}

fn dial(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "could not resolve the host name");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn describe(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("no answer within {} s", timeout.as_secs())
        }
        _ => e.to_string(),
    }
}

/// A connection, plain or TLS, whose every read and write respects `deadline`.
struct Conn {
    stream: Stream,
    deadline: Instant,
    /// When the socket's timeouts were last set (see [`Conn::arm`]).
    armed: std::cell::Cell<Option<Instant>>,
}

/// How stale the socket's timeouts may get before they are set again: a
/// blocking call then overshoots the deadline by at most this much, and a
/// large download sets them a few times instead of twice per read.
const REARM_EVERY: Duration = Duration::from_secs(1);

enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn new(tcp: TcpStream, target: &Target, deadline: Instant) -> Result<Conn> {
        let stream = if target.https {
            tls(tcp, &target.host)?
        } else {
            Stream::Plain(tcp)
        };
        Ok(Conn {
            stream,
            deadline,
            armed: std::cell::Cell::new(None),
        })
    }

    fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => &s.sock,
        }
    }

    /// Fails once the deadline has passed; otherwise arms the socket's
    /// timeouts with what is left of it, unless they were armed less than
    /// [`REARM_EVERY`] ago.
    fn arm(&self) -> io::Result<()> {
        let now = Instant::now();
        let left = self
            .deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero());
        let left =
            left.ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))?;
        if self
            .armed
            .get()
            .is_some_and(|at| now.duration_since(at) < REARM_EVERY)
        {
            return Ok(());
        }
        self.tcp().set_read_timeout(Some(left))?;
        self.tcp().set_write_timeout(Some(left))?;
        self.armed.set(Some(now));
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.stream {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.stream {
            Stream::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.flush(),
        }
    }
}

#[cfg(not(feature = "tls"))]
fn tls(_: TcpStream, _: &str) -> Result<Stream> {
    Err(Error::Http {
        url: String::new(),
        msg: "this bin-proxy was built without TLS; use an http:// URL".into(),
    })
}

/// Wraps a connection in TLS, trusting what minreq trusts: the bundled
/// Mozilla roots and the system store (`SSL_CERT_FILE` included).
#[cfg(feature = "tls")]
fn tls(tcp: TcpStream, host: &str) -> Result<Stream> {
    use std::sync::{Arc, OnceLock};
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().map(|ta| {
            rustls::OwnedTrustAnchor::from_subject_spki_name_constraints(
                ta.subject,
                ta.spki,
                ta.name_constraints,
            )
        }));
        if let Ok(native) = rustls_native_certs::load_native_certs() {
            for cert in native {
                let _ = roots.add(&rustls::Certificate(cert.0)); // a bad system cert is skipped
            }
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_safe_defaults()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    });
    let bad = |msg: String| Error::Http {
        url: String::new(),
        msg,
    };
    let name = rustls::ServerName::try_from(host)
        .map_err(|e| bad(format!("invalid TLS server name: {e}")))?;
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(|e| bad(e.to_string()))?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Option<(bool, &str, u16, &str, &str)>) {
        let got = Target::parse(url).map(|t| (t.https, t.host, t.port, t.authority, t.path));
        let want = expected
            .map(|(s, h, p, a, path)| (s, h.to_string(), p, a.to_string(), path.to_string()));
        assert_eq!(got, want, "{url}");
    }

    #[test]
    fn targets() {
        check(
            "http://127.0.0.1:8081/api/v1/download/app?arch=x86_64",
            Some((
                false,
                "127.0.0.1",
                8081,
                "127.0.0.1:8081",
                "/api/v1/download/app?arch=x86_64",
            )),
        );
        check(
            "https://cdn.example/app",
            Some((true, "cdn.example", 443, "cdn.example", "/app")),
        );
        check("http://h", Some((false, "h", 80, "h", "/")));
        check("http://h?x=1#frag", Some((false, "h", 80, "h", "/?x=1")));
        check("http://[::1]:9/a", Some((false, "::1", 9, "[::1]:9", "/a")));
        check("http://user:pw@h/a", Some((false, "h", 80, "h", "/a")));
        check("ftp://h/a", None);
        check("http://h:port/a", None);
        check("http:///a", None);
    }
}
