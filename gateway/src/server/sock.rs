//! Socket helpers shared by admission's refusals and the relay's closing handshake: write a
//! whole buffer on a non-blocking socket, and close without resetting away what was sent.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::sys;

/// Writes all of `buf`, waiting for writability as needed.
pub async fn write_all(stream: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut off = 0;
    while off < buf.len() {
        match sys::send(fd, &buf[off..], false) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// After the last frame: FIN our side, then read and discard until the peer closes (or
/// `linger` passes), so that unread bytes do not turn our close into a reset that could
/// destroy the response or close frame before the peer reads it.
pub async fn linger_close(stream: &TcpStream, linger: Duration) {
    let fd = stream.as_raw_fd();
    let _ = sys::shutdown_write(fd);
    let drain = async {
        let mut scratch = [0u8; 1024];
        loop {
            match sys::recv(fd, &mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stream.readable(false).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    };
    let _ = monoio::time::timeout(linger, drain).await;
}
