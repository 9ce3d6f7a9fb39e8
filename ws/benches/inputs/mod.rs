//! Inputs shared by the criterion benchmarks (`core.rs`) and the instruction counts
//! (`instructions.rs`), so both measure the same bytes.

use vncgate_ws::frame::encode_client_frame;

/// A browser's noVNC upgrade request (15 headers).
pub const NOVNC: &[u8] = b"GET /vnc/0123456789abcdef HTTP/1.1\r\nHost: gateway.example:443\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36\r\nUpgrade: websocket\r\nOrigin: https://app.example\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Protocol: binary, vncgate.token.abcdefghijklmnopqrstuvwxyz012345\r\n\r\n";

/// Payload sizes measured: 16 B, 1 KiB, 64 KiB.
pub const SIZES: [usize; 3] = [16, 1024, 64 * 1024];

/// Masked binary frames of `payload` bytes each, at least `total` bytes in all.
pub fn masked_frames(payload: usize, total: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(total + 64);
    while out.len() < total {
        encode_client_frame(&mut out, 0x82, &body, [0x12, 0x34, 0x56, 0x78]);
    }
    out
}
