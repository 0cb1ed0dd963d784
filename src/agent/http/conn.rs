//! Connections: TCP to every address a name resolves to (IPv6 and IPv4, each
//! with the connect timeout), TLS through rustls, a tunnel through an HTTP
//! proxy (`CONNECT`), and a deadline on every read and write.

use super::url::{bracket, Target};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why a connection could not be made, already worded for the operator.
pub struct Failed {
    /// What went wrong.
    pub msg: String,
    /// A malformed answer (a retry would only repeat it), not network trouble.
    pub protocol: bool,
}

impl Failed {
    fn net(msg: String) -> Failed {
        Failed {
            msg,
            protocol: false,
        }
    }
}

/// Connects to `target`, directly or through `proxy` (an `http://` proxy:
/// a tunnel for `https://` targets, the caller sends absolute-form requests
/// for `http://` ones). Nothing of the caller's credentials goes to the proxy.
pub fn open(
    target: &Target,
    proxy: Option<&Target>,
    timeout: Duration,
    deadline: Instant,
) -> Result<Conn, Failed> {
    let Some(proxy) = proxy else {
        let tcp = dial(&target.host, target.port, timeout).map_err(|e| {
            Failed::net(describe(
                &e,
                timeout,
                "is bin-manager running and the address right?",
            ))
        })?;
        return Conn::new(Stream::Plain(tcp), target, deadline);
    };
    let at = format!("proxy {}", proxy.authority);
    let tcp = dial(&proxy.host, proxy.port, timeout).map_err(|e| {
        Failed::net(format!(
            "{at}: {}",
            describe(&e, timeout, "is the proxy running?")
        ))
    })?;
    if !target.https {
        return Conn::new(Stream::Plain(tcp), target, deadline);
    }
    let mut conn = Conn {
        stream: Stream::Plain(tcp),
        deadline,
        armed: std::cell::Cell::new(None),
    };
    let authority = format!("{}:{}", bracket(&target.host), target.port);
    let mut ask = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: bin-proxy/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(auth) = proxy.userinfo.as_deref() {
        ask.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(&super::percent_decode(auth))
        ));
    }
    ask.push_str("\r\n");
    conn.write_all(ask.as_bytes())
        .map_err(|e| Failed::net(format!("{at}: {}", describe(&e, timeout, ""))))?;
    // Read the proxy's answer byte by byte: nothing after its blank line may
    // be taken from the tunnel.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        match conn.read(&mut byte) {
            Ok(0) => {
                return Err(Failed::net(format!(
                    "{at} closed the connection before answering CONNECT {authority}"
                )))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failed::net(format!("{at}: {}", describe(&e, timeout, "")))),
        }
        if head.len() > super::MAX_HEAD {
            return Err(Failed {
                msg: format!("{at} answered CONNECT with headers larger than 64 KiB"),
                protocol: true,
            });
        }
    }
    let status_line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(b""));
    let status_line = status_line.trim();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') {
        return Err(Failed::net(format!(
            "{at} refused CONNECT {authority}: \"{}\"",
            crate::protocol::one_line(status_line, 200)
        )));
    }
    Conn::new(conn.stream, target, deadline) // TLS inside the tunnel
}

fn dial(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "could not resolve the host name");
    let addrs = (host, port).to_socket_addrs().map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("could not resolve the host name \"{host}\" ({e})"),
        )
    })?;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// An I/O error in the operator's words; `hint` follows a refused connection.
pub fn describe(e: &io::Error, timeout: Duration, hint: &str) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused if hint.is_empty() => "connection refused".to_string(),
        io::ErrorKind::ConnectionRefused => format!("connection refused ({hint})"),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("no answer within {} s", timeout.as_secs())
        }
        _ => match e.to_string() {
            m if m.contains("invalid peer certificate") => {
                format!("{m} (is the server's CA in the system store, or in SSL_CERT_FILE?)")
            }
            m => m,
        },
    }
}

/// A connection, plain or TLS, whose every read and write respects `deadline`.
pub struct Conn {
    stream: Stream,
    /// When every read and write must have finished.
    pub deadline: Instant,
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
    fn new(stream: Stream, target: &Target, deadline: Instant) -> Result<Conn, Failed> {
        let stream = match stream {
            Stream::Plain(tcp) if target.https => tls(tcp, &target.host)?,
            other => other,
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

    /// Moves the deadline (the head has its own, the body the whole one's).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
        self.armed.set(None);
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

/// Reads one line of at most `max` bytes (the chunked framing's).
pub fn line(r: &mut BufReader<Conn>, max: u64) -> io::Result<String> {
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

/// Standard base64 (for `Proxy-Authorization: Basic`).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(not(feature = "tls"))]
fn tls(_: TcpStream, _: &str) -> Result<Stream, Failed> {
    Err(Failed {
        msg: "this bin-proxy was built without TLS; use an http:// URL".into(),
        protocol: false,
    })
}

/// Wraps a connection in TLS, trusting the bundled Mozilla roots and the
/// system store (`SSL_CERT_FILE` included).
#[cfg(feature = "tls")]
fn tls(tcp: TcpStream, host: &str) -> Result<Stream, Failed> {
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
    let bad = Failed::net;
    let name = rustls::ServerName::try_from(host)
        .map_err(|e| bad(format!("invalid TLS server name: {e}")))?;
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(|e| bad(e.to_string()))?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_as_in_rfc_4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("user:pass", "dXNlcjpwYXNz"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), coded);
        }
    }
}
