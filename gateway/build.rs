//! Stamps the binary with the commit it was built from (`vncgate_build_info{commit}`):
//! `VNCGATE_COMMIT` when a packager sets it, else `git rev-parse --short=12 HEAD` when this
//! crate is tracked by git, else `unknown` (a build from a tarball has no `.git`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !s.trim().is_empty()).then(|| s.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VNCGATE_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = match std::env::var("VNCGATE_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => from_git(&dir).unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=VNCGATE_COMMIT={commit}");
}

/// The commit of HEAD, and the files that change when HEAD moves (watched, so a commit or
/// a checkout rebuilds with the new id). `None` outside git, or where this crate is not
/// tracked (a tarball unpacked inside some other repository).
fn from_git(dir: &Path) -> Option<String> {
    git(dir, &["ls-files", "--error-unmatch", "Cargo.toml"])?;
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    // In a worktree HEAD lives in the worktree's git dir, branches in the common one.
    let git_dir = abs(git(dir, &["rev-parse", "--git-dir"])?);
    let common = git(dir, &["rev-parse", "--git-common-dir"]).map_or(git_dir.clone(), abs);
    let mut watch = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(common.join(branch));
    }
    for p in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Some(commit)
}
