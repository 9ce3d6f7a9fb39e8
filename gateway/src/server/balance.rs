//! Evening out connections across workers.
//!
//! `SO_REUSEPORT` spreads connections by a hash of their addresses, so two workers given 50
//! connections typically get 28 and 22, sometimes 30 and 20; with VNC sessions lasting hours,
//! that skew stays, and the busier worker's sessions see more latency while the other core
//! idles. So each worker publishes how many connections it holds in a [`Lane`], and a worker
//! that accepts a connection while holding clearly more than the least-loaded worker hands
//! it over: the descriptor goes into that worker's inbox and a byte on its bell socket wakes
//! it. This touches shared state once per accepted connection, never on the relay path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::mailbox::Mailbox;

/// One worker's load and inbox.
#[derive(Debug)]
pub struct Lane {
    /// Connections this worker holds (handshaking or relaying).
    pub conns: AtomicUsize,
    /// Connections handed to this worker.
    pub inbox: Mailbox<(std::net::TcpStream, SocketAddr)>,
}

impl Lane {
    pub fn new() -> std::io::Result<Lane> {
        Ok(Lane {
            conns: AtomicUsize::new(0),
            inbox: Mailbox::new()?,
        })
    }
}

/// Below this many connections a worker keeps what it accepts: a hand-off costs a
/// cross-thread wake-up, which short-lived connections at low load do not repay.
const BALANCE_FROM: usize = 8;

/// The lane a new connection accepted by worker `me` should go to, if not `me`: the
/// least-loaded worker, once `me` holds at least [`BALANCE_FROM`] connections and more than
/// one (plus 1/16 of its load) above it.
pub fn pick(lanes: &[Lane], me: usize) -> Option<usize> {
    let mine = lanes[me].conns.load(Ordering::Relaxed);
    if mine < BALANCE_FROM {
        return None;
    }
    let (j, least) = lanes
        .iter()
        .enumerate()
        .map(|(i, l)| (i, l.conns.load(Ordering::Relaxed)))
        .min_by_key(|&(_, c)| c)?;
    (j != me && mine > least + 1 + mine / 16).then_some(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_off_only_past_the_slack() {
        let lanes: Vec<Lane> = (0..3).map(|_| Lane::new().unwrap()).collect();
        let set = |v: [usize; 3]| {
            for (l, c) in lanes.iter().zip(v) {
                l.conns.store(c, Ordering::Relaxed);
            }
        };
        set([9, 8, 10]);
        assert_eq!(pick(&lanes, 0), None);
        set([10, 8, 10]);
        assert_eq!(pick(&lanes, 0), Some(1));
        assert_eq!(pick(&lanes, 1), None);
        set([7, 0, 0]);
        assert_eq!(pick(&lanes, 0), None, "light load: keep it");
        set([62, 58, 70]);
        assert_eq!(pick(&lanes, 0), None, "within 1 + 62/16");
        assert_eq!(pick(&lanes, 2), Some(1));
    }
}
