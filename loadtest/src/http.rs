//! A one-request HTTP/1.1 client over a blocking socket (`Connection: close`), for tests and
//! benchmarks that drive JSON APIs (the controller's) and want the exact status and body,
//! headers they choose included.

use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// A response: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `method path` to `addr` (`host:port`, or an `http://host:port` base) with the
/// extra header lines `headers` (each ending in CRLF) and `body`, reads the whole response.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> io::Result<Response> {
    let addr = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let status = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP response: {resp:.60}"),
            )
        })?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok(Response { status, body })
}

/// [`request`] with a JSON body (when not empty) and a JSON answer.
pub fn json(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<(u16, serde_json::Value)> {
    let headers = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let r = request(addr, method, path, headers, body.as_bytes())?;
    Ok((r.status, r.json()))
}
