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

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stack of each worker thread (handlers keep their data on the heap).
const WORKER_STACK: usize = 256 * 1024;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Time allowed for a new connection's first request head, and for any
/// request head once its first byte arrived.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a single read or write to make progress.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Body deadline: this much time, plus one second per this many bytes.
const BODY_BASE: Duration = Duration::from_secs(10);
const BODY_MIN_RATE: u64 = 256 * 1024;
/// Event loops at most (one per core up to this).
const MAX_LOOPS: usize = 8;
/// How often a loop checks its connections' deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Bytes read from a socket at a time by a loop.
const READ_CHUNK: usize = 16 * 1024;
/// Requests waiting for a worker, per worker, before new ones get 503.
const QUEUE_PER_WORKER: usize = 16;
/// The epoll token of a loop's wake-up eventfd (sockets use their fd).
const WAKE: u64 = u64::MAX;

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
        if conn.pos == conn.buf.len() {
            conn.stream
                .set_read_timeout(Some((self.deadline - now).min(IO_TIMEOUT)))?;
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = conn.read(&mut buf[..max])?;
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

/// A request handler shared by all threads (see [`Context`]).
pub type Handler = dyn Fn(&mut Request, Context) -> Option<Response> + Send + Sync;

/// A connection between requests: its socket, the bytes received but not yet
/// consumed, and (on a loop) the answer still being sent.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// The loop that owns it between requests.
    home: usize,
    /// Bytes received; `buf[..pos]` are consumed (by a worker).
    buf: Vec<u8>,
    pos: usize,
    /// How far `buf` has been searched for the end of a head.
    scanned: usize,
    /// An answer being sent by a loop; `out[..sent]` are sent.
    out: Vec<u8>,
    sent: usize,
    /// Close once `out` is sent.
    close_after: bool,
    /// Registered for writability (while `out` is pending) rather than reads.
    writing: bool,
    /// When its loop gives up on it (idle, slow head, stalled answer).
    deadline: Instant,
}

impl Conn {
    fn new(stream: TcpStream, peer: SocketAddr, home: usize) -> Conn {
        Conn {
            stream,
            peer,
            home,
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            out: Vec::new(),
            sent: 0,
            close_after: false,
            writing: false,
            deadline: Instant::now() + HEAD_TIMEOUT,
        }
    }

    /// The end of the first complete request head in the buffer.
    fn head_end(&mut self) -> Option<usize> {
        let from = self.scanned.saturating_sub(3);
        self.scanned = self.buf.len();
        find_blank_line(&self.buf[from..]).map(|i| from + i)
    }

    /// Drops the consumed bytes.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.pos = 0;
        self.scanned = 0;
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.buf.len() {
            let n = out.len().min(self.buf.len() - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        (&self.stream).read(out)
    }
}

/// One event loop's epoll instance, and its inbox for connections handed
/// over by the accept thread and the workers (with an eventfd to wake it).
struct Loop {
    epoll: OwnedFd,
    wake: OwnedFd,
    inbox: Mutex<Vec<Conn>>,
}

impl Loop {
    fn new() -> io::Result<Loop> {
        // SAFETY: plain syscalls; each descriptor is checked, then owned once.
        let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let wake = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, wake.as_raw_fd(), READ, WAKE)?;
        Ok(Loop {
            epoll,
            wake,
            inbox: Mutex::new(Vec::new()),
        })
    }

    /// Hands a connection to this loop (from any thread).
    fn give(&self, conn: Conn) {
        lock(&self.inbox).push(conn);
        // After the push: the loop drains the eventfd before it empties the
        // inbox, so a connection is never left behind without a wake-up.
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Takes what was handed over since the last wake-up (on the loop).
    fn take(&self) -> Vec<Conn> {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        std::mem::take(&mut *lock(&self.inbox))
    }
}

/// What the loops and workers share.
struct Shared {
    loops: Vec<Loop>,
    queue: SyncSender<Conn>,
    handler: Arc<Handler>,
    access_log: bool,
}

/// Serves forever: one accept thread, one event loop per core, `workers`
/// worker threads for the requests that may block.
pub fn serve(listener: TcpListener, workers: usize, access_log: bool, handler: Arc<Handler>) -> ! {
    raise_fd_limit();
    let workers = workers.max(1);
    let loops = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_LOOPS);
    let (queue, rx) = sync_channel::<Conn>(workers * QUEUE_PER_WORKER);
    let shared = Arc::new(Shared {
        loops: (0..loops)
            .map(|_| Loop::new())
            .collect::<io::Result<_>>()
            .unwrap_or_else(|e| panic!("cannot create the event loops: {e}")),
        queue,
        handler,
        access_log,
    });
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..workers {
        let (rx, shared) = (rx.clone(), shared.clone());
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&rx, &shared))
            .unwrap_or_else(|e| panic!("cannot start worker threads: {e}"));
    }
    for i in 0..loops {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("loop-{i}"))
            .spawn(move || Owner::new(i, &shared).run())
            .unwrap_or_else(|e| panic!("cannot start the event loops: {e}"));
    }
    let mut next = 0;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                // Answers go out at once; a client that stops reading cannot
                // hold a worker for longer than the write timeout.
                let _ = stream.set_nodelay(true);
                let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                shared.loops[next].give(Conn::new(stream, peer, next));
                next = (next + 1) % loops;
            }
            // Out of file descriptors or a connection reset before accept: back off briefly.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn worker(rx: &Mutex<Receiver<Conn>>, shared: &Shared) {
    loop {
        // The lock only guards taking the next request.
        let Ok(conn) = lock(rx).recv() else { return };
        let home = conn.home;
        if let Some(conn) = serve_one(conn, shared) {
            shared.loops[home].give(conn);
        }
    }
}

/// What a loop does with a connection it has driven.
enum Next {
    /// Keep it until epoll reports it ready.
    Wait,
    /// Close it.
    Close,
    /// Its request needs a worker.
    Worker,
}

/// An event loop and the connections it owns, indexed by descriptor.
struct Owner<'a> {
    shared: &'a Shared,
    me: usize,
    conns: Vec<Option<Conn>>,
    scratch: Vec<u8>,
}

impl<'a> Owner<'a> {
    fn new(me: usize, shared: &'a Shared) -> Self {
        Owner {
            shared,
            me,
            conns: Vec::new(),
            scratch: vec![0; READ_CHUNK],
        }
    }

    fn epoll(&self) -> &OwnedFd {
        &self.shared.loops[self.me].epoll
    }

    fn run(mut self) -> ! {
        let empty = libc::epoll_event { events: 0, u64: 0 };
        let mut events = vec![empty; 256];
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            // SAFETY: `events` is a live buffer of `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll().as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    wait.as_millis() as i32 + 1,
                )
            };
            for ev in &events[..n.max(0) as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == WAKE {
                    for conn in self.shared.loops[self.me].take() {
                        self.adopt(conn);
                    }
                } else if let Some(conn) = self.conns.get_mut(token as usize).and_then(Option::take)
                {
                    self.step(conn, flags & (READ | HANGUP) != 0);
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.sweep(now);
                next_tick = now + TICK;
            }
        }
    }

    /// Takes over a connection from the accept thread or a worker.
    fn adopt(&mut self, mut conn: Conn) {
        let fd = conn.stream.as_raw_fd();
        if epoll_ctl(self.epoll(), libc::EPOLL_CTL_ADD, fd, READ, fd as u64).is_err() {
            return; // dropped: closed
        }
        conn.writing = false;
        // A request a worker left in the buffer (pipelined) gets no event.
        self.step(conn, false);
    }

    fn step(&mut self, mut conn: Conn, readable: bool) {
        let fd = conn.stream.as_raw_fd();
        match drive(&mut conn, self.shared, readable, &mut self.scratch) {
            Next::Wait => {
                let writing = conn.sent < conn.out.len();
                if writing != conn.writing {
                    let interest = if writing { WRITE } else { READ };
                    if epoll_ctl(self.epoll(), libc::EPOLL_CTL_MOD, fd, interest, fd as u64)
                        .is_err()
                    {
                        return;
                    }
                    conn.writing = writing;
                }
                let slot = fd as usize;
                if self.conns.len() <= slot {
                    self.conns.resize_with(slot + 1, || None);
                }
                self.conns[slot] = Some(conn);
            }
            // Closing the socket also removes it from epoll.
            Next::Close => {}
            Next::Worker => {
                let _ = epoll_ctl(self.epoll(), libc::EPOLL_CTL_DEL, fd, 0, 0);
                match self.shared.queue.try_send(conn) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    Err(TrySendError::Full(mut conn)) => {
                        // Every worker busy and the queue full: say so, close.
                        let mut resp = Response::error(
                            503,
                            "server busy: every worker is taken; retry shortly",
                        );
                        resp.headers.push(("Retry-After", "1".into()));
                        conn.consume(conn.buf.len());
                        conn.out = encode(&resp, false, true);
                        conn.sent = 0;
                        conn.close_after = true;
                        self.adopt(conn);
                    }
                }
            }
        }
    }

    /// Closes the connections past their deadline; a half-sent head gets a 408.
    fn sweep(&mut self, now: Instant) {
        for slot in &mut self.conns {
            if let Some(conn) = slot.take_if(|c| now >= c.deadline) {
                if !conn.buf.is_empty() && conn.sent == conn.out.len() {
                    let resp = Response::error(408, "request head too slow");
                    let _ = send_now(&conn.stream, &encode(&resp, false, true));
                }
            }
        }
    }
}

/// Sends what is pending, answers the complete requests in the buffer that
/// can be answered here, and reads once more when `readable`.
fn drive(c: &mut Conn, shared: &Shared, mut readable: bool, scratch: &mut [u8]) -> Next {
    loop {
        if c.sent < c.out.len() {
            match send_now(&c.stream, &c.out[c.sent..]) {
                Ok(n) => {
                    c.sent += n;
                    c.deadline = Instant::now() + IO_TIMEOUT;
                    if c.sent < c.out.len() {
                        return Next::Wait;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close,
            }
            c.out.clear();
            c.sent = 0;
            if c.close_after {
                return Next::Close;
            }
            c.deadline = Instant::now()
                + if c.buf.is_empty() {
                    IDLE_TIMEOUT
                } else {
                    HEAD_TIMEOUT
                };
        }
        if let Some(end) = c.head_end() {
            if !answer_here(c, end, shared) {
                return Next::Worker;
            }
            continue;
        }
        if c.buf.len() > MAX_HEAD {
            return Next::Worker; // which answers 431
        }
        if !readable {
            return Next::Wait;
        }
        match recv_now(&c.stream, scratch) {
            Ok(0) => return Next::Close,
            Ok(n) => {
                if c.buf.is_empty() {
                    c.deadline = Instant::now() + HEAD_TIMEOUT;
                }
                c.buf.extend_from_slice(&scratch[..n]);
                // A full read may have left more behind.
                readable = n == scratch.len();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
}

/// Answers the request whose head ends at `end` on the loop, if the handler
/// can without blocking; `false` sends it to a worker (nothing consumed).
fn answer_here(c: &mut Conn, end: usize, shared: &Shared) -> bool {
    let started = Instant::now();
    let Ok(head) = parse_head(&c.buf[..end]) else {
        return false; // the worker answers the error
    };
    if head.body_len > 0 {
        return false;
    }
    let (method, target, keep_alive) = (head.method.clone(), head.target(), head.keep_alive);
    let mut req = head.into_request(c.peer, None, started);
    let Some(resp) = (shared.handler)(&mut req, Context::EventLoop) else {
        return false;
    };
    if matches!(resp.body, Payload::File { .. }) {
        return false; // files are sent by workers
    }
    let head_only = method == "HEAD";
    c.out = encode(&resp, keep_alive, !head_only);
    c.sent = 0;
    c.close_after = !keep_alive;
    c.consume(end);
    if shared.access_log {
        log_request(c.peer, &method, &target, &resp, head_only, started, true);
    }
    true
}

/// Answers the one request at the start of the connection's buffer, with
/// blocking I/O; returns the connection when it stays open.
fn serve_one(mut c: Conn, shared: &Shared) -> Option<Conn> {
    let started = Instant::now();
    let end = find_blank_line(&c.buf).unwrap_or(c.buf.len());
    let parsed = parse_head(&c.buf[..end]);
    c.pos = end;
    let peer = c.peer;
    let (mut resp, method, target, keep_alive, body_left) = match parsed {
        Err(resp) => (resp, String::from("-"), String::from("-"), false, 0),
        Ok(head) => {
            let (method, target, keep) = (head.method.clone(), head.target(), head.keep_alive);
            let mut req = head.into_request(peer, Some(&mut c), Instant::now());
            let resp = (shared.handler)(&mut req, Context::Worker)
                .unwrap_or_else(|| Response::error(500, "no answer for this request"));
            let left = req.body.left;
            (resp, method, target, keep, left)
        }
    };
    // An unread body would be parsed as the next request: close instead.
    let keep_alive = keep_alive && body_left == 0;
    let head_only = method == "HEAD";
    let sent = write_response(&c.stream, &mut resp, keep_alive, head_only);
    if shared.access_log {
        log_request(
            peer,
            &method,
            &target,
            &resp,
            head_only,
            started,
            sent.is_ok(),
        );
    }
    if sent.is_err() {
        return None;
    }
    if !keep_alive {
        if body_left > 0 {
            linger(&mut c);
        }
        return None;
    }
    c.consume(c.pos);
    c.deadline = Instant::now()
        + if c.buf.is_empty() {
            IDLE_TIMEOUT
        } else {
            HEAD_TIMEOUT
        };
    Some(c)
}

fn log_request(
    peer: SocketAddr,
    method: &str,
    target: &str,
    resp: &Response,
    head_only: bool,
    started: Instant,
    sent: bool,
) {
    crate::log::write(
        crate::log::Level::Info,
        format_args!(
            "{peer} {method} {target} {} {} {:.1}ms{}",
            resp.status,
            if head_only { 0 } else { resp.len() },
            started.elapsed().as_secs_f64() * 1000.0,
            if sent { "" } else { " (client went away)" }
        ),
    );
}

/// After an early answer (413, 401) with body bytes still unread: stop
/// sending and read off what the client is still sending, briefly, so that
/// closing does not become a reset that destroys the answer in flight.
fn linger(conn: &mut Conn) {
    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 16 * 1024];
    let mut left: usize = 8 << 20;
    while left > 0 && Instant::now() < until {
        let _ = conn
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)));
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

const READ: u32 = libc::EPOLLIN as u32;
const WRITE: u32 = libc::EPOLLOUT as u32;
const HANGUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is live for the call; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// send(2) that never blocks (the socket itself stays blocking for workers).
fn send_now(s: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `bytes` is a live slice of `bytes.len()` bytes.
    let n = unsafe { libc::send(s.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recv(2) that never blocks.
fn recv_now(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Lifts the soft limit on open files to the hard one: every connection is a
/// descriptor, and the usual soft default (1024) is less than a busy server
/// holds.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit the kernel reads and writes.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
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

impl Head {
    /// The request handlers see; its body (if any) comes from `conn`, within
    /// the body deadline counted from `now`.
    fn into_request<'a>(
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
    fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
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

/// The status line and headers, then the body if `with_body` and in memory.
fn encode(resp: &Response, keep_alive: bool, with_body: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + if with_body { resp.len() as usize } else { 0 });
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.len()
    );
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

fn write_response(
    mut out: &TcpStream,
    resp: &mut Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    // Head and a small body in one write; a large body after it, uncopied.
    let small = matches!(&resp.body, Payload::Bytes(b) if b.len() <= 64 * 1024);
    out.write_all(&encode(resp, keep_alive, small && !head_only))?;
    match (&mut resp.body, head_only) {
        (_, true) => {}
        (Payload::Bytes(bytes), false) => {
            if !small {
                out.write_all(bytes)?;
            }
        }
        (Payload::File { file, start, len }, false) => send_file(out, file, *start, *len)?,
    }
    out.flush()
}

/// Sends `len` bytes of `file` from `start` with sendfile(2): the bytes go
/// from the page cache to the socket without passing through this process.
/// The socket's write timeout bounds each call. Falls back to read/write
/// where sendfile is refused.
fn send_file(
    mut out: &TcpStream,
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
        let n = unsafe { libc::sendfile(out.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
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
        let sent = io::copy(&mut Read::take(&mut *file, len), &mut out)?;
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
        libc::listen(listener.as_raw_fd(), backlog);
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
        assert_eq!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]).err().unwrap().status,
            431
        );
    }
}
