//! `unmask` against a bytewise reference, for arbitrary data, mask, offset and alignment;
//! plus the server-side encoders (`encode_header`, `ControlFrame`) against the RFC.
//!
//! Input layout: `[mask 4][offset 8, LE][align][split 2, LE][data...]` (short inputs are
//! zero-padded).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate_ws::frame::{
    ControlFrame, MAX_CONTROL_PAYLOAD, MAX_SERVER_HEADER, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG,
    encode_header, parse_close,
};
use vncgate_ws::mask::unmask;

fn naive(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[offset.wrapping_add(i) % 4];
    }
}

fn check_unmask(mask: [u8; 4], offset: usize, align: usize, split: usize, payload: &[u8]) {
    // Place the payload at a fuzzer-chosen misalignment inside a larger buffer, with
    // canaries around it, so word-at-a-time code sees every alignment and must not touch
    // its neighbours.
    let mut buf = vec![0xA5u8; align + payload.len() + 8];
    buf[align..align + payload.len()].copy_from_slice(payload);
    let mut expect = buf.clone();
    unmask(&mut buf[align..align + payload.len()], mask, offset);
    naive(&mut expect[align..align + payload.len()], mask, offset);
    assert_eq!(buf, expect, "unmask vs bytewise: offset {offset} align {align}");

    // Masking is an involution.
    unmask(&mut buf[align..align + payload.len()], mask, offset);
    assert_eq!(&buf[align..align + payload.len()], payload, "unmask twice");

    // A payload split across reads unmasks piece by piece like the whole.
    let split = split.min(payload.len());
    let mut parts = payload.to_vec();
    let (a, b) = parts.split_at_mut(split);
    unmask(a, mask, offset);
    unmask(b, mask, offset.wrapping_add(split));
    assert_eq!(parts, &expect[align..align + payload.len()], "split at {split}");
}

fn check_encode_header(opcode: u8, len: u64) {
    let mut h = [0u8; MAX_SERVER_HEADER];
    let n = encode_header(&mut h, opcode, len);
    assert_eq!(h[0], 0x80 | opcode, "FIN and opcode");
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    // The shortest encoding, as §5.2 requires.
    let (want_n, decoded) = match h[1] {
        126 => (4, u16::from_be_bytes([h[2], h[3]]) as u64),
        127 => (10, u64::from_be_bytes(h[2..10].try_into().unwrap())),
        l => (2, l as u64),
    };
    assert_eq!(n, want_n, "header length for {len}");
    assert_eq!(decoded, len);
    let minimal = if len < 126 { 2 } else if len <= 0xffff { 4 } else { 10 };
    assert_eq!(n, minimal, "non-minimal length encoding for {len}");
}

fn check_control(payload: &[u8], code: u16) {
    for op in [OP_PING, OP_PONG] {
        let f = ControlFrame::new(op, payload);
        let b = f.as_bytes();
        let n = payload.len().min(MAX_CONTROL_PAYLOAD);
        assert_eq!(b.len(), 2 + n);
        assert_eq!(b[0], 0x80 | op);
        assert_eq!(b[1] as usize, n);
        assert_eq!(&b[2..], &payload[..n]);
    }
    let reason = String::from_utf8_lossy(payload);
    let f = ControlFrame::close(Some(code), &reason);
    let b = f.as_bytes();
    assert_eq!(b[0], 0x80 | OP_CLOSE);
    assert!(b.len() <= 2 + MAX_CONTROL_PAYLOAD);
    assert_eq!(b[1] as usize, b.len() - 2);
    assert_eq!(u16::from_be_bytes([b[2], b[3]]), code);
    let cut = std::str::from_utf8(&b[4..]).expect("close reason cut inside a character");
    assert!(reason.starts_with(cut), "close reason is not a prefix");
    // Cut no shorter than it had to be.
    assert!(cut.len() == reason.len() || cut.len() + 4 > MAX_CONTROL_PAYLOAD - 2);
    // Whatever the gateway sends with a sendable code, a peer following the RFC accepts.
    if vncgate_ws::frame::is_valid_received_code(code) {
        assert_eq!(parse_close(&b[2..]).expect("own close frame").code, Some(code));
    }
    assert_eq!(ControlFrame::close(None, &reason).as_bytes(), &[0x88, 0]);
}

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 15];
    let n = data.len().min(15);
    head[..n].copy_from_slice(&data[..n]);
    let payload = &data[n..];
    let mask: [u8; 4] = head[0..4].try_into().unwrap();
    let offset = u64::from_le_bytes(head[4..12].try_into().unwrap()) as usize;
    let align = head[12] as usize % 16;
    let split = u16::from_le_bytes([head[13], head[14]]) as usize;

    check_unmask(mask, offset, align, split, payload);

    let len = u64::from_le_bytes(head[4..12].try_into().unwrap());
    check_encode_header(OP_BINARY, len);
    check_encode_header(OP_BINARY, len >> (head[12] & 63));
    check_encode_header(head[0] & 0x0f, split as u64);
    check_control(payload, split as u16);
});
