//! The fake VM against a raw-TCP RFB client: every byte of the handshake and updates checked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use vncgate_loadtest::fakevm::{self, Config, UpdateArea};
use vncgate_rfb::auth;

fn cfg() -> Config {
    Config {
        width: 64,
        height: 48,
        fps: 1000,
        update_area: UpdateArea::Fraction(0.25),
        ..Config::default()
    }
}

fn connect(cfg: Config) -> TcpStream {
    let addr = fakevm::spawn_background(cfg).unwrap();
    let s = TcpStream::connect(addr).unwrap();
    // Only so a broken server fails the test instead of hanging it; nothing is timed.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Reads until EOF (or reset): what a closed session looks like.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

/// Handshake with security None up to and including ServerInit; returns ServerInit bytes.
fn handshake_none(s: &mut TcpStream) -> Vec<u8> {
    assert_eq!(read_n(s, 12), b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").unwrap();
    assert_eq!(read_n(s, 2), [1, 1], "one security type: None");
    s.write_all(&[1]).unwrap();
    assert_eq!(read_n(s, 4), [0, 0, 0, 0], "SecurityResult OK");
    s.write_all(&[1]).unwrap(); // ClientInit, shared
    server_init(s)
}

fn server_init(s: &mut TcpStream) -> Vec<u8> {
    let mut init = read_n(s, 24);
    let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
    init.extend(read_n(s, name_len));
    init
}

const FULL_REQUEST: [u8; 10] = [3, 0, 0, 0, 0, 0, 0, 64, 0, 48];
const INCREMENTAL_REQUEST: [u8; 10] = [3, 1, 0, 0, 0, 0, 0, 64, 0, 48];

/// Reads one single-rectangle Raw update; returns (rect header, pixels).
fn read_update(s: &mut TcpStream, bpp: usize) -> ([u8; 12], Vec<u8>) {
    assert_eq!(
        read_n(s, 4),
        [0, 0, 0, 1],
        "FramebufferUpdate with one rectangle"
    );
    let rect: [u8; 12] = read_n(s, 12).try_into().unwrap();
    assert_eq!(&rect[8..], [0, 0, 0, 0], "Raw encoding");
    let w = usize::from(u16::from_be_bytes([rect[4], rect[5]]));
    let h = usize::from(u16::from_be_bytes([rect[6], rect[7]]));
    (rect, read_n(s, w * h * bpp))
}

#[test]
fn handshake_updates_and_cut_text_echo() {
    let mut s = connect(cfg());
    let init = handshake_none(&mut s);
    let mut expected = vec![
        0, 64, 0, 48, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ];
    expected.extend_from_slice(&14u32.to_be_bytes());
    expected.extend_from_slice(b"vncgate fakevm");
    assert_eq!(init, expected);

    // Non-incremental: the full screen, 32 bpp little-endian, padding byte last.
    s.write_all(&FULL_REQUEST).unwrap();
    let (rect, pixels) = read_update(&mut s, 4);
    assert_eq!(rect[..8], [0, 0, 0, 0, 0, 64, 0, 48]);
    assert!(pixels.chunks(4).all(|p| p[3] == 0));

    // Cut text comes straight back as ServerCutText.
    s.write_all(b"\x06\0\0\0\0\0\0\x05hello").unwrap();
    assert_eq!(read_n(&mut s, 13), b"\x03\0\0\0\0\0\0\x05hello");

    // Input is accepted silently.
    s.write_all(&[4, 1, 0, 0, 0, 0, 0, 97, 5, 0, 0, 1, 0, 1])
        .unwrap();

    // Incremental: a band a quarter of the screen tall, and a different one next time.
    s.write_all(&INCREMENTAL_REQUEST).unwrap();
    let (r1, _) = read_update(&mut s, 4);
    assert_eq!(r1[4..8], [0, 64, 0, 12]);
    s.write_all(&INCREMENTAL_REQUEST).unwrap();
    let (r2, _) = read_update(&mut s, 4);
    assert_ne!(r1[..4], r2[..4], "the band moves");
}

#[test]
fn honours_big_endian_and_refuses_24bpp() {
    let mut s = connect(cfg());
    handshake_none(&mut s);
    // SetPixelFormat: 32 bpp big-endian, 0x00RRGGBB.
    s.write_all(&[
        0, 0, 0, 0, 32, 24, 1, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ])
    .unwrap();
    s.write_all(&FULL_REQUEST).unwrap();
    let (_, pixels) = read_update(&mut s, 4);
    assert!(pixels.chunks(4).all(|p| p[0] == 0), "padding byte first");

    // 24 bpp is not an RFB pixel size: the session ends.
    s.write_all(&[
        0, 0, 0, 0, 24, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ])
    .unwrap();
    assert_eq!(read_to_close(&mut s), b"");
}

#[test]
fn vnc_auth_accepts_the_right_password() {
    let mut s = connect(Config {
        password: Some("s3cret".into()),
        ..cfg()
    });
    assert_eq!(read_n(&mut s, 12), b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").unwrap();
    assert_eq!(read_n(&mut s, 2), [1, 2], "one security type: VNC auth");
    s.write_all(&[2]).unwrap();
    let challenge: [u8; 16] = read_n(&mut s, 16).try_into().unwrap();
    s.write_all(&auth::response(b"s3cret", &challenge)).unwrap();
    assert_eq!(read_n(&mut s, 4), [0, 0, 0, 0]);
    s.write_all(&[0]).unwrap();
    let init = server_init(&mut s);
    assert_eq!(init[..4], [0, 64, 0, 48]);
}

#[test]
fn vnc_auth_rejects_a_wrong_password_with_a_reason() {
    let mut s = connect(Config {
        password: Some("s3cret".into()),
        ..cfg()
    });
    read_n(&mut s, 12);
    s.write_all(b"RFB 003.008\n").unwrap();
    read_n(&mut s, 2);
    s.write_all(&[2]).unwrap();
    let challenge: [u8; 16] = read_n(&mut s, 16).try_into().unwrap();
    s.write_all(&auth::response(b"guess", &challenge)).unwrap();
    let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 21];
    expected.extend_from_slice(b"authentication failed");
    assert_eq!(read_to_close(&mut s), expected);
}

#[test]
fn many_sessions_on_one_listener() {
    let addr = fakevm::spawn_background(cfg()).unwrap();
    let mut conns: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let init = handshake_none(s);
        assert_eq!(init[..4], [0, 64, 0, 48]);
    }
}
