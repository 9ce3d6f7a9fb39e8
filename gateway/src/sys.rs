//! The gateway's only `unsafe` (the crate denies it everywhere else): thin wrappers over splice(2), tee(2), pipe2(2), fcntl(2), write(2), poll(2),
//! non-blocking send/recv on raw socket descriptors, and descriptor passing (`SCM_RIGHTS`,
//! through `nix`) for the restart handover.
//!
//! Invariant upheld here: every function takes descriptors that the caller keeps open for
//! the duration of the call (they are borrowed from live `monoio` streams or from an owned
//! [`Pipe`]), and every buffer pointer/length pair comes from a Rust slice. Nothing is
//! retained past the call. All calls are non-blocking: `WouldBlock` tells the caller to wait
//! for readiness through the runtime.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Sets `O_NONBLOCK`: splice(2) on a socket honours the socket's own flag, not only
/// `SPLICE_F_NONBLOCK`, so relayed sockets must carry it.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// recv(2) with `MSG_DONTWAIT`. `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length come from a live mutable slice.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// recv(2) with `MSG_DONTWAIT | MSG_PEEK`: the bytes stay queued for the next read.
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length come from a live mutable slice.
        let r = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_PEEK,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// send(2) with `MSG_DONTWAIT | MSG_NOSIGNAL`, plus `MSG_MORE` when more of the same frame
/// follows at once (a frame header before its spliced payload), so the kernel can put both
/// in one segment.
pub fn send(fd: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    loop {
        // SAFETY: the pointer and length come from a live slice.
        let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// sendmsg(2) of several buffers at once (`MSG_DONTWAIT | MSG_NOSIGNAL`): TLS records
/// queued by rustls go out in one call.
pub fn sendv(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: `msghdr` is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` (std guarantees it on Unix); the kernel
    // only reads through these pointers.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
    loop {
        // SAFETY: `msg` points at `bufs`, live for the call.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// shutdown(2) for writing: sends FIN after queued data.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the listening socket out of LISTEN (shutdown(2) on a listener): the kernel stops
/// queueing connections to it at once, whoever else still holds the descriptor (an accept
/// or poll op in flight in the ring does), and answers new connection attempts for its
/// slot elsewhere in the `SO_REUSEPORT` group, or with a reset when none is left. Any
/// connection still in its queue is reset, so the caller accepts those first.
pub fn stop_listening(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed.
    if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// accept4(2) on a non-blocking listener: one queued connection, non-blocking (as the
/// relay needs it) and close-on-exec from the start, or `WouldBlock` when the queue is
/// empty.
pub fn accept(fd: RawFd) -> io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    // SAFETY: `fd` stays open for the call (the caller's listener); socket2 only borrows it.
    let listener = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let (sock, addr) =
        socket2::SockRef::from(&listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((sock.into(), peer))
}

/// splice(2) between a socket and a pipe, never blocking. `more` sets `SPLICE_F_MORE`.
pub fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let more = if more { libc::SPLICE_F_MORE } else { 0 };
    splice_flags(
        from,
        to,
        len,
        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE | more,
    )
}

/// splice(2) at the descriptors' own positions (null offsets: required for pipes and
/// sockets), retried when interrupted.
fn splice_flags(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    loop {
        // SAFETY: null offsets; no memory is passed.
        let r = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A non-blocking pipe used as the in-kernel buffer between two splices.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a pipe and asks for `size` bytes of capacity. If the per-user pipe quota
    /// (`fs.pipe-user-pages-soft`) refuses, the pipe keeps the kernel default; `capacity`
    /// says what was granted.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
        })
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// tee(2): duplicates up to `len` bytes at the front of the pipe `from` into the pipe `to`
/// without consuming them, never blocking. The bytes are page references, not copies.
pub fn tee(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: no memory is passed.
        let r = unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// splice(2) from a pipe to a regular file, blocking (a recording's writer thread).
pub fn splice_to_file(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    splice_flags(from, to, len, libc::SPLICE_F_MOVE)
}

/// read(2) on a descriptor (a non-blocking pipe's read end).
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length come from a live mutable slice.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// write(2) on a descriptor (a pipe's non-blocking write end): a pipe takes up to
/// `PIPE_BUF` bytes whole or not at all, more possibly in part.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length come from a live slice.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19; on Linux nice is per
/// thread): a recording's writer then takes the CPU the relay leaves.
pub fn lowest_thread_priority() -> io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe for a recording: the relay writes (tees) into its non-blocking write end, and a
/// writer thread blocks on its read end. Returns (read, write, capacity).
pub fn recording_pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The two ends are separate open files: only the write end turns non-blocking.
    set_nonblocking(write.as_raw_fd())?;
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let capacity = unsafe {
        libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
        libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
    };
    if capacity <= 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((read, write, capacity as usize))
}

/// Starts a TCP connection to `addr` from a new non-blocking, close-on-exec socket with
/// `TCP_NODELAY`, and says whether it is already established. On loopback and a local
/// bridge it usually is by the time connect(2) returns `EINPROGRESS` (the peer's SYN-ACK
/// is processed as the call releases the socket), which [`connect_finished`] sees at once.
pub fn start_connect(addr: std::net::SocketAddr) -> io::Result<(std::net::TcpStream, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    match s.connect(&addr.into()) {
        Ok(()) => Ok((s.into(), true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((s.into(), false)),
        Err(e) => Err(e),
    }
}

/// Whether a connection begun by [`start_connect`] has finished, without waiting:
/// `Ok(true)` established, `Ok(false)` still in progress, `Err` why it failed.
pub fn connect_finished(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for the length of the call; zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(false);
    }
    connect_result(fd).map(|()| true)
}

/// The outcome of a finished non-blocking connect (`SO_ERROR`).
pub fn connect_result(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` stays open for the call (the caller's socket); socket2 only borrows it.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match socket2::SockRef::from(&sock).take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A second descriptor for an open TCP socket (`F_DUPFD_CLOEXEC`).
pub fn dup_tcp(fd: RawFd) -> io::Result<std::net::TcpStream> {
    // SAFETY: fcntl on a descriptor the caller keeps open; no memory is passed.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is the descriptor fcntl just created; nobody else owns it.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(new) })
}

/// Sets a TCP socket's congestion control (`TCP_CONGESTION`, through socket2). Fails with
/// `ENOENT` for an algorithm the kernel does not have, `EPERM` for one an unprivileged
/// process may not choose (`net.ipv4.tcp_allowed_congestion_control`).
pub fn set_congestion(fd: RawFd, name: &str) -> io::Result<()> {
    // SAFETY: `fd` stays open for the call (the caller's socket); socket2 only borrows it.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&sock).set_tcp_congestion(name.as_bytes())
}

/// Most descriptors one `SCM_RIGHTS` message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Sends `data` with `fds` attached (`SCM_RIGHTS`) on a unix stream socket. The receiver
/// gets its own descriptors for the same open sockets; ours stay open.
pub fn send_fds(
    sock: &std::os::unix::net::UnixStream,
    data: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(data)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        if raw.is_empty() { &[] } else { &cmsg },
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// Receives into `buf` on a blocking unix stream socket, with the descriptors attached to
/// those bytes (close-on-exec), owned by the caller from here on. Reading exactly the bytes
/// the sender attached descriptors to (one message) gets exactly those descriptors.
pub fn recv_fds(
    sock: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    let mut truncated = false;
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors in this process
                    // for this message; nothing else refers to them yet.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        Err(_) => truncated = true,
    }
    if truncated {
        return Err(io::Error::other(
            "descriptors truncated (more than one message's worth sent at once)",
        ));
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn listening_sockets_pass_over_a_unix_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd as _;
        assert_eq!(send_fds(&a, b"x", &[l.as_fd(), l.as_fd()]).unwrap(), 1);
        drop(l);
        let mut one = [0u8; 1];
        let (n, fds) = recv_fds(&b, &mut one).unwrap();
        assert_eq!((n, one[0], fds.len()), (1, b'x', 2));
        let got: TcpListener = fds.into_iter().next().unwrap().into();
        assert_eq!(got.local_addr().unwrap(), addr);
        let _c = TcpStream::connect(addr).unwrap();
        assert!(got.accept().is_ok(), "the passed socket still listens");
    }

    fn flags(fd: RawFd) -> (bool, bool) {
        // SAFETY: fcntl queries on a descriptor the test owns.
        let (fl, fd_fl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        (fl & libc::O_NONBLOCK != 0, fd_fl & libc::FD_CLOEXEC != 0)
    }

    #[test]
    fn accepted_connections_are_non_blocking_and_close_on_exec() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let err = accept(l.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "an empty queue");
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = accept(l.as_raw_fd()).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(flags(s.as_raw_fd()), (true, true));
    }

    #[test]
    fn a_connection_started_here_is_established_refused_or_in_progress_by_name() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (s, done) = start_connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(flags(s.as_raw_fd()), (true, true));
        assert!(s.nodelay().unwrap());
        // Loopback answers within the call; if not yet, soon.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut up = done;
        while !up && std::time::Instant::now() < deadline {
            up = connect_finished(s.as_raw_fd()).unwrap();
        }
        assert!(up, "established");
        let (mut theirs, _) = l.accept().unwrap();
        theirs.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        s.set_nonblocking(false).unwrap();
        (&s).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        // A port nobody listens on: refused, by its own error.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let refused = match start_connect(closed) {
            Err(e) => e,
            Ok((s, _)) => {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    match connect_finished(s.as_raw_fd()) {
                        Err(e) => break e,
                        Ok(true) => panic!("connected to a closed port"),
                        Ok(false) => assert!(std::time::Instant::now() < deadline, "no answer"),
                    }
                }
            }
        };
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
    }

    #[test]
    fn splice_socket_to_socket_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        set_nonblocking(b.as_raw_fd()).unwrap();
        set_nonblocking(c.as_raw_fd()).unwrap();
        let pipe = Pipe::new(1 << 20).unwrap();
        assert!(pipe.capacity() >= 4096);

        let e = splice(b.as_raw_fd(), pipe.write_fd(), 1 << 16, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        a.write_all(b"spliced bytes").unwrap();
        let mut n = 0;
        while n == 0 {
            n = match splice(b.as_raw_fd(), pipe.write_fd(), 1 << 16, false) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
        }
        assert_eq!(send(c.as_raw_fd(), b"hdr:", true).unwrap(), 4);
        assert_eq!(splice(pipe.read_fd(), c.as_raw_fd(), n, false).unwrap(), n);
        let mut got = vec![0u8; 4 + n];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hdr:spliced bytes");
        drop(a);
        let mut eof = 1;
        while eof != 0 {
            eof = match splice(b.as_raw_fd(), pipe.write_fd(), 1 << 16, false) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 1,
                Err(e) => panic!("{e}"),
            };
        }
    }
}
