//! Instruction counts of the same operations as `core.rs`, for `bench/instructions.sh`,
//! which runs this binary under valgrind's callgrind. Not a timing benchmark: it measures
//! nothing itself.
//!
//! ```text
//! instructions --list          one line per operation: NAME BYTES OPS_PER_ITER ITERS
//! instructions NAME ITERS      set up NAME, then run it ITERS times inside `cg_measured`
//! instructions                 (or `cargo bench`) run each operation twice, as a check
//! ```
//!
//! The script counts instructions only inside `cg_measured` (callgrind `--collect-atstart=no
//! --toggle-collect='*cg_measured*'`), so process start-up, input set-up and exit are never
//! counted, and runs it twice per operation, with ITERS and with 0: the difference divided by
//! ITERS × OPS_PER_ITER is the count per operation, without the function's own entry and
//! exit. What `cg_measured` calls (httparse, SHA-1, malloc and free of the request's
//! strings) is counted as part of the operation.
//!
//! - `handshake`: `parse_request` of the same full browser upgrade request as `core.rs`
//!   (the request, its `Sec-WebSocket-Accept` and dropping the result).
//! - `frame-N`: the frame parser over a buffer of masked binary frames of N payload bytes
//!   (about 256 KiB, as in `core.rs`); one operation is one frame (one `step` call, header
//!   and in-place unmasking of its payload). Unlike `core.rs` the buffer is not re-copied
//!   before each pass: a second pass unmasks the payloads back, and for binary frames the
//!   parser's path does not depend on the payload bytes.
//! - `unmask-N`: `unmask` of N bytes at frame offset 1, as in `core.rs`.

use std::hint::black_box;

use vncgate_ws::frame::{FrameParser, Item};
use vncgate_ws::handshake::{HandshakeConfig, Parsed, parse_request};
use vncgate_ws::mask::unmask;

mod inputs;
use inputs::{NOVNC, SIZES, masked_frames};

/// Bytes of masked frames per frame-parser pass, as in `core.rs`.
const FRAME_BUFFER: usize = 256 * 1024;

/// What `cg_measured` runs, set up beforehand.
enum Input {
    Handshake(HandshakeConfig),
    Frames(Vec<u8>),
    Unmask(Vec<u8>),
}

/// One operation of the table.
struct Op {
    name: String,
    /// Payload bytes per operation (request bytes for the handshake).
    bytes: usize,
    /// Iterations the script runs by default (a few million instructions in all).
    iters: u64,
}

fn ops() -> Vec<Op> {
    let mut v = vec![Op {
        name: "handshake".into(),
        bytes: NOVNC.len(),
        iters: 1000,
    }];
    for (size, iters) in SIZES.into_iter().zip([8, 8, 8]) {
        v.push(Op {
            name: format!("frame-{size}"),
            bytes: size,
            iters,
        });
    }
    for (size, iters) in SIZES.into_iter().zip([100_000, 10_000, 200]) {
        v.push(Op {
            name: format!("unmask-{size}"),
            bytes: size,
            iters,
        });
    }
    v
}

/// The input of operation `name`, and how many operations one iteration makes.
fn setup(name: &str) -> Option<(Input, u64)> {
    if name == "handshake" {
        return Some((Input::Handshake(HandshakeConfig::default()), 1));
    }
    let (kind, size) = name.split_once('-')?;
    let size: usize = size.parse().ok()?;
    if !SIZES.contains(&size) {
        return None;
    }
    match kind {
        "frame" => {
            let wire = masked_frames(size, FRAME_BUFFER);
            let frames = count_frames(&mut wire.clone());
            Some((Input::Frames(wire), frames))
        }
        "unmask" => Some((Input::Unmask(vec![0xa5; size]), 1)),
        _ => None,
    }
}

/// Frames in `wire`, by parsing it once (outside the measured function).
fn count_frames(wire: &mut [u8]) -> u64 {
    let mut p = FrameParser::new(u64::MAX >> 1);
    let (mut off, mut frames) = (0, 0);
    while off < wire.len() {
        let s = p.step(&mut wire[off..]).expect("valid frames");
        if let Some(Item::Data(_)) = s.item {
            frames += 1;
        }
        off += s.consumed;
    }
    frames
}

/// The measured region: callgrind counts only what runs inside this function.
#[inline(never)]
fn cg_measured(input: &mut Input, iters: u64) -> usize {
    let mut acc = 0usize;
    match input {
        Input::Handshake(cfg) => {
            for _ in 0..iters {
                match parse_request(black_box(NOVNC), cfg) {
                    Ok(Parsed::Upgrade(u)) => acc = acc.wrapping_add(black_box(u.consumed)),
                    other => panic!("{other:?}"),
                }
            }
        }
        Input::Frames(buf) => {
            let mut p = FrameParser::new(u64::MAX >> 1);
            for _ in 0..iters {
                let buf = black_box(&mut buf[..]);
                let mut off = 0;
                while off < buf.len() {
                    let s = p.step(&mut buf[off..]).expect("valid frames");
                    if let Some(Item::Data(r)) = s.item {
                        acc = acc.wrapping_add(r.len());
                    }
                    off += s.consumed;
                }
            }
        }
        Input::Unmask(data) => {
            for _ in 0..iters {
                unmask(black_box(&mut data[..]), [1, 2, 3, 4], 1);
            }
        }
    }
    black_box(acc)
}

fn usage() -> ! {
    eprintln!("usage: instructions --list | instructions NAME ITERS (see bench/instructions.sh)");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--list"] => {
            for op in ops() {
                let (_, per_iter) = setup(&op.name).expect("listed operations set up");
                println!("{} {} {} {}", op.name, op.bytes, per_iter, op.iters);
            }
        }
        // `cargo bench` (it passes `--bench`, with any filter) or no arguments: a quick check
        // that every operation runs, counting nothing.
        rest if rest.is_empty() || rest.contains(&"--bench") => {
            for op in ops() {
                let (mut input, _) = setup(&op.name).expect("listed operations set up");
                cg_measured(&mut input, 2);
            }
            println!(
                "instructions: {} operations ran; bench/instructions.sh counts their instructions",
                ops().len()
            );
        }
        [name, iters] => {
            let Ok(iters) = iters.parse::<u64>() else {
                usage()
            };
            let Some((mut input, _)) = setup(name) else {
                eprintln!("instructions: unknown operation {name:?} (see --list)");
                std::process::exit(2)
            };
            cg_measured(&mut input, iters);
        }
        _ => usage(),
    }
}
