//! Wake-ups within one worker: a one-shot, single-task signal (fired once with a value,
//! awaited by one task), a resettable nudge, the write gate of a session's browser socket,
//! and the worker's [`Turns`], how a busy task yields.
//!
//! Each session's kill switch (drain, later revocation) and each worker's stop-accepting
//! switch is a [`Signal`]. Everything a session does runs inside one task, so one waker
//! slot suffices, and registering again just replaces it: no list grows with polls.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct Signal<T: Copy> {
    value: Cell<Option<T>>,
    waker: Cell<Option<Waker>>,
}

impl<T: Copy> Signal<T> {
    pub fn new() -> Self {
        Self {
            value: Cell::new(None),
            waker: Cell::new(None),
        }
    }

    /// Fires the signal; the first value wins.
    pub fn fire(&self, v: T) {
        if self.value.get().is_none() {
            self.value.set(Some(v));
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub fn get(&self) -> Option<T> {
        self.value.get()
    }

    pub async fn wait(&self) -> T {
        poll_fn(|cx| match self.value.get() {
            Some(v) => Poll::Ready(v),
            None => {
                register(&self.waker, cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

/// Keeps `waker` in `slot`, cloning it only when the slot holds none that wakes the same
/// task: these are polled on every wake of a busy session, and a clone is a reference count
/// round trip.
fn register(slot: &Cell<Option<Waker>>, waker: &Waker) {
    let kept = slot.take().filter(|w| w.will_wake(waker));
    slot.set(Some(kept.unwrap_or_else(|| waker.clone())));
}

/// A resettable wake-up within one task: `nudge` sets it and wakes the waiter, `wait`
/// returns once it is set and clears it. A session's timers wait on one, so that a new
/// deadline (a send descriptor opened) is taken into account before the old sleep ends.
#[derive(Default)]
pub struct Nudge {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Nudge {
    pub fn nudge(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                register(&self.waker, cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

/// An async mutual exclusion for the client socket's write side, within one session task:
/// a VM-to-browser frame (header plus spliced payload) must never be interleaved with a
/// pong or a close frame. All contenders live in the same task, so one waker slot serves.
#[derive(Default)]
pub struct WriteGate {
    busy: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

pub struct GateGuard<'a>(&'a WriteGate);

impl WriteGate {
    pub async fn acquire(&self) -> GateGuard<'_> {
        poll_fn(|cx| {
            if self.busy.get() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                self.busy.set(true);
                Poll::Ready(GateGuard(self))
            }
        })
        .await
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
    }
}

/// Turns on one worker: how a task that could go on (a relay that always finds both
/// sockets ready, an accept loop with more connections queued) gives the other tasks a
/// turn, since monoio does not preempt.
///
/// A task that wakes itself while it runs (`cx.waker().wake_by_ref()`) does not yield
/// under monoio: a task notified while running goes back to the *front* of the run queue,
/// so it runs again at once, for up to twice the queue's length, and the tasks waiting on
/// I/O get a turn only when it blocks. Under TLS, where a worker is busy encrypting and the
/// sockets are always ready, that let a few sessions take nearly all the throughput while
/// the others crawled: traced with per-wait timers, waits for readiness on VM sockets
/// already holding data lasted 0.6-1 s, the waiting task polled exactly twice.
///
/// So a yielding task leaves its waker here and rings a bell (a socket pair), and
/// [`hand_out_turns`] wakes every waker left once the runtime has seen the ring, which it
/// does when it next collects I/O completions: a task that yields runs again after every
/// task whose I/O completed meanwhile, as in a round robin, never before them.
pub struct Turns {
    waiting: RefCell<Vec<Waker>>,
    /// The bell's two ends; `None` when the socket pair could not be made (then a yield
    /// wakes itself, as monoio's own would).
    ring: Option<UnixStream>,
    bell: Cell<Option<UnixStream>>,
    /// Set while [`hand_out_turns`] runs: before it starts (and should it fail), a yield
    /// wakes itself rather than wait for a ring nobody answers.
    handing_out: Cell<bool>,
}

impl Turns {
    pub fn new() -> Self {
        let (ring, bell) = match super::mailbox::bell_pair() {
            Ok((tx, rx)) => (Some(tx), Some(rx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the turn bell; yields wake themselves");
                (None, None)
            }
        };
        Self {
            waiting: RefCell::new(Vec::new()),
            ring,
            bell: Cell::new(bell),
            handing_out: Cell::new(false),
        }
    }

    /// The bell's receiving end, taken once by the worker for [`hand_out_turns`].
    pub fn take_bell(&self) -> Option<UnixStream> {
        self.bell.take()
    }

    /// Gives the other tasks on this worker a turn: returns `Pending` once, and is woken
    /// after the runtime's next look at I/O.
    pub async fn yield_now(&self) {
        let mut yielded = false;
        poll_fn(|cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            let mut waiting = self.waiting.borrow_mut();
            if !waiting.is_empty() {
                // This round's ring is out already.
                waiting.push(cx.waker().clone());
                return Poll::Pending;
            }
            let rung = match (&self.ring, self.handing_out.get()) {
                (Some(tx), true) => match (&*tx).write(&[1]) {
                    Ok(_) => true,
                    // A full bell holds an unread ring: the wake-up is coming.
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                },
                _ => false,
            };
            if rung {
                waiting.push(cx.waker().clone());
            } else {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    /// Wakes every task that yielded (see [`hand_out_turns`]).
    fn wake_all(&self) {
        let woken = std::mem::take(&mut *self.waiting.borrow_mut());
        for w in woken {
            w.wake();
        }
    }
}

impl Default for Turns {
    fn default() -> Self {
        Self::new()
    }
}

/// The worker's task that hands out turns: on each ring, wakes the tasks that yielded.
pub async fn hand_out_turns(turns: &Turns, bell: super::mailbox::Bell) {
    turns.handing_out.set(true);
    loop {
        if let Err(e) = bell.rung().await {
            tracing::error!(error = %e, "the turn bell failed; yields wake themselves");
            turns.handing_out.set(false);
            turns.wake_all();
            return;
        }
        turns.wake_all();
    }
}
