//! A process's memory from `/proc/PID/smaps_rollup`: the one reader, used by the idle mode
//! (`--pid`) and by the benchmarks' memory points.

use std::io;

/// Resident and proportional set size of one process, in KiB. RSS counts shared pages in
/// full; PSS splits them among the processes that share them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// Reads `pid`'s memory. An unreadable file (no such process, no permission, a kernel
/// without smaps_rollup) or one without `Rss:` and `Pss:` lines is an error, never zeros.
pub fn read(pid: u32) -> io::Result<Memory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let s = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    parse(&s).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: no Rss/Pss lines"),
        )
    })
}

fn parse(s: &str) -> Option<Memory> {
    let field = |name: &str| {
        s.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.split_ascii_whitespace().next()?.parse::<u64>().ok()
        })
    };
    Some(Memory {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let m = read(std::process::id()).expect("smaps_rollup readable");
        assert!(
            m.rss_kib > 0 && m.pss_kib > 0 && m.pss_kib <= m.rss_kib,
            "{m:?}"
        );
    }

    #[test]
    fn unreadable_or_empty_is_an_error() {
        assert!(read(u32::MAX).is_err());
        assert_eq!(parse("Size: 4 kB\n"), None);
        assert_eq!(
            parse("00400000-7fff [rollup]\nRss:   100 kB\nPss:  60 kB\n"),
            Some(Memory {
                rss_kib: 100,
                pss_kib: 60
            })
        );
    }
}
