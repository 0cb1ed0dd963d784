//! The sockets: one accept thread, one epoll event loop per core (up to
//! eight) owning every connection while it is idle or sending its head and
//! answering what cannot block, and a fixed pool of workers for what can
//! (bodies, downloads, disk writes), each connection handed back to its
//! loop after the answer. Every wait has a deadline. On SIGTERM or SIGINT
//! the accept thread stops accepting and waits (bounded) for the requests
//! already handed to workers — downloads included — to finish.

use super::codec::{bare_lf, encode, find_blank_line, parse_head, scan_head, Scan};
use super::{client_of, Context, Handler, Payload, Response, IO_TIMEOUT, MAX_HEAD};
use crate::sys;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stack of each worker thread (handlers keep their data on the heap).
const WORKER_STACK: usize = 256 * 1024;
/// Time allowed for a new connection's first request head, and for any
/// request head once its first byte arrived.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Event loops at most (one per core up to this).
const MAX_LOOPS: usize = 8;
/// How often a loop checks its connections' deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Bytes read from a socket at a time by a loop.
const READ_CHUNK: usize = 16 * 1024;
/// Requests waiting for a worker, per worker, before new ones get 503.
const QUEUE_PER_WORKER: usize = 16;
/// How long requests in flight may take to finish after SIGTERM.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The epoll token of a loop's wake-up eventfd (sockets use their fd).
const WAKE: u64 = u64::MAX;
const READ: u32 = sys::EPOLLIN;
const WRITE: u32 = sys::EPOLLOUT;
const HANGUP: u32 = sys::EPOLLHUP;

/// A connection between requests: its socket, the bytes received but not yet
/// consumed, and (on a loop) the answer still being sent.
pub(super) struct Conn {
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

    /// Where the first request head in the buffer ends, if it is complete.
    fn head_end(&mut self) -> Scan {
        let from = self.scanned;
        self.scanned = self.buf.len();
        scan_head(&self.buf, from)
    }

    /// Drops the consumed bytes.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.pos = 0;
        self.scanned = 0;
    }
}

impl Conn {
    /// Bounds the next read by `timeout` when it will come from the socket
    /// (buffered bytes need no wait).
    pub(super) fn before_socket_read(&self, timeout: Duration) -> io::Result<()> {
        if self.pos == self.buf.len() {
            self.stream.set_read_timeout(Some(timeout))?;
        }
        Ok(())
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
        let epoll = sys::epoll_create()?;
        let wake = sys::eventfd()?;
        sys::epoll_ctl(&epoll, sys::EPOLL_CTL_ADD, wake.as_raw_fd(), READ, WAKE)?;
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
        sys::eventfd_signal(&self.wake);
    }

    /// Takes what was handed over since the last wake-up (on the loop).
    fn take(&self) -> Vec<Conn> {
        sys::eventfd_drain(&self.wake);
        std::mem::take(&mut *lock(&self.inbox))
    }
}

/// How the server shares itself out.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Worker threads for the requests that may block.
    pub workers: usize,
    /// Requests from one client address (an IPv4 address, an IPv6 /64) that
    /// may be queued for or held by workers at once; the next one gets 503
    /// at once. Keeps one address (a host dribbling request bodies, say)
    /// from taking every worker.
    pub per_client: usize,
    /// One stderr line per request.
    pub access_log: bool,
}

/// What the loops and workers share.
struct Shared {
    loops: Vec<Loop>,
    queue: SyncSender<Conn>,
    handler: Arc<Handler>,
    access_log: bool,
    per_client: usize,
    /// Requests queued for or held by a worker, per client address. An
    /// entry goes when its count drops to zero, so the table is never
    /// larger than the requests in flight.
    shares: Mutex<HashMap<IpAddr, usize>>,
    /// Requests handed to the workers and not yet answered (queued or
    /// running), all addresses together: what a stop waits for.
    in_flight: AtomicUsize,
}

impl Shared {
    /// Counts one more worker request for `peer`; `false` (nothing
    /// counted) when it already has its share.
    fn take_share(&self, peer: SocketAddr) -> bool {
        let mut table = lock(&self.shares);
        let n = table.entry(client_of(peer)).or_insert(0);
        if *n >= self.per_client {
            return false;
        }
        *n += 1;
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Gives back what [`Shared::take_share`] counted.
    fn give_share(&self, peer: SocketAddr) {
        let mut table = lock(&self.shares);
        let key = client_of(peer);
        if let Some(n) = table.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(&key);
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// How serving ended.
pub struct Stopped {
    /// The signal that ended it.
    pub signal: i32,
    /// Requests that were being answered when it came.
    pub in_flight: usize,
    /// Requests still unanswered when the wait for them ended.
    pub left: usize,
}

/// Serves until `stop` (a [`sys::signal_fd`]) reads a signal: one accept
/// thread (this one), one event loop per core, workers for the requests
/// that may block. Then stops accepting and waits up to [`DRAIN_LIMIT`] for
/// the requests in flight.
pub fn serve(
    listener: TcpListener,
    opts: Options,
    handler: Arc<Handler>,
    stop: &OwnedFd,
) -> Stopped {
    sys::raise_fd_limit();
    let workers = opts.workers.max(1);
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
        access_log: opts.access_log,
        per_client: opts.per_client.max(1),
        shares: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
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
    // Non-blocking, so that one poll waits for a connection or a signal.
    let _ = listener.set_nonblocking(true);
    let fds = [listener.as_raw_fd(), stop.as_raw_fd()];
    let mut next = 0;
    let signal = loop {
        let ready = sys::poll_readable(&fds, -1).unwrap_or_else(|_| {
            // poll(2) itself failing (ENOMEM): back off, then try the accept.
            std::thread::sleep(Duration::from_millis(10));
            vec![true, false]
        });
        if ready[1] {
            if let Some(sig) = sys::read_signal(stop) {
                break sig;
            }
        }
        if !ready[0] {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                // Accepted sockets block (the flag is not inherited). Answers
                // go out at once; a client that stops reading cannot hold a
                // worker for longer than the write timeout.
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                shared.loops[next].give(Conn::new(stream, peer, next));
                next = (next + 1) % loops;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Out of file descriptors or a connection reset before accept: back off briefly.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    drop(listener); // new connections are refused from here on
    let in_flight = shared.in_flight.load(Ordering::SeqCst);
    let deadline = Instant::now() + DRAIN_LIMIT;
    while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Stopped {
        signal,
        in_flight,
        left: shared.in_flight.load(Ordering::SeqCst),
    }
}

fn worker(rx: &Mutex<Receiver<Conn>>, shared: &Shared) {
    loop {
        // The lock only guards taking the next request.
        let Ok(conn) = lock(rx).recv() else { return };
        let (home, peer) = (conn.home, conn.peer);
        let kept = serve_one(conn, shared);
        shared.give_share(peer);
        if let Some(conn) = kept {
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
    /// Answer this and close.
    Refuse(Response),
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
        let mut events = vec![sys::epoll_event(); 256];
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let timeout_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX - 1) + 1;
            let n = sys::epoll_wait(self.epoll(), &mut events, timeout_ms);
            for ev in &events[..n] {
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
        if sys::epoll_ctl(self.epoll(), sys::EPOLL_CTL_ADD, fd, READ, fd as u64).is_err() {
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
                    if sys::epoll_ctl(self.epoll(), sys::EPOLL_CTL_MOD, fd, interest, fd as u64)
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
                let _ = sys::epoll_ctl(self.epoll(), sys::EPOLL_CTL_DEL, fd, 0, 0);
                let peer = conn.peer;
                if !self.shared.take_share(peer) {
                    return self.refuse(
                        conn,
                        "too many requests from your address at once; retry shortly",
                    );
                }
                match self.shared.queue.try_send(conn) {
                    Ok(()) => {}
                    Err(TrySendError::Disconnected(_)) => self.shared.give_share(peer),
                    Err(TrySendError::Full(conn)) => {
                        self.shared.give_share(peer);
                        self.refuse(conn, "server busy: every worker is taken; retry shortly");
                    }
                }
            }
            Next::Refuse(resp) => {
                // Answered on the loop and closed (a malformed head).
                let _ = sys::epoll_ctl(self.epoll(), sys::EPOLL_CTL_DEL, fd, 0, 0);
                self.answer_and_close(conn, resp, Instant::now());
            }
        }
    }

    /// Answers 503 with `Retry-After` at once and closes (logged, like
    /// every answer).
    fn refuse(&mut self, conn: Conn, why: &str) {
        let mut resp = Response::error(503, why);
        resp.headers.push(("Retry-After", "1".into()));
        self.answer_and_close(conn, resp, Instant::now());
    }

    /// Sends `resp` from the loop, then closes; the request it answers is
    /// dropped unread.
    fn answer_and_close(&mut self, mut conn: Conn, resp: Response, started: Instant) {
        if self.shared.access_log {
            let (method, target) = request_line(&conn.buf);
            log_request(conn.peer, &method, &target, &resp, false, started, true);
        }
        conn.consume(conn.buf.len());
        conn.out = encode(&resp, false, true);
        conn.sent = 0;
        conn.close_after = true;
        self.adopt(conn);
    }

    /// Closes the connections past their deadline; a half-sent head gets a 408.
    fn sweep(&mut self, now: Instant) {
        for slot in &mut self.conns {
            if let Some(conn) = slot.take_if(|c| now >= c.deadline) {
                if !conn.buf.is_empty() && conn.sent == conn.out.len() {
                    let resp = Response::error(408, "request head too slow");
                    let _ = sys::send_now(&conn.stream, &encode(&resp, false, true));
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
            match sys::send_now(&c.stream, &c.out[c.sent..]) {
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
        match c.head_end() {
            Scan::Complete(end) => {
                if !answer_here(c, end, shared) {
                    return Next::Worker;
                }
                continue;
            }
            Scan::BareLf => return Next::Refuse(bare_lf()),
            Scan::Partial => {}
        }
        if c.buf.len() > MAX_HEAD {
            return Next::Worker; // which answers 431
        }
        if !readable {
            return Next::Wait;
        }
        match sys::recv_now(&c.stream, scratch) {
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
        // Whatever follows a malformed head is never read as a request.
        Err(resp) => (resp, String::from("-"), String::from("-"), false, u64::MAX),
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

/// The method and target of the request line in `buf`, for the access log
/// of a request answered without parsing it.
fn request_line(buf: &[u8]) -> (String, String) {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(b"");
    let line = String::from_utf8_lossy(&line[..line.len().min(512)]);
    let mut words = line.split_whitespace();
    let word = |w: Option<&str>| w.filter(|w| !w.is_empty()).unwrap_or("-").to_string();
    (word(words.next()), word(words.next()))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        match sys::sendfile(out, &*file, &mut offset, count) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than announced",
                ))
            }
            Ok(n) => left -= n as u64,
            Err(e) => {
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
    sys::listen(listener, backlog);
}
