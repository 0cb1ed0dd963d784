//! The system calls std does not wrap, each behind a safe function: extended
//! attributes (the agent keeps a file's capabilities and labels across a
//! swap) and what bin-manager's event loops need (epoll, eventfd,
//! non-blocking send/recv, sendfile, listen backlog, RLIMIT_NOFILE), the
//! effective uid, access(2), a connect from a chosen local address, and
//! signals (a signalfd for SIGTERM in both programs, kill, reaping orphans
//! when the agent is a container's PID 1). This is
//! the crate's only module with `unsafe` code (the crate root denies it
//! everywhere else) and the only user of the libc crate; every block says
//! which invariant makes it sound.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Turns a -1 from a syscall into the thread's errno.
fn check(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Takes ownership of a descriptor a syscall just returned.
fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    check(fd as isize)?;
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---- extended attributes ----

/// The NUL-separated names of `path`'s extended attributes.
pub fn list_xattrs(path: &CStr) -> io::Result<Vec<u8>> {
    // SAFETY: `path` is a valid C string; a null buffer with size 0 asks for
    // the size needed.
    let size = check(unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut names = vec![0u8; size];
    // SAFETY: `names` is a live, writable buffer of `names.len()` bytes.
    let size =
        check(unsafe { libc::listxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) })?;
    names.truncate(size);
    Ok(names)
}

/// The value of one extended attribute of `path`.
pub fn get_xattr(path: &CStr, name: &CStr) -> io::Result<Vec<u8>> {
    // SAFETY: valid C strings; a null buffer with size 0 asks for the size.
    let len =
        check(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut value = vec![0u8; len];
    // SAFETY: `value` is a live, writable buffer of `value.len()` bytes.
    let len = check(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    })?;
    value.truncate(len);
    Ok(value)
}

/// Sets one extended attribute on an open file.
pub fn set_xattr(file: &impl AsRawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `file` is open for the call; `value` is a live slice.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc as isize).map(drop)
}

// ---- bin-manager's event loops ----

/// An epoll event as the kernel lays it out on this architecture.
type EpollEvent = libc::epoll_event;
/// Readable.
pub const EPOLLIN: u32 = libc::EPOLLIN as u32;
/// Writable.
pub const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
/// Hung up or failed.
pub const EPOLLHUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
/// `epoll_ctl` operations.
pub use libc::{EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD};

/// An empty event, to fill a buffer for [`epoll_wait`].
pub fn epoll_event() -> EpollEvent {
    libc::epoll_event { events: 0, u64: 0 }
}

/// A new epoll instance (close-on-exec).
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the descriptor is checked, then owned once.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// Adds, changes or removes `fd` in `epoll`, with `token` as its user data.
pub fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is live for the call; the kernel copies it.
    check(unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } as isize).map(drop)
}

/// Waits up to `timeout_ms` for events; returns how many of `events` were filled.
pub fn epoll_wait(epoll: &OwnedFd, events: &mut [EpollEvent], timeout_ms: i32) -> usize {
    let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
    // SAFETY: `events` is a live buffer of at least `max` entries.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
    n.max(0) as usize // EINTR and friends: nothing happened
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the descriptor is checked, then owned once.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds one to an eventfd's counter (wakes whoever waits on it).
pub fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of a live u64 to an eventfd. A full counter
    // (EAGAIN) means a wake-up is already pending: nothing to do.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter (a pending wake-up is consumed).
pub fn eventfd_drain(fd: &OwnedFd) {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64. EAGAIN (nothing pending) is fine.
    unsafe { libc::read(fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
}

/// send(2) that never blocks and never raises SIGPIPE.
pub fn send_now(s: &impl AsRawFd, bytes: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `bytes` is a live slice of `bytes.len()` bytes.
    check(unsafe { libc::send(s.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) })
}

/// recv(2) that never blocks.
pub fn recv_now(s: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
    check(unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

/// sendfile(2): up to `count` bytes of `file` from `*offset` to `out`;
/// advances `*offset` and returns the bytes sent.
pub fn sendfile(
    out: &impl AsRawFd,
    file: &impl AsRawFd,
    offset: &mut i64,
    count: usize,
) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; `offset` is a live
    // i64 the kernel advances.
    check(unsafe { libc::sendfile(out.as_raw_fd(), file.as_raw_fd(), offset, count) })
}

/// listen(2) again on a listening socket: Linux applies the new backlog.
pub fn listen(socket: &impl AsRawFd, backlog: i32) {
    // SAFETY: the descriptor belongs to a live socket; a failure leaves the
    // old backlog, which still works.
    unsafe {
        libc::listen(socket.as_raw_fd(), backlog);
    }
}

/// Lifts the soft limit on open files to the hard one.
pub fn raise_fd_limit() {
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

/// A TCP connection to `remote` from the local address `local` (any port):
/// one machine acting as several clients on 127.0.0.0/8, so that tests and
/// benchmarks can exercise per-address limits. Blocking, like
/// `TcpStream::connect`.
pub fn connect_from(
    local: std::net::Ipv4Addr,
    remote: std::net::SocketAddrV4,
) -> io::Result<std::net::TcpStream> {
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd =
        owned(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    let (from, to) = (
        sockaddr(std::net::SocketAddrV4::new(local, 0)),
        sockaddr(remote),
    );
    // SAFETY: `from` and `to` are live sockaddr_in values of `len` bytes; the
    // descriptor is open.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&from as *const libc::sockaddr_in).cast(),
            len,
        )
    } as isize)?;
    // SAFETY: as above.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&to as *const libc::sockaddr_in).cast(),
            len,
        )
    } as isize)?;
    Ok(std::net::TcpStream::from(fd))
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// access(2) for writing: fails with EROFS on a read-only mount, even for
/// root, without writing anything.
pub fn check_writable(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is a live NUL-terminated string.
    check(unsafe { libc::access(path.as_ptr(), libc::W_OK) } as isize).map(drop)
}

// ---- signals and processes ----

/// Ask a process to terminate.
pub const SIGTERM: i32 = libc::SIGTERM;
/// Ctrl-C.
pub const SIGINT: i32 = libc::SIGINT;
/// A child stopped or exited.
pub const SIGCHLD: i32 = libc::SIGCHLD;

/// The number of a signal named like `HUP`, `SIGHUP`, `usr1` or `15`.
pub fn signal_number(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let known = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
        ("WINCH", libc::SIGWINCH),
        ("ALRM", libc::SIGALRM),
    ];
    if let Some((_, n)) = known.iter().find(|(k, _)| *k == bare) {
        return Some(*n);
    }
    bare.parse().ok().filter(|n| (1..=64).contains(n))
}

/// The name of a signal number, for messages (`SIGHUP`).
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it and
    // sigaddset only sets bits of valid signal numbers (invalid ones fail
    // and are left out).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks `signals` in the calling thread (and in every thread it starts
/// afterwards) and returns a signalfd that reads them instead: they no
/// longer interrupt or kill, they wait to be read. Child processes start
/// with an empty mask (std resets it), so hooks still get them.
pub fn signal_fd(signals: &[i32]) -> io::Result<OwnedFd> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: a new descriptor (-1) for an initialised set; checked, then owned once.
    owned(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })
}

/// Waits up to `timeout_ms` (-1: forever) until one of `fds` is readable;
/// returns which are (EINTR counts as none).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a live array of `polls.len()` pollfd entries.
    let rc = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

/// The next signal waiting on a [`signal_fd`], if any (never blocks).
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data the kernel fills whole.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into the live `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Sends `sig` to process `pid` (0 only checks that it exists and may be signalled).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: a plain syscall on numbers.
    check(unsafe { libc::kill(pid, sig) } as isize).map(drop)
}

/// Reaps every child that has exited (never blocks); returns how many. Only
/// call it when no child is being waited for elsewhere (it would take that
/// child's exit status).
pub fn reap_children() -> usize {
    let mut n = 0;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a live int; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return n;
        }
        n += 1;
    }
}
