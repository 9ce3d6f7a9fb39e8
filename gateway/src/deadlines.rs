//! A relayed session's deadlines, sans IO: route expiry, the duration limit, the idle
//! timeout and the keepalive (ping every interval, close when a pong is overdue).
//!
//! [`Deadlines::next`] takes the current instant and the two inputs that move under it (the
//! route's expiry, which a keepalive or a revocation changes, and the instant of the last byte
//! either way) and says what is due: a close with its cause, a ping, or nothing until an
//! instant. The relay sleeps to that instant and asks again; it never reads a clock on this
//! module's behalf, so the tests drive it with made-up instants.

use std::time::{Duration, Instant};

use crate::close::{self, CloseCause};
use crate::config::Limits;

/// What is due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// End the session with this cause.
    Close(CloseCause),
    /// Send a ping (within [`Deadlines::ping_timeout`]), then report it with
    /// [`Deadlines::ping_sent`].
    Ping,
    /// Nothing before this instant (`None`: nothing at all until an input changes).
    Wait(Option<Instant>),
}

#[derive(Debug, Clone)]
pub struct Deadlines {
    idle_timeout: Option<Duration>,
    keepalive_interval: Option<Duration>,
    keepalive_timeout: Duration,
    /// `--max-session-duration` after the start.
    max_end: Option<Instant>,
    next_ping: Option<Instant>,
    /// Set by the first unanswered ping, cleared by a pong.
    pong_due: Option<Instant>,
}

impl Deadlines {
    pub fn new(started: Instant, l: &Limits) -> Self {
        Self {
            idle_timeout: l.idle_timeout,
            keepalive_interval: l.keepalive_interval,
            keepalive_timeout: l.keepalive_timeout,
            max_end: l.max_session_duration.map(|d| started + d),
            next_ping: l.keepalive_interval.map(|i| started + i),
            pong_due: None,
        }
    }

    /// What is due at `now`. Checked in this order, so that when several are due at once
    /// the browser hears the most telling one: the route expired (4005), the duration limit
    /// (4011), idle (4007), a pong overdue (4008), then a ping.
    pub fn next(&self, now: Instant, expires: Option<Instant>, last_activity: Instant) -> Next {
        let idle_at = self.idle_timeout.map(|d| last_activity + d);
        let due = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        if due(expires) {
            return Next::Close(close::SESSION_EXPIRED);
        }
        if due(self.max_end) {
            return Next::Close(close::MAX_DURATION);
        }
        if due(idle_at) {
            return Next::Close(close::IDLE_TIMEOUT);
        }
        if due(self.pong_due) {
            return Next::Close(close::KEEPALIVE_TIMEOUT);
        }
        if due(self.next_ping) {
            return Next::Ping;
        }
        Next::Wait(
            [
                expires,
                self.max_end,
                idle_at,
                self.pong_due,
                self.next_ping,
            ]
            .into_iter()
            .flatten()
            .min(),
        )
    }

    /// How long a ping may take to go out: a browser that accepts no bytes for the whole
    /// pong deadline (not even the ping behind a frame in flight) is as dead as one that
    /// never pongs, and gets 4008.
    pub fn ping_timeout(&self) -> Duration {
        self.keepalive_timeout
    }

    /// A ping that was due at `due_at` went out at `sent_at`: the next one is an interval
    /// after `due_at`, and the pong is due a timeout after `sent_at` unless an earlier ping
    /// is still unanswered.
    pub fn ping_sent(&mut self, due_at: Instant, sent_at: Instant) {
        if self.pong_due.is_none() {
            self.pong_due = Some(sent_at + self.keepalive_timeout);
        }
        self.next_ping = self.keepalive_interval.map(|i| due_at + i);
    }

    /// A pong arrived: nothing is overdue.
    pub fn pong(&mut self) {
        self.pong_due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits(idle: u32, max: u32, interval: u32, timeout: u32) -> Limits {
        let opt = |s: u32| (s > 0).then(|| s * S);
        Limits {
            idle_timeout: opt(idle),
            max_session_duration: opt(max),
            keepalive_interval: opt(interval),
            keepalive_timeout: timeout * S,
            ..Limits::default()
        }
    }

    #[test]
    fn nothing_configured_waits_for_ever() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, &limits(0, 0, 0, 20));
        assert_eq!(d.next(t0 + 1_000_000 * S, None, t0), Next::Wait(None));
    }

    #[test]
    fn pings_on_the_interval_and_closes_when_the_pong_is_late() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, &limits(0, 0, 20, 5));
        assert_eq!(d.next(t0, None, t0), Next::Wait(Some(t0 + 20 * S)));
        assert_eq!(d.next(t0 + 20 * S, None, t0), Next::Ping);
        // Sent a second late (a frame was in flight): the pong is due 5 s after the send,
        // the next ping an interval after it was due.
        d.ping_sent(t0 + 20 * S, t0 + 21 * S);
        assert_eq!(d.next(t0 + 21 * S, None, t0), Next::Wait(Some(t0 + 26 * S)));
        assert_eq!(
            d.next(t0 + 26 * S, None, t0),
            Next::Close(close::KEEPALIVE_TIMEOUT)
        );
        // Answered in time: the next ping instead.
        d.pong();
        assert_eq!(d.next(t0 + 26 * S, None, t0), Next::Wait(Some(t0 + 40 * S)));
        assert_eq!(d.next(t0 + 40 * S, None, t0), Next::Ping);
    }

    #[test]
    fn an_unanswered_ping_keeps_its_deadline_across_later_pings() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, &limits(0, 0, 2, 5));
        d.ping_sent(t0 + 2 * S, t0 + 2 * S);
        d.ping_sent(t0 + 4 * S, t0 + 4 * S);
        assert_eq!(
            d.next(t0 + 7 * S, None, t0),
            Next::Close(close::KEEPALIVE_TIMEOUT)
        );
    }

    #[test]
    fn idle_follows_the_last_byte() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, &limits(60, 0, 0, 20));
        assert_eq!(d.next(t0 + 59 * S, None, t0), Next::Wait(Some(t0 + 60 * S)));
        assert_eq!(
            d.next(t0 + 60 * S, None, t0),
            Next::Close(close::IDLE_TIMEOUT)
        );
        // Traffic at 30 s moves it.
        assert_eq!(
            d.next(t0 + 60 * S, None, t0 + 30 * S),
            Next::Wait(Some(t0 + 90 * S))
        );
    }

    #[test]
    fn expiry_moves_with_the_route_and_wins_ties() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, &limits(10, 10, 10, 20));
        let at = t0 + 10 * S;
        // Everything due at once: the route's expiry is what the browser hears.
        assert_eq!(
            d.next(at, Some(at), t0),
            Next::Close(close::SESSION_EXPIRED)
        );
        // Without it, the duration limit, then idle.
        assert_eq!(d.next(at, None, t0), Next::Close(close::MAX_DURATION));
        let d = Deadlines::new(t0, &limits(10, 0, 10, 20));
        assert_eq!(d.next(at, None, t0), Next::Close(close::IDLE_TIMEOUT));
        // A keepalive that pushed the expiry out: wait for the earliest of the rest.
        let d = Deadlines::new(t0, &limits(0, 100, 0, 20));
        assert_eq!(
            d.next(t0, Some(t0 + 50 * S), t0),
            Next::Wait(Some(t0 + 50 * S))
        );
        assert_eq!(
            d.next(t0, Some(t0 + 500 * S), t0),
            Next::Wait(Some(t0 + 100 * S))
        );
    }
}
