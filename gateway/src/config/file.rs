//! The TOML config file (`--config`): the same settings as the flags, in snake_case, with
//! seconds as numbers. Unknown keys are refused by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::settings::{IoDriver, Layer};

/// The config file: the same settings as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    #[serde(default)]
    pub routes: Vec<String>,
    pub routes_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_upstream: Vec<String>,
    pub workers: Option<usize>,
    pub pin_workers: Option<super::settings::PinWorkers>,
    pub io_driver: Option<IoDriver>,
    pub admin: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub allow_origins: Vec<String>,
    pub share_port: Option<bool>,
    pub max_sessions_per_worker: Option<usize>,
    pub max_message: Option<u64>,
    pub handshake_timeout: Option<f64>,
    pub connect_timeout: Option<f64>,
    pub connect_retry_window: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub max_session_duration: Option<f64>,
    pub keepalive_interval: Option<f64>,
    pub keepalive_timeout: Option<f64>,
    pub drain_timeout: Option<f64>,
    pub drain_spread: Option<f64>,
    pub handover_socket: Option<PathBuf>,
    pub proxy_protocol: Option<bool>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub pipe_size: Option<usize>,
    pub tcp_congestion: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub redis: Option<String>,
    pub route_cache_ttl: Option<f64>,
    pub route_negative_ttl: Option<f64>,
    pub redis_timeout: Option<f64>,
    pub max_viewers: Option<u32>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_level: Option<String>,
    pub web: Option<PathBuf>,
    pub record: Option<PathBuf>,
    pub record_scope: Option<super::settings::RecordScope>,
    pub record_input: Option<bool>,
    pub record_max_session_bytes: Option<u64>,
    pub record_max_dir_bytes: Option<u64>,
}

/// Reads and parses a config file; the error names the file and, for a bad key, the key.
pub fn read(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

fn secs(key: &str, v: Option<f64>) -> Result<Option<Duration>, String> {
    v.map(|v| super::settings::secs(v).map_err(|e| format!("config key {key}: {e}")))
        .transpose()
}

impl FileConfig {
    /// The file's layer.
    pub fn into_layer(self) -> Result<Layer, String> {
        Ok(Layer {
            listen: self.listen,
            workers: self.workers,
            pin_workers: self.pin_workers,
            io_driver: self.io_driver,
            admin: self.admin,
            path_prefix: self.path_prefix,
            share_port: self.share_port,
            routes_file: self.routes_file,
            max_sessions_per_worker: self.max_sessions_per_worker,
            max_message: self.max_message,
            pipe_size: self.pipe_size,
            handover_socket: self.handover_socket,
            proxy_protocol: self.proxy_protocol,
            tcp_congestion: self.tcp_congestion,
            max_header_bytes: self.max_header_bytes,
            redis: self.redis,
            max_viewers: self.max_viewers,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            log_level: self.log_level,
            web: self.web,
            record: self.record,
            record_scope: self.record_scope,
            record_input: self.record_input,
            record_max_session_bytes: self.record_max_session_bytes,
            record_max_dir_bytes: self.record_max_dir_bytes,
            handshake_timeout: secs("handshake_timeout", self.handshake_timeout)?,
            connect_timeout: secs("connect_timeout", self.connect_timeout)?,
            connect_retry_window: secs("connect_retry_window", self.connect_retry_window)?,
            idle_timeout: secs("idle_timeout", self.idle_timeout)?,
            max_session_duration: secs("max_session_duration", self.max_session_duration)?,
            keepalive_interval: secs("keepalive_interval", self.keepalive_interval)?,
            keepalive_timeout: secs("keepalive_timeout", self.keepalive_timeout)?,
            drain_timeout: secs("drain_timeout", self.drain_timeout)?,
            drain_spread: secs("drain_spread", self.drain_spread)?,
            route_cache_ttl: secs("route_cache_ttl", self.route_cache_ttl)?,
            route_negative_ttl: secs("route_negative_ttl", self.route_negative_ttl)?,
            redis_timeout: secs("redis_timeout", self.redis_timeout)?,
            routes: self.routes,
            allow_upstream: self.allow_upstream,
            allow_origins: self.allow_origins,
            trusted_proxies: self.trusted_proxies,
        })
    }
}
