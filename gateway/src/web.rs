//! `--web DIR`: static files (noVNC's `vnc.html` and its modules) on the public port, for
//! plain GET and HEAD requests; WebSocket upgrades on the same port still go to the relay.
//!
//! What a request may name is decided before the filesystem is touched ([`decode_path`]):
//! the target is percent-decoded once, strictly (a malformed escape, NUL, an encoded `/` or
//! `\`, bytes that are not UTF-8, which is where overlong encodings such as `%c0%ae` end, are
//! 400), and a `.` or `..` segment, literal or encoded, is 400 too: browsers resolve dot
//! segments before they send a URL (RFC 3986 §5.2.4), so only a crafted request has one.
//! Then the path is resolved with `realpath(3)` and must stay under the web root's own
//! resolved path, so a symlink that points out of DIR is 403. A directory answers with its
//! `index.html` (a redirect adds the trailing slash first, so relative links work); there is
//! no listing.
//!
//! The worker must not block long. A file is read whole with one `read(2)` loop, at most
//! [`MAX_FILE`] bytes, and kept in the worker's own cache under its identity (device,
//! inode, size, mtime), so a page's later loads cost one `stat(2)` and no read. The first load
//! of a file reads it from the page cache in practice (noVNC's files are about 1 MiB
//! together); the cache of a worker is bounded by [`MAX_CACHE`] and emptied when full.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;

use crate::admission::Refusal;
use crate::close::Blame;

/// The largest file served. noVNC's largest module is under 200 KiB.
pub const MAX_FILE: u64 = 16 << 20;
/// The most file bytes one worker keeps cached.
pub const MAX_CACHE: usize = 64 << 20;

/// The path is not one a browser sends: bad escapes, NUL, encoded separators, not UTF-8.
pub const fn bad_path(reason: &'static str) -> Refusal {
    Refusal::new(400, "web_bad_path", reason, Blame::Browser)
}
pub const DOT_SEGMENT: Refusal = Refusal::new(
    400,
    "web_dot_segment",
    "'.' or '..' segment in the path",
    Blame::Browser,
);
pub const OUTSIDE_ROOT: Refusal = Refusal::new(
    403,
    "web_outside_root",
    "path leads outside the web directory",
    Blame::Browser,
);
pub const NOT_FOUND: Refusal = Refusal::new(404, "web_not_found", "file not found", Blame::Browser);
pub const NO_LISTING: Refusal = Refusal::new(
    403,
    "web_no_listing",
    "directory without index.html (no listings)",
    Blame::Browser,
);
pub const TOO_LARGE: Refusal = Refusal::new(
    403,
    "web_file_too_large",
    "file larger than the gateway serves (16 MiB)",
    Blame::Gateway,
);
/// The file exists but the gateway cannot read it (permissions): the operator's to fix.
pub const UNREADABLE: Refusal = Refusal::new(
    403,
    "web_unreadable",
    "file not readable by the gateway",
    Blame::Gateway,
);

/// Every refusal of this module, for the metrics' zero series.
pub fn refusals() -> [Refusal; 7] {
    [
        bad_path(""),
        DOT_SEGMENT,
        OUTSIDE_ROOT,
        NOT_FOUND,
        NO_LISTING,
        TOO_LARGE,
        UNREADABLE,
    ]
}

/// Percent-decodes a request target's path (query removed) once and splits it into
/// segments, refusing what could name something other than a file under the root.
pub fn decode_path(target: &str) -> Result<Vec<String>, Refusal> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let raw = path.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(bad_path("malformed percent-encoding in the path"));
            };
            let d = (h * 16 + l) as u8;
            match d {
                0 => return Err(bad_path("NUL in the path")),
                b'/' | b'\\' => return Err(bad_path("encoded '/' or '\\' in the path")),
                _ => out.push(d),
            }
            i += 3;
        } else {
            if b == b'\\' || b == 0 {
                return Err(bad_path("'\\' or NUL in the path"));
            }
            out.push(b);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| bad_path("path is not UTF-8"))?;
    let mut segments = Vec::new();
    for seg in s.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." {
            return Err(DOT_SEGMENT);
        }
        segments.push(seg.to_owned());
    }
    Ok(segments)
}

/// The `Content-Type` for a file name, by extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("webmanifest") => "application/manifest+json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("wasm") => "application/wasm",
        Some("txt") => "text/plain; charset=utf-8",
        Some("xml") => "application/xml",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("otf") => "font/otf",
        Some("oga" | "ogg") => "audio/ogg",
        Some("mp3") => "audio/mpeg",
        Some("wav") => "audio/wav",
        _ => "application/octet-stream",
    }
}

/// What a plain request gets.
#[derive(Debug)]
pub enum Answer {
    File {
        body: Rc<[u8]>,
        content_type: &'static str,
    },
    /// A directory named without its trailing slash: 301 to the same path with one.
    Redirect(String),
    Refuse(Refusal),
}

/// A file's identity and version: a replaced file (new inode) or a rewritten one (new size
/// or mtime) is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(u64, u64, u64, SystemTime);

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp(
            m.dev(),
            m.ino(),
            m.len(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        )
    }
}

/// A file read once, and what it looked like then.
type Cached = (Stamp, Rc<[u8]>);

/// One worker's view of the web root, with its file cache.
pub struct Site {
    /// The root's resolved path: every file served resolves under it.
    root: PathBuf,
    cache: RefCell<HashMap<PathBuf, Cached>>,
    cached: Cell<usize>,
}

/// Resolves and checks `--web DIR` at startup.
pub fn check_root(dir: &Path) -> Result<PathBuf, String> {
    let root = std::fs::canonicalize(dir).map_err(|e| format!("--web {}: {e}", dir.display()))?;
    if !root.is_dir() {
        return Err(format!("--web {}: not a directory", dir.display()));
    }
    Ok(root)
}

impl Site {
    /// `root` as [`check_root`] resolved it.
    pub fn new(root: PathBuf) -> Site {
        Site {
            root,
            cache: RefCell::default(),
            cached: Cell::new(0),
        }
    }

    /// Resolves `rel` and checks it stays under the root.
    fn resolve(&self, rel: &Path) -> Result<PathBuf, Refusal> {
        let p = std::fs::canonicalize(self.root.join(rel)).map_err(|e| io_refusal(&e))?;
        if !p.starts_with(&self.root) {
            return Err(OUTSIDE_ROOT);
        }
        Ok(p)
    }

    /// The answer to a GET or HEAD for `target`.
    pub fn answer(&self, target: &str) -> Answer {
        match self.try_answer(target) {
            Ok(a) => a,
            Err(r) => Answer::Refuse(r),
        }
    }

    fn try_answer(&self, target: &str) -> Result<Answer, Refusal> {
        let segments = decode_path(target)?;
        let rel: PathBuf = segments.iter().collect();
        let mut path = self.resolve(&rel)?;
        let mut meta = std::fs::metadata(&path).map_err(|e| io_refusal(&e))?;
        if meta.is_dir() {
            let raw_path = target.split(['?', '#']).next().unwrap_or("");
            if !raw_path.ends_with('/') {
                return Ok(Answer::Redirect(location(&segments)));
            }
            path = match self.resolve(&rel.join("index.html")) {
                Ok(p) => p,
                Err(r) if r == NOT_FOUND => return Err(NO_LISTING),
                Err(r) => return Err(r),
            };
            meta = std::fs::metadata(&path).map_err(|e| io_refusal(&e))?;
        }
        if !meta.is_file() {
            return Err(NOT_FOUND);
        }
        if meta.len() > MAX_FILE {
            return Err(TOO_LARGE);
        }
        let content_type = content_type(&path);
        let stamp = Stamp::of(&meta);
        if let Some((s, body)) = self.cache.borrow().get(&path)
            && *s == stamp
        {
            return Ok(Answer::File {
                body: body.clone(),
                content_type,
            });
        }
        let body: Rc<[u8]> = read_bounded(&path)?.into();
        let mut cache = self.cache.borrow_mut();
        if self.cached.get() + body.len() > MAX_CACHE {
            cache.clear();
            self.cached.set(0);
        }
        if let Some((_, old)) = cache.insert(path, (stamp, body.clone())) {
            self.cached.set(self.cached.get() - old.len());
        }
        self.cached.set(self.cached.get() + body.len());
        Ok(Answer::File { body, content_type })
    }
}

/// Reads a file of at most [`MAX_FILE`] bytes (it may have grown since its `stat`).
fn read_bounded(path: &Path) -> Result<Vec<u8>, Refusal> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| io_refusal(&e))?;
    let mut body = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut body)
        .map_err(|e| io_refusal(&e))?;
    if body.len() as u64 > MAX_FILE {
        return Err(TOO_LARGE);
    }
    Ok(body)
}

fn io_refusal(e: &io::Error) -> Refusal {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => NOT_FOUND,
        _ if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP) => {
            NOT_FOUND
        }
        _ => UNREADABLE,
    }
}

/// The redirect target for a directory: its decoded segments encoded again, so that the
/// `Location` is always a path of this host (never `//elsewhere`).
fn location(segments: &[String]) -> String {
    let mut out = String::from("/");
    for s in segments {
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push('/');
    }
    out
}

/// The head of a 200 (with `len` body bytes) or a 301.
pub fn response_head(answer: &Answer) -> Option<Vec<u8>> {
    let common =
        "X-Content-Type-Options: nosniff\r\nCache-Control: no-cache\r\nConnection: close\r\n";
    match answer {
        Answer::File { body, content_type } => Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{common}\r\n",
                body.len()
            )
            .into_bytes(),
        ),
        Answer::Redirect(to) => Some(
            format!(
                "HTTP/1.1 301 Moved Permanently\r\nLocation: {to}\r\nContent-Length: 0\r\n{common}\r\n"
            )
            .into_bytes(),
        ),
        Answer::Refuse(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_once_and_strictly() {
        assert_eq!(decode_path("/").unwrap(), Vec::<String>::new());
        assert_eq!(
            decode_path("/app/ui.js?x=1").unwrap(),
            vec!["app".to_owned(), "ui.js".to_owned()]
        );
        assert_eq!(decode_path("/a%20b//c").unwrap(), vec!["a b", "c"]);
        // Decoded once: `%252e%252e` is a file named `%2e%2e`, not a parent.
        assert_eq!(decode_path("/%252e%252e/x").unwrap(), vec!["%2e%2e", "x"]);
        for dots in [
            "/..",
            "/../etc/passwd",
            "/a/./b",
            "/%2e%2e/x",
            "/%2E%2e",
            "/a/.%2e/",
        ] {
            assert_eq!(decode_path(dots), Err(DOT_SEGMENT), "{dots}");
        }
        for (bad, why) in [
            ("/%", "malformed percent-encoding in the path"),
            ("/%2", "malformed percent-encoding in the path"),
            ("/%zz", "malformed percent-encoding in the path"),
            ("/%00", "NUL in the path"),
            ("/..%2fetc", "encoded '/' or '\\' in the path"),
            ("/a%2Fb", "encoded '/' or '\\' in the path"),
            ("/..%5cetc", "encoded '/' or '\\' in the path"),
            ("/..\\etc", "'\\' or NUL in the path"),
            // Overlong UTF-8 for '.' and '/': not UTF-8 at all.
            ("/%c0%ae%c0%ae/x", "path is not UTF-8"),
            ("/%c0%af", "path is not UTF-8"),
            ("/%ff", "path is not UTF-8"),
        ] {
            assert_eq!(decode_path(bad), Err(bad_path(why)), "{bad}");
        }
    }

    #[test]
    fn content_types_by_extension() {
        for (f, t) in [
            ("vnc.html", "text/html; charset=utf-8"),
            ("a/ui.JS", "text/javascript; charset=utf-8"),
            ("x.css", "text/css; charset=utf-8"),
            ("i.svg", "image/svg+xml"),
            ("i.png", "image/png"),
            ("favicon.ico", "image/x-icon"),
            ("m.json", "application/json"),
            ("m.js.map", "application/json"),
            ("w.wasm", "application/wasm"),
            ("bell.oga", "audio/ogg"),
            ("noext", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(f)), t, "{f}");
        }
    }

    #[test]
    fn redirect_locations_stay_on_this_host() {
        assert_eq!(location(&["app".into()]), "/app/");
        assert_eq!(location(&["evil.com".into()]), "/evil.com/");
        assert_eq!(location(&["a b".into(), "c?".into()]), "/a%20b/c%3F/");
    }
}
