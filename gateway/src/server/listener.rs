//! Binding the workers' listeners: one socket per worker on the same port with
//! `SO_REUSEPORT`, so the kernel spreads new connections across workers.
//!
//! `SO_REUSEPORT` also lets an unrelated or stale process join the group and silently take a
//! share of connections. So before binding, the port is probed without `SO_REUSEPORT`: if
//! anything already listens there, startup fails, unless `--share-port` says that this is a
//! deliberate handover (a new gateway starting beside the old one during a restart).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    Ok(s)
}

/// How long a listener found on the port may take to go away before startup is refused:
/// a gateway that has just died (a crash, SIGKILL, a supervisor restarting it at once) keeps
/// its listening socket for a few milliseconds after it has been reaped, while the kernel
/// tears down its io_uring ring, whose pending ops still hold the socket.
const DEAD_LISTENER_GRACE: Duration = Duration::from_millis(500);

/// Fails if a socket is already bound to `addr` (a live or stale gateway), unless it is
/// gone within [`DEAD_LISTENER_GRACE`].
pub fn ensure_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let since = Instant::now();
    loop {
        match port_holder(addr)? {
            None => return Ok(()),
            Some(Holder::Listener) if since.elapsed() < DEAD_LISTENER_GRACE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(holder) => return Err(holder.refusal(addr)),
        }
    }
}

/// What holds a port that cannot be bound.
enum Holder {
    Listener,
    ClosingConnections,
}

impl Holder {
    fn refusal(self, addr: SocketAddr) -> io::Error {
        let why = match self {
            Holder::Listener => format!(
                "{addr} already has a listener (a stale gateway would silently take a share of connections through SO_REUSEPORT); stop it, or pass --share-port for a deliberate restart handover"
            ),
            Holder::ClosingConnections => format!(
                "{addr} is held by connections still closing (TIME_WAIT), not by a listener; retry in a minute or use a port outside the ephemeral range (net.ipv4.ip_local_port_range)"
            ),
        };
        io::Error::new(io::ErrorKind::AddrInUse, why)
    }
}

/// `None` when `addr` can be bound now, else what holds it.
fn port_holder(addr: SocketAddr) -> io::Result<Option<Holder>> {
    let probe = socket_for(addr)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // A listener answers a connect; a port held only by closing connections
            // (TIME_WAIT) does not.
            let mut target = addr;
            if target.ip().is_unspecified() {
                target.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let listening =
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok();
            Ok(Some(if listening {
                Holder::Listener
            } else {
                Holder::ClosingConnections
            }))
        }
        Err(e) => Err(e),
    }
}

/// Binds `count` listeners on one port. With port 0 the first picks the port and the
/// others join it. `congestion` is set on each listener, and the kernel gives it to every
/// connection the listener accepts.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    share_port: bool,
    congestion: Option<&str>,
) -> io::Result<Vec<TcpListener>> {
    if !share_port {
        ensure_port_free(addr)?;
    }
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let s = socket_for(addr)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        if let Some(cc) = congestion {
            s.set_tcp_congestion(cc.as_bytes())?;
        }
        s.bind(&addr.into())?;
        s.listen(4096)?;
        let l: TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_group_on_same_port_is_refused_unless_shared() {
        let first = bind_group("127.0.0.1:0".parse().unwrap(), 2, false, None).unwrap();
        let addr = first[0].local_addr().unwrap();
        assert_eq!(first[1].local_addr().unwrap(), addr);
        let e = bind_group(addr, 1, false, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("--share-port"));
        let shared = bind_group(addr, 1, true, None).unwrap();
        assert_eq!(shared[0].local_addr().unwrap(), addr);
    }
}

#[cfg(test)]
mod congestion_tests {
    use super::*;

    /// Accepted connections take the listener's congestion control, so the gateway sets
    /// it once per listener, not once per connection.
    #[test]
    fn accepted_connections_inherit_the_listeners_congestion_control() {
        // The kernel's name, without the NUL padding of its fixed-size buffer.
        let cc = |s: socket2::SockRef<'_>| {
            let mut name = s.tcp_congestion().unwrap();
            name.retain(|&b| b != 0);
            String::from_utf8(name).unwrap()
        };
        let probe = socket_for("127.0.0.1:0".parse().unwrap()).unwrap();
        let host = cc((&probe).into());
        // Whatever the host's default is, ask for a different one the kernel has.
        let want = if host == "reno" { "cubic" } else { "reno" };
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 1, false, Some(want)).unwrap();
        let addr = group[0].local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        group[0].set_nonblocking(false).unwrap();
        let (server_side, _) = group[0].accept().unwrap();
        assert_eq!(cc((&server_side).into()), want);
        assert_eq!(cc((&client).into()), host);
    }
}
