//! Configuration, in three files: the command line ([`cli`]), the TOML file ([`file`]), and
//! the one layered merge into validated [`Settings`] ([`settings`]): defaults < file <
//! `VNCGATE_*` environment < flags.

pub mod cli;
pub mod file;
pub mod settings;

pub use cli::{
    Cli, Command, DelReason, LogFormat, RedisArg, ReplayArgs, RouteAddArgs, RouteCommand,
    RouteDelArgs, RouteListArgs, ServeArgs, WebsockifyArgs,
};
pub use settings::{
    DEFAULT_TCP_CONGESTION, IoDriver, Layer, Limits, PinWorkers, RecordScope, RecordSettings,
    Settings, TcpCongestion, TlsFiles, parse_secs,
};
