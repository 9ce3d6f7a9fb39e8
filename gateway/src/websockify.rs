//! `vncgate websockify`: websockify's command line on vncgate's gateway, so that moving from
//! websockify is one word. The command line becomes the same [`Settings`] `vncgate serve`
//! runs on (the same workers, relay and close codes); what differs is only how an upgrade
//! names its target:
//!
//! - `TARGET_ADDR`: every upgrade, on any path, goes to that one address, as the static
//!   route [`TARGET_SESSION`];
//! - a token file (`--token-plugin TokenFile --token-source FILE_OR_DIR`, or the old
//!   `--target-config FILE`): `?token=T` selects the line `T: host:port`. Each line becomes
//!   a static route keyed by [`token_session_id`] (a short SHA-256 prefix: the session id
//!   every log line shows, never the token) and holding the token's digest, so the token
//!   is checked in constant time as every route token is. The file is reread when it
//!   changes (and on SIGHUP) through the same reload as the routes file: a token removed
//!   closes its live sessions with 4006.
//!
//! Either way the allowlist (`--allow-upstream`) is exactly the targets named, so the
//! gateway stays no open proxy. Options of websockify that vncgate does not have are refused
//! by name with what to use instead ([`REFUSED`]), never ignored.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vncgate_ws::handshake::PresentedToken;

use crate::admission::{self, Refusal};
use crate::close::Blame;
use crate::config::cli::WebsockifyArgs;
use crate::config::{ServeArgs, Settings};
use crate::route::{self, Route};
use crate::token::{Token, TokenDigest};

/// How an upgrade names its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionFrom {
    /// `vncgate serve`: the path segment after `--path-prefix`.
    #[default]
    Path,
    /// `vncgate websockify ... TARGET_ADDR`: every upgrade goes to [`TARGET_SESSION`].
    Target,
    /// `vncgate websockify --token-plugin TokenFile`: the token names the route.
    Tokens,
}

/// The route of `vncgate websockify SOURCE TARGET`.
pub const TARGET_SESSION: &str = "websockify";

/// A token the token file does not hold (websockify: "Token '...' not found"; the token
/// itself is never echoed).
pub const UNKNOWN_TOKEN: Refusal = Refusal::new(
    404,
    "unknown_token",
    "token not found in the token file",
    Blame::Browser,
);

/// The session id of a token file's token: `tok-` and the first 8 bytes of its SHA-256 in
/// hex. Logs show this, never the token.
pub fn token_session_id(digest: &TokenDigest) -> String {
    format!("tok-{}", hex::encode(&digest[..8]))
}

/// The session id an upgrade asks for, from its path segment (`serve`) or its token.
pub fn session_of<'a>(
    from: SessionFrom,
    path_segment: &'a str,
    token: Option<&PresentedToken>,
) -> Result<Cow<'a, str>, Refusal> {
    match from {
        SessionFrom::Path => Ok(Cow::Borrowed(path_segment)),
        SessionFrom::Target => Ok(Cow::Borrowed(TARGET_SESSION)),
        SessionFrom::Tokens => {
            let t = token.ok_or(admission::TOKEN_REQUIRED)?;
            Ok(Cow::Owned(token_session_id(&Token::digest_of(t.bytes()))))
        }
    }
}

/// Parses websockify's `TokenFile` format: one `token: host:port` per line (split at the
/// first colon followed by whitespace, as websockify does), `#` comments and blank lines
/// skipped. Unlike websockify, which logs a bad line and skips it, a bad line is an error
/// naming the file and line: a reload then keeps the tokens in force.
pub fn parse_tokens(text: &str, name: &str) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{name}:{}", i + 1);
        let split = line
            .char_indices()
            .find(|&(j, c)| c == ':' && line[j + 1..].starts_with(char::is_whitespace));
        let Some((j, _)) = split else {
            return Err(format!("{}: not 'token: host:port'", at()));
        };
        let (token, target) = (line[..j].trim(), line[j + 1..].trim());
        vncgate_schema::record::check_token(token.as_bytes())
            .map_err(|e| format!("{}: {e}", at()))?;
        if !target.contains(':') {
            return Err(format!("{}: target '{target}' is not host:port", at()));
        }
        let addr = route::resolve(target).map_err(|e| format!("{}: {e}", at()))?;
        out.push((token.to_owned(), addr));
    }
    Ok(out)
}

/// The files a token source stands for: the file, or every regular file of the directory
/// (sorted, so errors and duplicates are reported the same way each time).
fn token_files(source: &Path) -> Result<Vec<PathBuf>, String> {
    let what = |e: std::io::Error| format!("--token-source {}: {e}", source.display());
    if !std::fs::metadata(source).map_err(what)?.is_dir() {
        return Ok(vec![source.to_owned()]);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(source).map_err(what)? {
        let p = e.map_err(what)?.path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads a token source (file or directory) as routes, keyed by [`token_session_id`]. The
/// same token twice is an error naming both places (websockify keeps one of them, which
/// one depending on the directory's order).
pub fn load_tokens(source: &Path) -> Result<Vec<(String, Route)>, String> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for f in token_files(source)? {
        let name = f.display().to_string();
        let text =
            std::fs::read_to_string(&f).map_err(|e| format!("--token-source {name}: {e}"))?;
        for (token, upstream) in parse_tokens(&text, &name)? {
            let digest = Token::digest_of(token.as_bytes());
            let id = token_session_id(&digest);
            if let Some(first) = seen.insert(id.clone(), name.clone()) {
                return Err(format!(
                    "--token-source: a token is defined twice (in {first} and {name}; session {id})"
                ));
            }
            out.push((
                id,
                Route {
                    upstream,
                    token_digest: Some(digest),
                    view_token_digest: None,
                    expires_at: None,
                    max_viewers: None,
                    record: false,
                },
            ));
        }
    }
    Ok(out)
}

/// A file's device, inode, size and mtime.
pub type FileStamp = (u64, u64, u64, SystemTime);

/// A token source's files, each with its stamp (`None`: gone), as [`source_stamp`] takes it.
pub type SourceStamp = Vec<(PathBuf, Option<FileStamp>)>;

/// What a token source looks like now: each file's identity and version, so that an edit,
/// a rename over it, or a file added to or removed from the directory counts as a change.
pub fn source_stamp(source: &Path) -> SourceStamp {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = token_files(source).unwrap_or_default();
    files.insert(0, source.to_owned());
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                )
            });
            (p, m)
        })
        .collect()
}

/// websockify's options that vncgate does not have, each with the vncgate way to get the
/// same (or why there is none). `(flag, takes a value, equivalent)`; the one place to change.
pub const REFUSED: &[(&str, bool, &str)] = &[
    (
        "--daemon",
        false,
        "vncgate stays in the foreground: run it under systemd (config/systemd/vncgate.service) or your supervisor",
    ),
    (
        "-D",
        false,
        "vncgate stays in the foreground: run it under systemd (config/systemd/vncgate.service) or your supervisor",
    ),
    (
        "--run-once",
        false,
        "vncgate serves until stopped: --idle-timeout SECS exits once no client has been connected for SECS",
    ),
    (
        "--unix-target",
        true,
        "vncgate dials TCP only: let the VNC server listen on loopback (Xvnc -rfbport 5900 -localhost) and give TARGET_ADDR 127.0.0.1:5900",
    ),
    (
        "--ssl-target",
        false,
        "vncgate dials the VNC server in plain TCP: keep it on loopback or a private network (vncgate serve --allow-upstream CIDR)",
    ),
    (
        "--wrap-mode",
        true,
        "vncgate wraps no program: start the VNC server yourself (or under systemd) and give TARGET_ADDR",
    ),
    (
        "--",
        false,
        "vncgate wraps no program (websockify's WRAP_COMMAND_LINE): start the VNC server yourself and give TARGET_ADDR",
    ),
    (
        "--auth-plugin",
        true,
        "tokens are vncgate's authentication: --token-plugin TokenFile --token-source FILE, or vncgate serve --routes-file (token_sha256) or --redis",
    ),
    (
        "--auth-source",
        true,
        "tokens are vncgate's authentication: --token-plugin TokenFile --token-source FILE, or vncgate serve --routes-file (token_sha256) or --redis",
    ),
    (
        "--web-auth",
        false,
        "files under --web are served without authentication; every WebSocket needs its token (--token-plugin TokenFile)",
    ),
    (
        "--host-token",
        false,
        "tokens come from ?token=T (or the vncgate.token.T subprotocol, or Authorization: Bearer T), not from the Host header",
    ),
    (
        "--libserver",
        false,
        "vncgate has one server engine (thread-per-core, io_uring or epoll: --io-driver); drop the flag",
    ),
    (
        "--prefer-ipv6",
        false,
        "give the address to bind: SOURCE_ADDR [::]:PORT (every IPv6 interface) or [::1]:PORT",
    ),
    (
        "-6",
        false,
        "give the address to bind: SOURCE_ADDR [::]:PORT (every IPv6 interface) or [::1]:PORT",
    ),
    (
        "--inetd",
        false,
        "vncgate binds its own socket: give SOURCE_ADDR (restarts without refusals: vncgate serve --handover-socket PATH)",
    ),
    (
        "--syslog",
        true,
        "vncgate logs to stderr (the journal under systemd); --log-format json for a collector",
    ),
    (
        "--legacy-syslog",
        false,
        "vncgate logs to stderr (the journal under systemd); --log-format json for a collector",
    ),
    (
        "--log-file",
        true,
        "vncgate logs to stderr: vncgate websockify ... 2>>FILE",
    ),
    (
        "--unix-listen",
        true,
        "vncgate listens on TCP: SOURCE_ADDR 127.0.0.1:PORT for clients on this host",
    ),
    (
        "--unix-listen-mode",
        true,
        "vncgate listens on TCP: SOURCE_ADDR 127.0.0.1:PORT for clients on this host",
    ),
    (
        "--traffic",
        false,
        "no per-frame trace: vncgate_relayed_bytes_total on --admin ADDR /metrics, and each session's 'session closed' log line has the bytes each way",
    ),
    (
        "--verify-client",
        false,
        "no client certificates: tokens authenticate clients (--token-plugin TokenFile --token-source FILE)",
    ),
    (
        "--cafile",
        true,
        "no client certificates: tokens authenticate clients (--token-plugin TokenFile --token-source FILE)",
    ),
    (
        "--ssl-version",
        true,
        "vncgate's TLS is fixed: TLS 1.2 and 1.3 (rustls), nothing older",
    ),
    (
        "--ssl-ciphers",
        true,
        "vncgate's TLS is fixed: rustls's default TLS 1.2 and 1.3 cipher suites",
    ),
];

/// The token plugins vncgate reads: websockify's `TokenFile` and `ReadOnlyTokenFile`
/// (both reread here when the file changes), with or without their module path.
const TOKEN_FILE_PLUGINS: [&str; 4] = [
    "TokenFile",
    "ReadOnlyTokenFile",
    "websockify.token_plugins.TokenFile",
    "websockify.token_plugins.ReadOnlyTokenFile",
];

/// Refuses the first websockify option of `args` (the words after `websockify`) that
/// vncgate does not have, by name, with its equivalent.
pub fn check_refused(args: &[OsString]) -> Result<(), String> {
    for a in args {
        let Some(a) = a.to_str() else { continue };
        let flag = a.split_once('=').map_or(a, |(f, _)| f);
        if let Some((name, _, instead)) = REFUSED.iter().find(|(f, _, _)| *f == flag) {
            return Err(format!(
                "vncgate websockify does not support websockify's {name}: {instead}"
            ));
        }
    }
    Ok(())
}

/// websockify's `[HOST:]PORT`: a bare port binds every interface, as websockify's does.
pub fn listen_addr(source: &str) -> String {
    if !source.is_empty() && source.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.0.0.0:{source}")
    } else {
        source.to_owned()
    }
}

/// The `--allow-upstream` entry of exactly one address.
fn host_net(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => format!("{}/32", v.ip()),
        SocketAddr::V6(v) => format!("{}/128", v.ip()),
    }
}

impl WebsockifyArgs {
    /// The `vncgate serve` flags this command line stands for, and how upgrades name their
    /// route. The token file is read here, so a reload (this again) rereads it.
    fn serve_args(&self) -> Result<(ServeArgs, SessionFrom, Option<PathBuf>), String> {
        let Some(source) = &self.source_addr else {
            return Err("vncgate websockify needs SOURCE_ADDR ([HOST:]PORT to listen on), as websockify does".into());
        };
        let tokens = match (&self.token_plugin, &self.token_source, &self.target_config) {
            (None, None, None) => None,
            (_, _, Some(f)) if self.token_plugin.is_none() && self.token_source.is_none() => {
                Some(f.clone())
            }
            (_, _, Some(_)) => {
                return Err("--target-config FILE is the old spelling of --token-plugin TokenFile --token-source FILE: give one of them".into());
            }
            (Some(p), Some(f), None) if TOKEN_FILE_PLUGINS.contains(&p.as_str()) => Some(f.clone()),
            (Some(p), _, None) if !TOKEN_FILE_PLUGINS.contains(&p.as_str()) => {
                return Err(format!(
                    "--token-plugin {p}: vncgate reads websockify's TokenFile only (--token-plugin TokenFile --token-source FILE_OR_DIR); routes from Redis are vncgate serve --redis URL with vncgate route add"
                ));
            }
            (Some(_), None, None) => {
                return Err("--token-plugin TokenFile needs --token-source FILE_OR_DIR".into());
            }
            (None, Some(_), None) => {
                return Err(
                    "--token-source needs --token-plugin TokenFile, as in websockify".into(),
                );
            }
            (Some(_), Some(_), None) => unreachable!("every plugin is either read or refused"),
        };
        let mut a = ServeArgs {
            listen: Some(listen_addr(source)),
            workers: self.workers,
            pin_workers: self.pin_workers,
            io_driver: self.io_driver,
            admin: self.admin.clone(),
            keepalive_interval: self.heartbeat,
            // websockify has no per-session idle timeout: sessions never end for quiet.
            idle_timeout: Some(Duration::ZERO),
            web: self.web.clone(),
            record: self.record.clone(),
            tls_cert: self.cert.clone(),
            // websockify's --cert alone: the key is in the same PEM.
            tls_key: self.key.clone().or_else(|| self.cert.clone()),
            log_level: self.verbose.then(|| "debug".to_owned()),
            log_format: self.log_format,
            ..Default::default()
        };
        let from = match (&tokens, &self.target_addr) {
            (Some(_), Some(t)) => {
                return Err(format!(
                    "give TARGET_ADDR ({t}) or a token file, not both: with --token-plugin TokenFile the token selects the target"
                ));
            }
            (Some(_), None) => SessionFrom::Tokens,
            (None, Some(t)) => {
                if !t.contains(':') {
                    return Err(format!("TARGET_ADDR '{t}' is not HOST:PORT"));
                }
                let addr = route::resolve(t).map_err(|e| format!("TARGET_ADDR: {e}"))?;
                a.routes.push(format!("{TARGET_SESSION}={addr}"));
                a.allow_upstream.push(host_net(&addr));
                SessionFrom::Target
            }
            (None, None) => {
                return Err("vncgate websockify needs TARGET_ADDR (HOST:PORT) or --token-plugin TokenFile --token-source FILE_OR_DIR".into());
            }
        };
        Ok((a, from, tokens))
    }

    /// The settings `vncgate serve` runs on, read again on every reload.
    pub fn settings(&self) -> Result<Settings, String> {
        if self.ssl_only && self.cert.is_none() {
            return Err(
                "--ssl-only needs --cert FILE (websockify: \"SSL only and self.pem not found\")"
                    .into(),
            );
        }
        let (mut a, from, tokens) = self.serve_args()?;
        // Read once per load: its targets are the allowlist, its tokens the routes. Stamped
        // first, so that a change made while it is read shows as a change.
        let stamp = tokens.as_deref().map(source_stamp).unwrap_or_default();
        let loaded = tokens.as_deref().map(load_tokens).transpose()?;
        for (_, r) in loaded.iter().flatten() {
            a.allow_upstream.push(host_net(&r.upstream));
        }
        // websockify reads no environment; neither does this command line.
        let mut s = a.settings_with_env(std::iter::empty())?;
        s.session_from = from;
        s.handshake.any_path = true;
        s.tls_accepts_plain = !self.ssl_only;
        s.exit_after = self.timeout.filter(|d| !d.is_zero());
        s.exit_when_idle = self.idle_timeout.filter(|d| !d.is_zero());
        if let Some(l) = loaded {
            s.routes = route::StaticRoutes::new(l.into_iter().collect());
            s.token_source = tokens;
            s.token_stamp = stamp;
        }
        Ok(s)
    }
}

/// Whether a word is websockify's `[HOST:]PORT` or `HOST:PORT`, not a mistyped command.
pub fn looks_like_address(w: &str) -> bool {
    w.contains(':') || (!w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))
}

/// `vncgate SOURCE TARGET` (websockify's words without `websockify`): the line that runs it.
pub fn hint_for_bare(args: &[OsString]) -> String {
    let words: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "vncgate takes a command first; websockify's command line runs as:\n  vncgate websockify {}",
        words.join(" ")
    )
}

/// `vncgate serve SOURCE [TARGET]`: the `serve` flags for it, and the websockify line.
pub fn hint_for_serve(positional: &[String]) -> String {
    let listen = listen_addr(&positional[0]);
    match positional.get(1) {
        None => format!(
            "vncgate serve takes no positional arguments: vncgate serve --listen {listen} --route ID=HOST:PORT --allow-upstream CIDR"
        ),
        Some(target) => {
            let (upstream, net) = match route::resolve(target) {
                Ok(a) => (a.to_string(), host_net(&a)),
                Err(_) => (target.clone(), "CIDR".to_owned()),
            };
            format!(
                "vncgate serve takes no positional arguments; for noVNC at ws://{listen}/vnc/vnc:\n  vncgate serve --listen {listen} --route vnc={upstream} --allow-upstream {net}\nor, websockify's way (any path):\n  vncgate websockify {} {target}",
                positional[0]
            )
        }
    }
}

/// `--listen PORT` on `vncgate serve`: refused with both addresses it could mean, since
/// serve's default binds loopback only and a bare port would open every interface.
pub fn check_serve_listen(listen: Option<&str>) -> Result<(), String> {
    match listen {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "--listen {p} is a bare port; give the address: --listen 127.0.0.1:{p} (this host only) or --listen 0.0.0.0:{p} (every interface, as websockify binds a bare port; vncgate websockify {p} ... takes it that way)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PinWorkers;
    use vncgate_ws::handshake::TokenSource;

    #[test]
    fn token_file_lines_as_websockify_reads_them() {
        let t = parse_tokens(
            "# a comment\n\nvm1: 127.0.0.1:5901\n  vm2:\t127.0.0.1:5902  \nv:3: 127.0.0.1:5903\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            t,
            vec![
                ("vm1".to_owned(), "127.0.0.1:5901".parse().unwrap()),
                ("vm2".to_owned(), "127.0.0.1:5902".parse().unwrap()),
                // Split at the first colon followed by whitespace, as websockify's `:\s`.
                ("v:3".to_owned(), "127.0.0.1:5903".parse().unwrap()),
            ]
        );
        for (bad, why) in [
            ("vm1 127.0.0.1:5901", "f:1: not 'token: host:port'"),
            ("vm1:127.0.0.1:5901", "f:1: not 'token: host:port'"),
            (
                "\nvm1: 127.0.0.1",
                "f:2: target '127.0.0.1' is not host:port",
            ),
            ("a,b: 127.0.0.1:1", "f:1: token has invalid characters"),
        ] {
            assert_eq!(parse_tokens(bad, "f").unwrap_err(), why, "{bad:?}");
        }
    }

    #[test]
    fn sessions_from_tokens_are_digests_never_the_token() {
        let t = PresentedToken::new(TokenSource::Query, b"s3cr3t");
        let id = session_of(SessionFrom::Tokens, "/websockify", Some(&t)).unwrap();
        assert_eq!(id, token_session_id(&Token::digest_of(b"s3cr3t")));
        assert!(id.starts_with("tok-") && id.len() == 20 && !id.contains("s3cr3t"));
        vncgate_schema::check_session_id(&id).unwrap();
        assert_eq!(
            session_of(SessionFrom::Tokens, "/", None).unwrap_err(),
            admission::TOKEN_REQUIRED
        );
        assert_eq!(
            session_of(SessionFrom::Target, "/any/path", None).unwrap(),
            TARGET_SESSION
        );
        assert_eq!(session_of(SessionFrom::Path, "vm1", None).unwrap(), "vm1");
    }

    #[test]
    fn vncgates_own_worker_flags_reach_the_server() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            w: WebsockifyArgs,
        }
        let args = |v: &[&str]| {
            let mut all = vec!["websockify"];
            all.extend_from_slice(v);
            Cmd::parse_from(all).w.serve_args().unwrap().0
        };
        // The bare flag does not take websockify's positional SOURCE as its value.
        let a = args(&["--workers", "3", "--pin-workers", "6080", "127.0.0.1:5900"]);
        assert_eq!(
            (a.workers, a.pin_workers),
            (Some(3), Some(PinWorkers::Always))
        );
        let a = args(&["--pin-workers=never", "6080", "127.0.0.1:5900"]);
        assert_eq!(a.pin_workers, Some(PinWorkers::Never));
        assert_eq!(args(&["6080", "127.0.0.1:5900"]).pin_workers, None);
    }

    #[test]
    fn refused_options_name_themselves_and_their_equivalent() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let e = check_refused(&os(&["--web", "d", "--log-file=/tmp/x", "6080"])).unwrap_err();
        assert!(e.contains("--log-file") && e.contains("2>>FILE"), "{e}");
        check_refused(&os(&["--record", "/tmp/x", "6080", "h:1"])).unwrap();
        let e = check_refused(&os(&["-D", "6080"])).unwrap_err();
        assert!(e.contains("-D") && e.contains("systemd"), "{e}");
        check_refused(&os(&["--web", "d", "6080", "h:1"])).unwrap();
        for (flag, _, instead) in REFUSED {
            assert!(!instead.is_empty(), "{flag}");
        }
    }

    #[test]
    fn bare_ports_and_hints() {
        assert_eq!(listen_addr("6080"), "0.0.0.0:6080");
        assert_eq!(listen_addr("127.0.0.1:6080"), "127.0.0.1:6080");
        assert!(
            check_serve_listen(Some("16080"))
                .unwrap_err()
                .contains("--listen 127.0.0.1:16080")
        );
        check_serve_listen(Some("127.0.0.1:1")).unwrap();
        let h = hint_for_serve(&["127.0.0.1:16080".into(), "127.0.0.1:5900".into()]);
        assert!(
            h.contains("vncgate serve --listen 127.0.0.1:16080 --route vnc=127.0.0.1:5900 --allow-upstream 127.0.0.1/32")
                && h.contains("vncgate websockify 127.0.0.1:16080 127.0.0.1:5900"),
            "{h}"
        );
    }
}
