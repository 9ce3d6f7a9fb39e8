//! A one-shot, single-task signal: fired once with a value, awaited by one task.
//!
//! Each session's kill switch (drain, later revocation) and each worker's stop-accepting
//! switch is one of these. Everything a session does runs inside one task, so one waker
//! slot suffices, and registering again just replaces it: no list grows with polls.

use std::cell::Cell;
use std::future::poll_fn;
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

/// Gives other tasks on this worker a turn: returns `Pending` once, after asking to be
/// polled again. A relay that always finds both sockets ready would otherwise keep the
/// worker to itself (monoio does not preempt), starving the other sessions.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
