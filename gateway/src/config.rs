//! One `Config`, parsed once at startup from flags, `GATEWAY_*` environment variables and an
//! optional TOML file, in that precedence. Every option is documented in the README.

use clap::Parser;
use serde::Deserialize;
use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

/// Command-line flags and their environment variables. Everything is optional here so
/// that an unset flag falls back to the file, then to the default.
#[derive(Debug, Parser, Default)]
#[command(
    name = "gateway",
    version,
    about = "WebSocket gateway: pub/sub with history, recovery and presence"
)]
pub struct Args {
    /// Bind address [default: 127.0.0.1:8080]
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Use Redis; comma-separated URLs shard channels
    #[arg(long, env = "GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// This node's name [default: hostname + random suffix]
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,
    /// TOML file: namespaces, limits, auth keys
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Key for the HTTP API (`X-API-Key` header); API disabled when unset
    #[arg(long, env = "GATEWAY_API_KEY")]
    pub api_key: Option<String>,
    /// Log format
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

/// The TOML file; every field optional and unknown keys rejected, so typos are loud.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    redis_url: Option<String>,
    node_id: Option<String>,
    api_key: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    redis: RedisOptions,
    #[serde(default)]
    namespaces: HashMap<String, NamespaceOptions>,
}

/// Per-node and per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open WebSockets per node; the next one is closed with 1013.
    pub max_connections: usize,
    pub max_channels_per_connection: usize,
    /// Largest WebSocket message a client may send (close 1009 above it).
    pub max_message_bytes: usize,
    /// Frames one client message may batch.
    pub max_frames_per_message: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008).
    pub outbound_queue_bytes: usize,
    /// Time to complete the HTTP upgrade and, when auth is required, the Connect frame.
    pub handshake_timeout_ms: u64,
    /// Server WebSocket ping period; a connection silent for twice this is closed (4004).
    pub ping_interval_ms: u64,
    /// Commands per second per connection (token bucket) and the bucket size.
    pub commands_per_second: u32,
    pub command_burst: u32,
    /// Rejected commands in a row before the connection is closed with 4029.
    pub rate_limit_strikes: u32,
    /// Spread of the 1012 closes after SIGTERM.
    pub drain_seconds: u64,
    /// tungstenite's eagerly allocated read buffer, also the largest read per syscall.
    pub ws_read_buffer_bytes: usize,
    /// HTTP API request body limit and timeout.
    pub api_body_bytes: usize,
    pub api_timeout_ms: u64,
    pub api_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_channels_per_connection: 128,
            max_message_bytes: 1 << 20,
            max_frames_per_message: 128,
            outbound_queue_bytes: 1 << 20,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            commands_per_second: 200,
            command_burst: 400,
            rate_limit_strikes: 50,
            drain_seconds: 10,
            ws_read_buffer_bytes: 4096,
            api_body_bytes: 4 << 20,
            api_timeout_ms: 10_000,
            api_concurrency: 1024,
        }
    }
}

/// Redis broker tuning (`[redis]`); the URLs come from `--redis-url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisOptions {
    /// Prefix of every key and pub/sub channel, so several deployments can share a Redis.
    pub prefix: String,
    /// Pub/sub connections per Redis server; channels are spread over them by hash.
    pub pubsub_connections: usize,
    /// Bound on every Redis command and (re)connect; a publish then fails with 108.
    pub command_timeout_ms: u64,
    /// A channel's Redis subscription outlives its last local subscriber this long.
    pub unsubscribe_delay_ms: u64,
    /// A pub/sub connection silent this long publishes a probe to itself; no echo
    /// within the command timeout means the connection is restarted.
    pub probe_interval_ms: u64,
    /// Presence entries expire this long after their node stops refreshing them.
    pub presence_ttl_seconds: u64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "gw:".into(),
            pubsub_connections: 2,
            command_timeout_ms: 1000,
            unsubscribe_delay_ms: 2000,
            probe_interval_ms: 2000,
            presence_ttl_seconds: 60,
        }
    }
}

/// Token verification keys. With none, clients connect anonymously.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secrets for HS256/HS384/HS512 tokens.
    pub hmac_secrets: Vec<String>,
    /// PEM public keys for RS256 and ES256 tokens.
    pub public_keys_pem: Vec<String>,
}

/// Options of one channel namespace (`namespace:name`; bare names use `default`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    /// Publications kept for history and recovery; 0 disables both (and offsets).
    pub history_size: usize,
    /// How long a publication stays in history.
    pub history_ttl_seconds: u64,
    pub presence: bool,
    /// Push Join/Leave to subscribers (needs `presence`).
    pub join_leave: bool,
    /// Whether clients may publish (the HTTP API always may).
    pub allow_publish: bool,
    /// Largest publication payload (error 110 above it).
    pub max_message_bytes: usize,
    /// When token keys are configured: whether clients without a token may use it.
    pub allow_anonymous: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl_seconds: 300,
            presence: true,
            join_leave: false,
            allow_publish: true,
            max_message_bytes: 65_536,
            allow_anonymous: false,
        }
    }
}

impl NamespaceOptions {
    pub fn history_ttl(&self) -> Duration {
        Duration::from_secs(self.history_ttl_seconds)
    }

    pub fn has_history(&self) -> bool {
        self.history_size > 0 && self.history_ttl_seconds > 0
    }
}

/// The node's whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: Option<String>,
    pub node_id: String,
    pub api_key: Option<String>,
    pub log_format: LogFormat,
    /// Origins allowed to open WebSockets; empty allows all.
    pub allowed_origins: Vec<String>,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub redis: RedisOptions,
    /// Always holds `default`.
    pub namespaces: HashMap<String, NamespaceOptions>,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_parts(Args::default(), File::default())
    }
}

impl Config {
    /// Reads flags, environment and the optional file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::parse())
    }

    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => File::default(),
        };
        let config = Self::from_parts(args, file);
        config.validate()?;
        Ok(config)
    }

    fn from_parts(args: Args, file: File) -> Self {
        let mut namespaces = file.namespaces;
        namespaces.entry("default".into()).or_default();
        Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            redis_url: args.redis_url.or(file.redis_url),
            node_id: args
                .node_id
                .or(file.node_id)
                .unwrap_or_else(default_node_id),
            api_key: args.api_key.or(file.api_key).filter(|k| !k.is_empty()),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            allowed_origins: file.allowed_origins,
            limits: file.limits,
            auth: file.auth,
            redis: file.redis,
            namespaces,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.ws_read_buffer_bytes < 256
            || l.max_message_bytes < 1024
            || l.outbound_queue_bytes < 1024
        {
            return Err(ConfigError::Invalid(
                "ws_read_buffer_bytes must be >= 256, max_message_bytes and outbound_queue_bytes >= 1024".into(),
            ));
        }
        if l.ping_interval_ms < 100 || l.commands_per_second == 0 || l.max_frames_per_message == 0 {
            return Err(ConfigError::Invalid(
                "ping_interval_ms must be >= 100; commands_per_second and max_frames_per_message > 0".into(),
            ));
        }
        let urls = self.redis_urls();
        let schemes = ["redis://", "rediss://", "redis+cluster://"];
        if urls
            .iter()
            .any(|u| !schemes.iter().any(|s| u.starts_with(s)))
        {
            return Err(ConfigError::Invalid(
                "redis_url: each comma-separated URL must start with redis:// or redis+cluster://"
                    .into(),
            ));
        }
        let cluster = urls
            .iter()
            .filter(|u| u.starts_with("redis+cluster://"))
            .count();
        if cluster > 0 && cluster < urls.len() {
            return Err(ConfigError::Invalid(
                "redis_url: either redis:// servers to shard over, or redis+cluster:// seeds of one cluster".into(),
            ));
        }
        for name in self.namespaces.keys() {
            if name.is_empty()
                || !name.bytes().all(crate::channel::is_name_byte)
                || name.contains(':')
            {
                return Err(ConfigError::Invalid(format!("bad namespace name {name:?}")));
            }
        }
        Ok(())
    }

    /// The Redis servers channels are sharded over; empty for the embedded broker.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_url
            .iter()
            .flat_map(|u| u.split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn auth_enabled(&self) -> bool {
        !self.auth.hmac_secrets.is_empty() || !self.auth.public_keys_pem.is_empty()
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.limits.ping_interval_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file: File = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            node_id = "from-file"
            [limits]
            max_connections = 5
            [namespaces.chat]
            history_size = 10
            join_leave = true
            "#,
        )
        .unwrap();
        let args = Args {
            node_id: Some("from-flag".into()),
            ..Args::default()
        };
        let c = Config::from_parts(args, file);
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(
            c.limits.ping_interval_ms,
            Limits::default().ping_interval_ms
        );
        assert_eq!(c.namespaces["chat"].history_size, 10);
        assert!(c.namespaces["chat"].join_leave && c.namespaces["chat"].presence);
        assert_eq!(c.namespaces["default"], NamespaceOptions::default());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<File>("[limits]\nmax_conections = 5").is_err());
    }
}
