//! The session recording file format, sans IO: what `--record DIR` writes (see
//! [`crate::server::record`]) and `vncgate replay` reads (see [`crate::replay`]).
//!
//! One file per session. All integers are big-endian.
//!
//! ```text
//! header   magic      8 bytes  "\x89VNCREC\n" (the high byte catches 7-bit transfers,
//!                              the newline text-mode conversions, as PNG's does)
//!          version    u16      1 (a reader refuses any version it does not know)
//!          flags      u16      bit 0: the browser's input is recorded; other bits are 0
//!          start      u64      when the session started, microseconds since the Unix epoch
//!          id_len     u8       1-128
//!          session    id_len bytes, the session id (never a token)
//! records  kind       u8       1 = VM to browser, 2 = browser to VM, 3 = end
//!          time       u64      microseconds since `start` (monotonic clock)
//!          len        u32      payload bytes that follow
//!          payload    len bytes: the RFB bytes as relayed (WebSocket framing removed), or,
//!                     for an end record, why the recording ended ([`EndReason`] names)
//! ```
//!
//! An end record is the last record. A file whose last record is complete but that has no end
//! record was cut off by a gateway that stopped (a crash, `kill -9`); readers accept it and
//! say so. A record cut off in the middle, an unknown kind or anything after an end record is
//! refused with the offset where it happened.

use std::fmt;

/// The first 8 bytes of every recording.
pub const MAGIC: [u8; 8] = *b"\x89VNCREC\n";
/// The one version this code writes and reads.
pub const VERSION: u16 = 1;
/// Header flag: records of kind [`Kind::BrowserToVm`] are present.
pub const FLAG_INPUT: u16 = 1;
/// The bytes of a record's head: kind, time, length.
pub const RECORD_HEAD: usize = 13;
/// The fixed part of the file header, before the session id.
const HEADER_FIXED: usize = 8 + 2 + 2 + 8 + 1;

/// What a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VmToBrowser = 1,
    BrowserToVm = 2,
    End = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::VmToBrowser),
            2 => Some(Kind::BrowserToVm),
            3 => Some(Kind::End),
            _ => None,
        }
    }
}

/// Why a recording ended: the payload of its end record, and the `result` label of
/// `vncgate_recordings_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The session ended; the recording holds all of it.
    Complete,
    /// `--record-max-session-bytes` reached; the session went on unrecorded.
    SessionCap,
    /// `--record-max-dir-bytes` reached (or already reached when the session started).
    DirCap,
    /// The disk is full (`ENOSPC`, or the user's quota: `EDQUOT`).
    DiskFull,
    /// Another write error (`EIO`, `EFBIG`, the directory gone...), or the file could not
    /// be created.
    WriteError,
    /// The writer fell behind the relay by more than a pipe's worth: the relay never waits
    /// for the recording, so the recording ends.
    Lagged,
}

impl EndReason {
    pub const ALL: [EndReason; 6] = [
        EndReason::Complete,
        EndReason::SessionCap,
        EndReason::DirCap,
        EndReason::DiskFull,
        EndReason::WriteError,
        EndReason::Lagged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Complete => "complete",
            EndReason::SessionCap => "session_cap",
            EndReason::DirCap => "dir_cap",
            EndReason::DiskFull => "disk_full",
            EndReason::WriteError => "write_error",
            EndReason::Lagged => "lagged",
        }
    }

    pub fn parse(s: &[u8]) -> Option<EndReason> {
        EndReason::ALL
            .into_iter()
            .find(|r| r.as_str().as_bytes() == s)
    }
}

/// The file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    /// Microseconds since the Unix epoch.
    pub start_unix_micros: u64,
    pub session: String,
}

impl Header {
    pub fn input_included(&self) -> bool {
        self.flags & FLAG_INPUT != 0
    }

    /// The header's bytes. The session id must pass `vncgate_schema::check_session_id`
    /// (at most 128 bytes), which every admitted session's does.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.session.as_bytes();
        let id = &id[..id.len().min(128)];
        let mut out = Vec::with_capacity(HEADER_FIXED + id.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.start_unix_micros.to_be_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out
    }
}

/// A record's head.
pub fn record_head(kind: Kind, micros: u64, len: u32) -> [u8; RECORD_HEAD] {
    let mut h = [0u8; RECORD_HEAD];
    h[0] = kind as u8;
    h[1..9].copy_from_slice(&micros.to_be_bytes());
    h[9..13].copy_from_slice(&len.to_be_bytes());
    h
}

/// A record's head, read back (the writer parses its own stream, see
/// [`crate::server::record`]).
pub fn parse_record_head(h: &[u8; RECORD_HEAD]) -> Option<(Kind, u64, u32)> {
    let kind = Kind::from_byte(h[0])?;
    let micros = u64::from_be_bytes(h[1..9].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(h[9..13].try_into().expect("4 bytes"));
    Some((kind, micros, len))
}

/// One record, borrowed from the file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: Kind,
    /// Microseconds since the session started.
    pub micros: u64,
    pub payload: &'a [u8],
}

/// Why a file is not a recording this code can read; offsets are from the file's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Not a recording (or a damaged one): the first 8 bytes are not the magic.
    BadMagic,
    /// A recording of a format version this reader does not know.
    UnknownVersion(u16),
    /// Header flags this version does not define.
    UnknownFlags(u16),
    /// The file ends inside the header.
    TruncatedHeader,
    /// The session id in the header is empty or not one a gateway admits.
    BadSessionId,
    /// The file ends inside the record that starts at this offset.
    TruncatedRecord { offset: u64 },
    /// A record kind version 1 does not define.
    UnknownKind { kind: u8, offset: u64 },
    /// An end record whose reason is not one of [`EndReason`]'s.
    BadEndReason { offset: u64 },
    /// Bytes after the end record.
    AfterEnd { offset: u64 },
    /// A record's time is earlier than the one before it.
    TimeGoesBack { offset: u64 },
    /// A browser-to-VM record in a file whose header says input was not recorded.
    UnflaggedInput { offset: u64 },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::BadMagic => f.write_str("not a vncgate recording (bad magic)"),
            FormatError::UnknownVersion(v) => write!(
                f,
                "recording format version {v} is not known to this vncgate (it reads version {VERSION})"
            ),
            FormatError::UnknownFlags(fl) => {
                write!(f, "recording header has unknown flags {fl:#06x}")
            }
            FormatError::TruncatedHeader => f.write_str("recording ends inside its header"),
            FormatError::BadSessionId => f.write_str("recording header has an invalid session id"),
            FormatError::TruncatedRecord { offset } => {
                write!(f, "recording ends inside the record at byte {offset}")
            }
            FormatError::UnknownKind { kind, offset } => {
                write!(f, "unknown record kind {kind} at byte {offset}")
            }
            FormatError::BadEndReason { offset } => {
                write!(f, "end record at byte {offset} has an unknown reason")
            }
            FormatError::AfterEnd { offset } => {
                write!(f, "bytes after the end record, at byte {offset}")
            }
            FormatError::TimeGoesBack { offset } => {
                write!(
                    f,
                    "record at byte {offset} is timed before the one before it"
                )
            }
            FormatError::UnflaggedInput { offset } => write!(
                f,
                "browser input record at byte {offset}, but the header says input was not recorded"
            ),
        }
    }
}

impl std::error::Error for FormatError {}

/// A whole recording, checked from end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub header: Header,
    /// Every record but the end record.
    pub records: Vec<Record<'a>>,
    /// The end record's reason; `None` when the file stops after a complete record without
    /// one (the gateway stopped).
    pub end: Option<EndReason>,
}

/// Parses the header; returns it and its length.
pub fn parse_header(b: &[u8]) -> Result<(Header, usize), FormatError> {
    if b.len() < 8 {
        return Err(if MAGIC.starts_with(b) {
            FormatError::TruncatedHeader
        } else {
            FormatError::BadMagic
        });
    }
    if b[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if b.len() < 10 {
        return Err(FormatError::TruncatedHeader);
    }
    let version = u16::from_be_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(FormatError::UnknownVersion(version));
    }
    if b.len() < HEADER_FIXED {
        return Err(FormatError::TruncatedHeader);
    }
    let flags = u16::from_be_bytes([b[10], b[11]]);
    if flags & !FLAG_INPUT != 0 {
        return Err(FormatError::UnknownFlags(flags));
    }
    let start_unix_micros = u64::from_be_bytes(b[12..20].try_into().expect("8 bytes"));
    let id_len = b[20] as usize;
    let end = HEADER_FIXED + id_len;
    if b.len() < end {
        return Err(FormatError::TruncatedHeader);
    }
    let session = std::str::from_utf8(&b[HEADER_FIXED..end])
        .ok()
        .filter(|s| vncgate_schema::check_session_id(s).is_ok())
        .ok_or(FormatError::BadSessionId)?
        .to_owned();
    Ok((
        Header {
            flags,
            start_unix_micros,
            session,
        },
        end,
    ))
}

/// Parses and checks a whole recording.
pub fn parse(b: &[u8]) -> Result<Parsed<'_>, FormatError> {
    let (header, mut off) = parse_header(b)?;
    let mut records = Vec::new();
    let mut end = None;
    let mut last = 0u64;
    while off < b.len() {
        let offset = off as u64;
        if end.is_some() {
            return Err(FormatError::AfterEnd { offset });
        }
        let Some(h) = b.get(off..off + RECORD_HEAD) else {
            return Err(FormatError::TruncatedRecord { offset });
        };
        let h: &[u8; RECORD_HEAD] = h.try_into().expect("13 bytes");
        let (kind, micros, len) =
            parse_record_head(h).ok_or(FormatError::UnknownKind { kind: h[0], offset })?;
        let start = off + RECORD_HEAD;
        let Some(payload) = b.get(start..start + len as usize) else {
            return Err(FormatError::TruncatedRecord { offset });
        };
        if micros < last {
            return Err(FormatError::TimeGoesBack { offset });
        }
        last = micros;
        match kind {
            Kind::End => {
                end = Some(EndReason::parse(payload).ok_or(FormatError::BadEndReason { offset })?);
            }
            Kind::BrowserToVm if !header.input_included() => {
                return Err(FormatError::UnflaggedInput { offset });
            }
            _ => records.push(Record {
                kind,
                micros,
                payload,
            }),
        }
        off = start + len as usize;
    }
    Ok(Parsed {
        header,
        records,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(input: bool) -> Vec<u8> {
        let mut f = Header {
            flags: if input { FLAG_INPUT } else { 0 },
            start_unix_micros: 1_780_000_000_000_000,
            session: "demo-1".into(),
        }
        .encode();
        let mut rec = |kind, t, p: &[u8]| {
            f.extend_from_slice(&record_head(kind, t, p.len() as u32));
            f.extend_from_slice(p);
        };
        rec(Kind::VmToBrowser, 0, b"RFB 003.008\n");
        if input {
            rec(Kind::BrowserToVm, 10, b"RFB 003.008\n");
        }
        rec(Kind::VmToBrowser, 2_000, &[0u8; 300]);
        rec(Kind::End, 5_000, b"complete");
        f
    }

    #[test]
    fn round_trip() {
        for input in [false, true] {
            let f = sample(input);
            let p = parse(&f).unwrap();
            assert_eq!(p.header.session, "demo-1");
            assert_eq!(p.header.start_unix_micros, 1_780_000_000_000_000);
            assert_eq!(p.header.input_included(), input);
            assert_eq!(p.end, Some(EndReason::Complete));
            assert_eq!(p.records.len(), if input { 3 } else { 2 });
            assert_eq!(p.records[0].payload, b"RFB 003.008\n");
            assert_eq!(p.records.last().unwrap().micros, 2_000);
            assert_eq!(p.records.last().unwrap().payload.len(), 300);
        }
        for r in EndReason::ALL {
            assert_eq!(EndReason::parse(r.as_str().as_bytes()), Some(r));
        }
    }

    #[test]
    fn truncated_anywhere_is_refused_precisely() {
        let f = sample(true);
        let (_, hl) = parse_header(&f).unwrap();
        let mut boundaries = vec![hl];
        let mut off = hl;
        while off < f.len() {
            let len = u32::from_be_bytes(f[off + 9..off + 13].try_into().unwrap()) as usize;
            off += RECORD_HEAD + len;
            boundaries.push(off);
        }
        for cut in 0..f.len() {
            let r = parse(&f[..cut]);
            if cut < hl {
                assert!(
                    matches!(r, Err(FormatError::TruncatedHeader | FormatError::BadMagic)),
                    "cut {cut}: {r:?}"
                );
                if cut > 0 {
                    assert_eq!(r, Err(FormatError::TruncatedHeader), "cut {cut}");
                }
            } else if boundaries.contains(&cut) {
                // Cut at a record boundary: what the gateway leaves when it stops.
                let p = r.unwrap();
                assert_eq!(p.end, None);
            } else {
                let start = *boundaries.iter().rfind(|&&b| b < cut).unwrap() as u64;
                assert_eq!(
                    r,
                    Err(FormatError::TruncatedRecord { offset: start }),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn corrupt_and_unknown_are_refused_by_name() {
        let f = sample(false);
        let (_, hl) = parse_header(&f).unwrap();
        let mut bad = f.clone();
        bad[0] = b'V';
        assert_eq!(parse(&bad), Err(FormatError::BadMagic));
        assert_eq!(parse(b"GIF89a...."), Err(FormatError::BadMagic));
        let mut v2 = f.clone();
        v2[8..10].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(parse(&v2), Err(FormatError::UnknownVersion(2)));
        assert!(
            FormatError::UnknownVersion(2)
                .to_string()
                .contains("version 2")
        );
        let mut fl = f.clone();
        fl[11] = 0x82;
        assert_eq!(parse(&fl), Err(FormatError::UnknownFlags(0x82)));
        let mut id = f.clone();
        id[HEADER_FIXED] = b'/';
        assert_eq!(parse(&id), Err(FormatError::BadSessionId));
        let mut kind = f.clone();
        kind[hl] = 9;
        assert_eq!(
            parse(&kind),
            Err(FormatError::UnknownKind {
                kind: 9,
                offset: hl as u64
            })
        );
        let mut after = f.clone();
        let end_at = after.len() as u64;
        after.extend_from_slice(&record_head(Kind::VmToBrowser, 6_000, 0));
        assert_eq!(parse(&after), Err(FormatError::AfterEnd { offset: end_at }));
        let mut reason = f.clone();
        let n = reason.len();
        reason[n - 1] = b'X';
        assert!(matches!(
            parse(&reason),
            Err(FormatError::BadEndReason { .. })
        ));
        let mut input = f[..hl].to_vec();
        input.extend_from_slice(&record_head(Kind::BrowserToVm, 0, 1));
        input.push(0);
        assert_eq!(
            parse(&input),
            Err(FormatError::UnflaggedInput { offset: hl as u64 })
        );
        let mut back = f[..hl].to_vec();
        back.extend_from_slice(&record_head(Kind::VmToBrowser, 10, 0));
        back.extend_from_slice(&record_head(Kind::VmToBrowser, 9, 0));
        assert_eq!(
            parse(&back),
            Err(FormatError::TimeGoesBack {
                offset: (hl + RECORD_HEAD) as u64
            })
        );
    }
}
