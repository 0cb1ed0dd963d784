//! bin-manager's HTTP/1.1 layer: a fixed pool of worker threads fed by one
//! accept thread, requests parsed by httparse, and every limit an exposed
//! server needs — header size and deadline, body size and deadline, idle
//! keep-alive timeout, write timeout. Bodies stream (uploads to disk, file
//! downloads with sendfile). One access-log line per request.

use std::ffi::c_int;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stack of each worker thread (handlers keep their data on the heap).
const WORKER_STACK: usize = 256 * 1024;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Time allowed to send the request head once the first byte arrived.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// …but only this long while other connections wait for a worker.
const BUSY_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time an idle keep-alive connection is kept open (while no other waits).
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle or slow connection checks whether others are waiting.
const IDLE_SLICE: Duration = Duration::from_millis(100);
/// Longest wait for a single read or write to make progress.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Body deadline: this much time, plus one second per this many bytes.
const BODY_BASE: Duration = Duration::from_secs(10);
const BODY_MIN_RATE: u64 = 256 * 1024;

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

struct Body<'a> {
    conn: &'a mut BufReader<TcpStream>,
    left: u64,
    deadline: Instant,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request body too slow",
            ));
        }
        self.conn
            .get_ref()
            .set_read_timeout(Some((self.deadline - now).min(IO_TIMEOUT)))?;
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.conn.read(&mut buf[..max])?;
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
        self.body
            .read_to_end(&mut out)
            .map_err(|e| Response::error(400, &format!("reading the body: {e}")))?;
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

/// A request handler shared by all workers.
pub type Handler = dyn Fn(&mut Request) -> Response + Send + Sync;

/// Serves forever: one accept thread, `workers` worker threads. Connections
/// wait in a bounded queue; while any wait, workers close connections after
/// each response instead of keeping them alive, so no client is starved.
pub fn serve(listener: TcpListener, workers: usize, access_log: bool, handler: Arc<Handler>) -> ! {
    let (tx, rx) = sync_channel::<TcpStream>(workers * 4);
    let rx = Arc::new(Mutex::new(rx));
    let waiting = Arc::new(AtomicUsize::new(0));
    for i in 0..workers.max(1) {
        let (rx, waiting, handler) = (rx.clone(), waiting.clone(), handler.clone());
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&rx, &waiting, access_log, &*handler))
            .unwrap_or_else(|e| panic!("cannot start worker threads: {e}"));
    }
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                waiting.fetch_add(1, Ordering::Relaxed);
                if tx.send(stream).is_err() {
                    panic!("all workers are gone");
                }
            }
            // Out of file descriptors or a connection reset before accept: back off briefly.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn worker(
    rx: &Mutex<Receiver<TcpStream>>,
    waiting: &AtomicUsize,
    access_log: bool,
    handler: &Handler,
) {
    loop {
        // The lock only guards taking the next connection.
        let stream = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(s) => s,
                Err(_) => return,
            },
            Err(_) => return,
        };
        waiting.fetch_sub(1, Ordering::Relaxed);
        let _ = connection(stream, waiting, access_log, handler);
    }
}

/// Serves requests on one connection until it closes, idles, or errs.
fn connection(
    stream: TcpStream,
    waiting: &AtomicUsize,
    access_log: bool,
    handler: &Handler,
) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut conn = BufReader::with_capacity(MAX_HEAD, stream);
    let mut fresh = true;
    loop {
        let Some(head) = read_head(&mut conn, waiting, std::mem::take(&mut fresh))? else {
            return Ok(());
        };
        let started = Instant::now();
        let (mut resp, method, target, keep_alive, body_left) = match parse_head(&head) {
            Err(resp) => (resp, String::from("-"), String::from("-"), false, 0),
            Ok(parsed) => {
                let target = format!(
                    "{}{}{}",
                    parsed.path,
                    if parsed.query.is_empty() { "" } else { "?" },
                    parsed.query
                );
                let method = parsed.method.clone();
                let keep = parsed.keep_alive;
                let deadline = Instant::now()
                    + BODY_BASE
                    + Duration::from_secs(parsed.body_len / BODY_MIN_RATE);
                let mut req = Request {
                    method: parsed.method,
                    path: parsed.path,
                    query: parsed.query,
                    headers: parsed.headers,
                    peer,
                    body_len: parsed.body_len,
                    body: Body {
                        conn: &mut conn,
                        left: parsed.body_len,
                        deadline,
                    },
                };
                let resp = handler(&mut req);
                let left = req.body.left;
                (resp, method, target, keep, left)
            }
        };
        // An unread body would be parsed as the next request: close instead.
        let keep_alive = keep_alive && body_left == 0 && waiting.load(Ordering::Relaxed) == 0;
        let head_only = method == "HEAD";
        let sent = write_response(&mut writer, &mut resp, keep_alive, head_only);
        if access_log {
            crate::log::write(
                crate::log::Level::Info,
                format_args!(
                    "{peer} {method} {target} {} {} {:.1}ms{}",
                    resp.status,
                    if head_only { 0 } else { resp.len() },
                    started.elapsed().as_secs_f64() * 1000.0,
                    if sent.is_err() {
                        " (client went away)"
                    } else {
                        ""
                    }
                ),
            );
        }
        sent?;
        if !keep_alive {
            if body_left > 0 {
                linger(&mut conn);
            }
            return Ok(());
        }
    }
}

/// After an early answer (413, 401) with body bytes still unread: stop
/// sending and read off what the client is still sending, briefly, so that
/// closing does not become a reset that destroys the answer in flight.
fn linger(conn: &mut BufReader<TcpStream>) {
    let _ = conn.get_ref().shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 16 * 1024];
    let mut left: usize = 8 << 20;
    while left > 0 && Instant::now() < until {
        let _ = conn
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Reads one request head. `None` when the client closed or idled out
/// before sending anything; a slow or oversized head is an error.
fn read_head(
    conn: &mut BufReader<TcpStream>,
    waiting: &AtomicUsize,
    fresh: bool,
) -> io::Result<Option<Vec<u8>>> {
    // Waiting for the first byte, in short slices. A kept-alive connection
    // that idles gives its worker up at once when others are queued for one;
    // a fresh connection has not been answered yet and gets its full time
    // (the head deadline below, shortened while others wait).
    let idle_until = Instant::now() + IDLE_TIMEOUT;
    let fresh_until = Instant::now()
        + if waiting.load(Ordering::Relaxed) > 0 {
            BUSY_HEAD_TIMEOUT
        } else {
            HEAD_TIMEOUT
        };
    conn.get_ref().set_read_timeout(Some(IDLE_SLICE))?;
    loop {
        match conn.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let give_up = if fresh {
                    Instant::now() >= fresh_until
                } else {
                    waiting.load(Ordering::Relaxed) > 0 || Instant::now() >= idle_until
                };
                if give_up {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let started = Instant::now();
    let mut head = Vec::with_capacity(1024);
    loop {
        let now = Instant::now();
        // A slow head may take HEAD_TIMEOUT while the pool is free, but only
        // BUSY_HEAD_TIMEOUT once other connections wait for a worker.
        let limit = if waiting.load(Ordering::Relaxed) > 0 {
            BUSY_HEAD_TIMEOUT
        } else {
            HEAD_TIMEOUT
        };
        let deadline = started + limit;
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        conn.get_ref()
            .set_read_timeout(Some((deadline - now).min(IDLE_SLICE)))?;
        let buf = match conn.fill_buf() {
            Ok(buf) => buf,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "request head cut short",
            ));
        }
        // Take bytes up to and including the blank line, never beyond.
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(buf);
        let end = find_blank_line(&head[scan_from..]).map(|i| scan_from + i);
        let consumed = match end {
            Some(end) => buf.len() - (head.len() - end),
            None => buf.len(),
        };
        conn.consume(consumed);
        if let Some(end) = end {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Some(head)); // parse_head answers 431
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

struct Head {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body_len: u64,
    keep_alive: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Response> {
    if head.len() > MAX_HEAD {
        return Err(Response::error(431, "request head too large"));
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
    let body_len = match get("content-length") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| Response::error(400, "invalid Content-Length"))?,
    };
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

fn write_response(
    out: &mut TcpStream,
    resp: &mut Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let reason = reason(resp.status);
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\n",
        resp.status,
        resp.len()
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    match (&mut resp.body, head_only) {
        (Payload::Bytes(bytes), false) if bytes.len() <= 64 * 1024 => {
            // One write for head and small body.
            let mut all = head.into_bytes();
            all.extend_from_slice(bytes);
            out.write_all(&all)?;
        }
        (Payload::Bytes(bytes), false) => {
            out.write_all(head.as_bytes())?;
            out.write_all(bytes)?;
        }
        (Payload::File { file, start, len }, false) => {
            out.write_all(head.as_bytes())?;
            send_file(out, file, *start, *len)?;
        }
        (_, true) => out.write_all(head.as_bytes())?,
    }
    out.flush()
}

// What std does not wrap: sendfile(2) (std's io::copy will not use it from
// a file to a socket) and listen(2) (std fixes the backlog at 128).
extern "C" {
    fn sendfile(out_fd: c_int, in_fd: c_int, offset: *mut i64, count: usize) -> isize;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
}

/// Sends `len` bytes of `file` from `start` with sendfile(2): the bytes go
/// from the page cache to the socket without passing through this process.
/// The socket's write timeout bounds each call. Falls back to read/write
/// where sendfile is refused.
fn send_file(
    out: &mut TcpStream,
    file: &mut std::fs::File,
    start: u64,
    len: u64,
) -> io::Result<()> {
    let mut offset =
        i64::try_from(start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut left = len;
    while left > 0 {
        let count = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both descriptors are open for the duration of the call;
        // `offset` is a valid i64 the kernel advances.
        let n = unsafe { sendfile(out.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than announced",
                ))
            }
            n if n > 0 => left -= n as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(4) => continue,                         // EINTR
                    Some(22) | Some(38) if left == len => break, // EINVAL, ENOSYS: fall back
                    _ if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client stopped reading",
                        ));
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    if left > 0 {
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(start))?;
        let sent = io::copy(&mut Read::take(&mut *file, len), out)?;
        if sent != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than announced",
            ));
        }
    }
    Ok(())
}

/// Raises the listen backlog from std's 128, so a burst of agents (a fleet's
/// cron minute) queues instead of retransmitting SYNs. Linux applies a second
/// listen(2) to a listening socket.
pub fn widen_backlog(listener: &TcpListener, backlog: i32) {
    // SAFETY: the descriptor belongs to a live listening socket.
    unsafe {
        listen(listener.as_raw_fd(), backlog);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
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
        assert_eq!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]).err().unwrap().status,
            431
        );
    }
}
