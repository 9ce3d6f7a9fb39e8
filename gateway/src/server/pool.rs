//! Per-worker pools of relay pipes and read buffers.
//!
//! A 1 MiB pipe relays best, but pipe capacity is charged to the user
//! (`fs.pipe-user-pages-soft`), and 100k sessions cannot each own one. Sessions borrow a
//! pipe only while VM data is in flight and give it back when the VM goes quiet, so pipe
//! memory follows activity, not session count. Read buffers for browser-to-VM traffic are
//! lent the same way, per read. Pools belong to one worker thread: no locks.

use std::cell::{Cell, RefCell};
use std::io;

use crate::metrics as m;
use crate::sys::Pipe;

pub struct PipePool {
    idle: RefCell<Vec<Pipe>>,
    size: usize,
    max_idle: usize,
    lent: Cell<usize>,
    warned: Cell<bool>,
}

impl PipePool {
    pub fn new(size: usize, max_idle: usize) -> Self {
        Self {
            idle: RefCell::new(Vec::new()),
            size,
            max_idle,
            lent: Cell::new(0),
            warned: Cell::new(false),
        }
    }

    pub fn lend(&self) -> io::Result<Pipe> {
        let pipe = match self.idle.borrow_mut().pop() {
            Some(p) => p,
            None => {
                let p = Pipe::new(self.size)?;
                if p.capacity() < self.size {
                    metrics::counter!(m::PIPE_SIZE_FALLBACK).increment(1);
                    if !self.warned.replace(true) {
                        tracing::warn!(
                            asked = self.size,
                            granted = p.capacity(),
                            "pipe capacity refused by the per-user quota (fs.pipe-user-pages-soft); relaying with smaller pipes"
                        );
                    }
                }
                p
            }
        };
        self.lent.set(self.lent.get() + 1);
        Ok(pipe)
    }

    /// Takes back an empty pipe. A pipe that may still hold bytes must be dropped instead.
    pub fn give(&self, pipe: Pipe) {
        self.lent.set(self.lent.get() - 1);
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.max_idle {
            idle.push(pipe);
        }
    }

    /// Records a pipe dropped without being returned (its session ended mid-frame).
    pub fn forget(&self, pipe: Pipe) {
        self.lent.set(self.lent.get() - 1);
        drop(pipe);
    }

    pub fn lent(&self) -> usize {
        self.lent.get()
    }

    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }
}

pub struct BufPool {
    idle: RefCell<Vec<Box<[u8]>>>,
    size: usize,
    max_idle: usize,
}

impl BufPool {
    pub fn new(size: usize, max_idle: usize) -> Self {
        Self {
            idle: RefCell::new(Vec::new()),
            size,
            max_idle,
        }
    }

    pub fn lend(&self) -> Box<[u8]> {
        self.idle
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    /// Takes a buffer back; one of another size (not lent from here) is dropped.
    pub fn give(&self, buf: Box<[u8]>) {
        let mut idle = self.idle.borrow_mut();
        if buf.len() == self.size && idle.len() < self.max_idle {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_the_cap_and_only_their_own_size() {
        let pool = BufPool::new(16, 2);
        let (a, b, c) = (pool.lend(), pool.lend(), pool.lend());
        assert_eq!(a.len(), 16);
        pool.give(vec![0u8; 4].into_boxed_slice());
        assert_eq!(pool.idle.borrow().len(), 0, "a foreign size is dropped");
        pool.give(a);
        pool.give(b);
        pool.give(c);
        assert_eq!(pool.idle.borrow().len(), 2, "kept up to max_idle");
    }
}
