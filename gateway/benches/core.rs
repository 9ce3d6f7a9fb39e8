//! Micro benchmarks of the sans-IO WebSocket core, no sockets: the upgrade request parser,
//! the frame parser over masked client frames, and unmasking, at 16 B, 1 KiB and 64 KiB.
//! Each frame-parser iteration first re-copies its 256 KiB input (the parser unmasks in place).
//! `cargo bench -p vncgate --bench core`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vncgate::ws::frame::{FrameParser, Item, encode_client_frame};
use vncgate::ws::handshake::{HandshakeConfig, Parsed, parse_request};
use vncgate::ws::mask::unmask;

const NOVNC: &[u8] = b"GET /vnc/0123456789abcdef HTTP/1.1\r\nHost: gateway.example:443\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36\r\nUpgrade: websocket\r\nOrigin: https://app.example\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Protocol: binary, vncgate.token.abcdefghijklmnopqrstuvwxyz012345\r\n\r\n";

const SIZES: [usize; 3] = [16, 1024, 64 * 1024];

fn masked_frames(payload: usize, total: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(total + 64);
    while out.len() < total {
        encode_client_frame(&mut out, 0x82, &body, [0x12, 0x34, 0x56, 0x78]);
    }
    out
}

fn handshake(c: &mut Criterion) {
    let cfg = HandshakeConfig::default();
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Bytes(NOVNC.len() as u64));
    g.bench_function("parse_novnc_upgrade", |b| {
        b.iter(|| match parse_request(black_box(NOVNC), &cfg) {
            Ok(Parsed::Upgrade(u)) => black_box(u.consumed),
            other => panic!("{other:?}"),
        })
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_parser");
    for size in SIZES {
        let wire = masked_frames(size, 256 * 1024);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, wire| {
            let mut buf = wire.clone();
            b.iter(|| {
                buf.copy_from_slice(wire);
                let mut p = FrameParser::new(u64::MAX >> 1);
                let mut off = 0;
                let mut data = 0;
                while off < buf.len() {
                    let s = p.step(&mut buf[off..]).expect("valid frames");
                    if let Some(Item::Data(r)) = s.item {
                        data += r.len();
                    }
                    off += s.consumed;
                }
                black_box(data)
            })
        });
    }
    g.finish();
}

fn unmasking(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in SIZES {
        let mut data = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| unmask(black_box(&mut data), [1, 2, 3, 4], 1))
        });
    }
    g.finish();
}

criterion_group!(benches, handshake, frames, unmasking);
criterion_main!(benches);
