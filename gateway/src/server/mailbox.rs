//! A worker's mailbox: a queue other threads post to, and a bell (a socket pair) that wakes
//! the worker's runtime.
//!
//! Workers' runtimes are thread-local: a waker must never be fired from another thread
//! (monoio without its `sync` feature refuses that), so everything that crosses into a
//! worker (connections handed over by another worker, route answers and changes from the
//! Redis control thread) is posted here, and the worker's own task, woken by the bell
//! through ordinary I/O readiness, takes it and wakes whatever waits locally.

use std::io::{self, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Mailbox<T> {
    queue: Mutex<Vec<T>>,
    bell_tx: UnixStream,
    bell_rx: Mutex<Option<UnixStream>>,
}

/// A bell's two ends, both non-blocking: rung by writing a byte to the first, heard as the
/// second's readiness (see [`Bell`]).
pub fn bell_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((tx, rx))
}

impl<T> Mailbox<T> {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = bell_pair()?;
        Ok(Self {
            queue: Mutex::new(Vec::new()),
            bell_tx: tx,
            bell_rx: Mutex::new(Some(rx)),
        })
    }

    /// The bell's receiving end, taken once by the worker (see [`Bell`]).
    pub fn take_bell(&self) -> Option<UnixStream> {
        self.bell_rx.lock().ok()?.take()
    }

    /// Queues an item and rings the bell.
    pub fn post(&self, item: T) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(item);
        // A full bell already holds an unread ring: the worker will drain the queue.
        let _ = (&self.bell_tx).write(&[1]);
    }

    /// Everything queued so far, in order.
    pub fn take_all(&self) -> Vec<T> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The receiving end of a bell, registered with the worker's runtime.
pub struct Bell(monoio::net::UnixStream);

impl Bell {
    /// Registers the bell; call on the worker's runtime.
    pub fn new(rx: UnixStream) -> io::Result<Self> {
        monoio::net::UnixStream::from_std(rx).map(Bell)
    }

    /// Waits for a ring and swallows every ring so far.
    pub async fn rung(&self) -> io::Result<()> {
        self.0.readable(false).await?;
        let mut scratch = [0u8; 64];
        while matches!(crate::sys::recv(self.0.as_raw_fd(), &mut scratch), Ok(n) if n > 0) {}
        Ok(())
    }
}
