//! Micro benchmarks of the sans-IO WebSocket core, no sockets: the upgrade request parser,
//! the frame parser over masked client frames, and unmasking, at 16 B, 1 KiB and 64 KiB.
//! Each frame-parser iteration first re-copies its 256 KiB input (the parser unmasks in place).
//! `cargo bench -p vncgate-ws --bench core`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vncgate_ws::frame::{FrameParser, Item};
use vncgate_ws::handshake::{HandshakeConfig, Parsed, parse_request};
use vncgate_ws::mask::unmask;

mod inputs;
use inputs::{NOVNC, SIZES, masked_frames};

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
