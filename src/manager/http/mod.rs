//! bin-manager's HTTP/1.1 layer. Event loops (epoll, one per core) own every
//! connection while it is idle or still sending its request head, and answer
//! on the spot the requests that cannot block — heartbeats and build lookups
//! whose hashes are cached, which is what a fleet sends. Everything else
//! (request bodies, downloads, disk writes, hashing a new file, large
//! answers) goes to a fixed pool of worker threads with blocking I/O and
//! per-operation timeouts; after the answer the connection goes back to its
//! loop. Requests are parsed by httparse, with every limit an exposed server
//! needs: header size and deadline, body size and deadline, idle keep-alive
//! timeout, write timeout. Bodies stream (uploads to disk, file downloads
//! with sendfile). One access-log line per request.
//!
//! The layer's parts: this file holds what handlers see (the request and
//! response types); [`codec`] turns bytes into request heads and responses
//! into bytes; [`server`] owns the sockets (accept thread, event loops,
//! workers). The syscalls they need are wrapped in `crate::sys`.

mod codec;
mod server;

pub use server::{serve, widen_backlog, Options, Stopped};

use server::Conn;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest wait for a single read or write to make progress.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a request is being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// On an event loop: the handler must not block (no disk writes, no
    /// hashing, no file bodies) and returns `None`, before doing anything,
    /// to have the request answered by a worker instead.
    EventLoop,
    /// On a worker thread: the handler may block, and must answer.
    Worker,
}

/// One parsed request. The body is read through [`Request::body`].
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, still percent-encoded, without the query.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The client's address.
    pub peer: SocketAddr,
    /// `Content-Length` (0 when absent).
    pub body_len: u64,
    body: Body<'a>,
}

/// A request body: the connection's buffered bytes, then the socket.
struct Body<'a> {
    conn: Option<&'a mut Conn>,
    left: u64,
    deadline: Instant,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(conn) = self.conn.as_deref_mut().filter(|_| self.left > 0) else {
            return Ok(0);
        };
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request body too slow",
            ));
        }
        conn.before_socket_read((self.deadline - now).min(IO_TIMEOUT))?;
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = conn.read(&mut buf[..max]).map_err(|e| match e.kind() {
            // A socket read timeout says WouldBlock.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "request body too slow")
            }
            _ => e,
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "request body cut short",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

impl Request<'_> {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as a reader (yields exactly `Content-Length` bytes or an error).
    pub fn body(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// Reads the whole body if it is at most `max` bytes.
    pub fn body_bytes(&mut self, max: u64) -> Result<Vec<u8>, Response> {
        if self.body_len > max {
            return Err(Response::error(413, "request body too large"));
        }
        let mut out = Vec::with_capacity(self.body_len as usize);
        self.body.read_to_end(&mut out).map_err(|e| {
            let status = if e.kind() == io::ErrorKind::TimedOut {
                408
            } else {
                400
            };
            Response::error(status, &format!("reading the body: {e}"))
        })?;
        Ok(out)
    }
}

/// What a handler answers.
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Payload,
}

/// A response body.
pub enum Payload {
    /// In memory.
    Bytes(Vec<u8>),
    /// `len` bytes of an open file from offset `start` (streamed).
    File {
        file: std::fs::File,
        start: u64,
        len: u64,
    },
}

impl Response {
    /// A plain-text response.
    pub fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Payload::Bytes(format!("{text}\n").into_bytes()),
        }
    }

    /// An error as the protocol's JSON envelope, `code` = the HTTP status.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(
            status,
            crate::protocol::envelope(status, message, crate::json::Value::Null),
        )
    }

    /// A JSON response.
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: Payload::Bytes(body.into_bytes()),
        }
    }

    fn len(&self) -> u64 {
        match &self.body {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }
}

/// The client a peer address stands for, for per-client limits: its IPv4
/// address, or the /64 of an IPv6 one (one host usually holds a whole /64).
pub fn client_of(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// A request handler shared by all threads (see [`Context`]).
pub type Handler = dyn Fn(&mut Request, Context) -> Option<Response> + Send + Sync;
