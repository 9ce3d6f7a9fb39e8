//! A QMP client (QEMU's JSON machine protocol, one JSON object per line over a unix socket):
//! the greeting, `qmp_capabilities`, then commands whose answers are `return` or `error`,
//! with asynchronous `event` lines skipped (and kept for who asks).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Events seen while waiting for answers, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until it answers or `timeout` passes (QEMU creates the
    /// socket a little after it starts), and leaves capabilities negotiation done.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP {}: {e} (after {timeout:?})", path.display()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = qmp.read_line(timeout).await?;
        if greeting.get("QMP").is_none() {
            return Err(format!(
                "QMP {}: no greeting, got {greeting}",
                path.display()
            ));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_line(&mut self, timeout: Duration) -> Result<Value, String> {
        let mut line = String::new();
        match tokio::time::timeout(timeout, self.reader.read_line(&mut line)).await {
            Err(_) => Err(format!("QMP: no answer within {timeout:?}")),
            Ok(Err(e)) => Err(format!("QMP: {e}")),
            Ok(Ok(0)) => Err("QMP: QEMU closed the connection".into()),
            Ok(Ok(_)) => serde_json::from_str(&line)
                .map_err(|e| format!("QMP: not JSON ({e}): {}", line.trim())),
        }
    }

    /// Runs one command; its `return` value, or its `error` as `class: desc`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.read_line(Duration::from_secs(30)).await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!(
                    "QMP {command}: {}: {}",
                    e["class"].as_str().unwrap_or("Error"),
                    e["desc"].as_str().unwrap_or("")
                ));
            }
            return Err(format!("QMP {command}: unexpected answer {v}"));
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status", None).await?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Polls `query-migrate` until the migration completes; its final record.
    pub async fn wait_migration(&mut self, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(format!(
                        "migration {}: {}",
                        r["status"].as_str().unwrap_or_default(),
                        r["error-desc"].as_str().unwrap_or("no reason given")
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!("migration not complete within {timeout:?}: {r}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}
