//! A `vncgate-controller` as the session benches drive it: started as a child process on a
//! free port with a work directory of its own, killed by pid when dropped; sessions created,
//! waited for (the API's wait, no polling) and deleted over its HTTP API.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Controller {
    child: Child,
    pub addr: String,
    pub work: PathBuf,
}

impl Controller {
    /// Starts `binary` with `extra` flags; its address from its "listening on" line.
    pub fn start(binary: &Path, tag: &str, extra: &[String]) -> Result<Self, String> {
        let work = std::env::temp_dir().join(format!("vncgate-bench-{tag}-{}", std::process::id()));
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--work-dir"])
            .arg(&work)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the controller did not start ({})",
                    binary.display()
                ));
            }
            if let Some(a) = line
                .trim()
                .strip_prefix("vncgate-controller: listening on http://")
            {
                break a.to_owned();
            }
        };
        std::thread::spawn(move || for _ in out.lines() {});
        Ok(Self { child, addr, work })
    }

    /// One HTTP/1.1 exchange; (status, JSON).
    pub fn http(&self, method: &str, path: &str, body: &str) -> Result<(u16, Value), String> {
        vncgate_loadtest::http::json(&self.addr, method, path, body)
            .map_err(|e| format!("{method} {path}: {e}"))
    }

    /// Creates a session; its id.
    pub fn create(&self) -> Result<String, String> {
        let (st, c) = self.http(
            "POST",
            "/api/sessions",
            r#"{"user_id":"bench","provider":"bench"}"#,
        )?;
        if st != 201 {
            return Err(format!("create answered {st}: {c}"));
        }
        Ok(c["id"].as_str().ok_or("no id")?.to_owned())
    }

    /// Waits until `id` is ready (at most `timeout`); an error with its state and reason
    /// when it ended otherwise.
    pub fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Value, String> {
        let (_, w) = self.http(
            "GET",
            &format!(
                "/api/sessions/{id}/wait?state=ready&timeout={}",
                timeout.as_secs_f64().min(300.0)
            ),
            "",
        )?;
        if w["state"] != "ready" {
            return Err(format!(
                "session {id} ended {} ({})",
                w["state"],
                w["reason"].as_str().unwrap_or("no reason")
            ));
        }
        Ok(w)
    }

    pub fn delete(&self, id: &str) -> Result<(), String> {
        let (st, d) = self.http("DELETE", &format!("/api/sessions/{id}"), "")?;
        if st != 202 {
            return Err(format!("delete answered {st}: {d}"));
        }
        Ok(())
    }

    /// Create, wait for ready, delete; the create-to-ready time.
    pub fn one(&self, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let id = self.create()?;
        self.wait_ready(&id, timeout)?;
        let took = t0.elapsed();
        self.delete(&id)?;
        Ok(took)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The `p` quantile (0..=1) of sorted `xs`, nearest rank.
pub fn quantile(xs: &[Duration], p: f64) -> f64 {
    xs[((xs.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}
