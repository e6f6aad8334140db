//! One `Config`, parsed once at startup from flags, `GATEWAY_*` environment variables and an
//! optional TOML file, in that precedence, then split into one plain struct per concern
//! (transport, session, API, Redis, namespaces, auth) handed to the part that owns it.
//! Every option is documented in the README, whose example file a test parses.

use crate::{
    blobs::KindSet,
    channel::{ChannelError, ChannelName},
    peers::Network,
};
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
    /// Serve the admin page at /admin (it asks for the API key; needs --api-key)
    #[arg(long, env = "GATEWAY_ADMIN")]
    pub admin: bool,
    /// Log format
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Key signing blob URLs (every node must share it) [default: made once, kept in Redis]
    #[arg(long, env = "GATEWAY_BLOB_SIGNING_KEY", hide_env_values = true)]
    pub blob_signing_key: Option<String>,
    /// Backend base URL for `rpc` commands (POST {url}/{method})
    #[arg(long, env = "GATEWAY_RPC_URL")]
    pub rpc_url: Option<String>,
    /// TLS certificate chain (PEM): serve wss:// and https:// (with --tls-key)
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM, PKCS#8, PKCS#1 or SEC1)
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
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
    admin: bool,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    tls: TlsFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    redis: RedisOptions,
    #[serde(default)]
    blobs: BlobsFile,
    #[serde(default)]
    rpc: RpcFile,
    #[serde(default)]
    namespaces: HashMap<String, NamespaceOptions>,
}

/// `[blobs]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BlobsFile {
    max_bytes: u64,
    ttl_seconds: u64,
    url_ttl_seconds: u64,
    signing_key: Option<String>,
    allowed_types: KindSet,
    max_uploads_per_connection: usize,
    max_downloads_per_connection: usize,
    upload_budget_bytes: usize,
    upload_idle_seconds: u64,
    memory_store_bytes: usize,
    cache_bytes: usize,
    max_blobs_per_publication: usize,
}

impl Default for BlobsFile {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            ttl_seconds: 86_400,
            url_ttl_seconds: 3_600,
            signing_key: None,
            allowed_types: KindSet::DEFAULT,
            max_uploads_per_connection: 4,
            max_downloads_per_connection: 4,
            upload_budget_bytes: 256 << 20,
            upload_idle_seconds: 30,
            memory_store_bytes: 256 << 20,
            cache_bytes: 64 << 20,
            max_blobs_per_publication: 16,
        }
    }
}

/// Images: limits of blobs and uploads, the store, signed URLs.
#[derive(Debug, Clone)]
pub struct BlobsConfig {
    /// Largest blob (error 110 above it).
    pub max_bytes: u64,
    /// How long a stored blob lives (refreshed when it is stored again).
    pub ttl: Duration,
    /// How long a signed URL is valid (at least).
    pub url_ttl: Duration,
    pub signing_key: Option<String>,
    /// Image types accepted where a namespace does not say (`blob_types`).
    pub allowed_types: KindSet,
    pub max_uploads_per_connection: usize,
    pub max_downloads_per_connection: usize,
    /// Bytes of unfinished uploads one node holds at most (error 106 above it).
    pub upload_budget_bytes: usize,
    /// An upload that gets no chunk for this long is dropped.
    pub upload_idle: Duration,
    /// Size of the embedded broker's blob store (LRU beyond it).
    pub memory_store_bytes: usize,
    /// Size of the per-node cache of blobs read from Redis (0: none).
    pub cache_bytes: usize,
    pub max_blobs_per_publication: usize,
}

/// `[tls]` as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// `[rpc]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RpcFile {
    url: Option<String>,
    timeout_ms: u64,
    max_in_flight: usize,
    max_response_bytes: usize,
}

impl Default for RpcFile {
    fn default() -> Self {
        Self {
            url: None,
            timeout_ms: 5_000,
            max_in_flight: 4,
            max_response_bytes: 10 << 20,
        }
    }
}

/// Request/reply to a backend over HTTP.
#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// Base URL (`http://host:port/path`); `rpc` is error 104 without one.
    pub url: Option<String>,
    pub timeout: Duration,
    /// Calls in flight per connection (error 106 above it).
    pub max_in_flight: usize,
    /// Largest backend response (error 114 above it).
    pub max_response_bytes: usize,
}

/// `[limits]` as written in the file: one flat table for compatibility. It is split by
/// concern in [`Config::from_parts`]; nothing else reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LimitsFile {
    max_connections: usize,
    max_connections_per_ip: usize,
    max_connections_per_user: usize,
    max_channels_per_connection: usize,
    max_message_bytes: usize,
    max_frames_per_message: usize,
    outbound_queue_bytes: usize,
    handshake_timeout_ms: u64,
    ping_interval_ms: u64,
    write_timeout_ms: u64,
    commands_per_second: u32,
    command_burst: u32,
    rate_limit_strikes: u32,
    drain_seconds: u64,
    ws_read_buffer_bytes: usize,
    api_body_bytes: usize,
    api_timeout_ms: u64,
    api_concurrency: usize,
    bytes_per_second: u32,
    bytes_burst: u32,
    max_history_limit: u32,
    max_presence_clients: usize,
    history_reads_per_node: usize,
    history_bytes_per_node: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_connections_per_user: 0,
            max_channels_per_connection: 128,
            max_message_bytes: 1 << 20,
            max_frames_per_message: 128,
            outbound_queue_bytes: 1 << 20,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            write_timeout_ms: 10_000,
            commands_per_second: 200,
            command_burst: 400,
            rate_limit_strikes: 50,
            drain_seconds: 10,
            ws_read_buffer_bytes: 64 * 1024,
            api_body_bytes: 4 << 20,
            api_timeout_ms: 10_000,
            api_concurrency: 1024,
            bytes_per_second: 0,
            bytes_burst: 4 << 20,
            max_history_limit: 1000,
            max_presence_clients: 1000,
            history_reads_per_node: 256,
            history_bytes_per_node: 64 << 20,
        }
    }
}

/// The listener and the WebSocket upgrade.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub listen: SocketAddr,
    /// Origins allowed to open WebSockets; empty allows all.
    pub allowed_origins: Vec<String>,
    /// Open WebSockets per node; the next one is closed with 1013.
    pub max_connections: usize,
    /// Open WebSockets per client address (0: unbounded); the next one is closed with 4029.
    pub max_connections_per_ip: usize,
    /// Open WebSockets per authenticated user on this node (0: unbounded); the next one
    /// is closed with 4029.
    pub max_connections_per_user: usize,
    /// Proxies whose `X-Forwarded-For`/`Forwarded` name the client's address.
    pub trusted_proxies: Vec<Network>,
    /// Certificate chain and key files (PEM): TLS on the listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Time to send the HTTP request head.
    pub handshake_timeout: Duration,
    /// Largest WebSocket message (and frame) a client may send: close 1009 above it.
    pub max_message_bytes: usize,
    /// Largest read per syscall, into one buffer per thread (a connection keeps no read
    /// buffer of its own).
    pub ws_read_buffer_bytes: usize,
}

/// One client connection: decoding, limits, pings, the outbound queue.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub max_channels_per_connection: usize,
    /// Largest client WebSocket message (reported in `ConnectResult`).
    pub max_message_bytes: usize,
    /// Frames one client message may batch: close 1009 above it.
    pub max_frames_per_message: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008).
    pub outbound_queue_bytes: usize,
    /// Server WebSocket ping period; a connection silent for twice this is closed (4004).
    pub ping_interval: Duration,
    /// A write may take this long plus its bytes at 64 KiB/s; then close 4008.
    pub write_timeout: Duration,
    /// Commands per second per connection (token bucket) and the bucket size.
    pub commands_per_second: u32,
    pub command_burst: u32,
    /// Rejected commands in a row before the connection is closed with 4029.
    pub rate_limit_strikes: u32,
    /// Bytes per second a client may send (token bucket; 0: unbounded): above it the
    /// node stops reading the socket until the bucket refills, so TCP slows the sender.
    pub bytes_per_second: u32,
    pub bytes_burst: u32,
}

/// Bounds on what one history or presence request may make the node read and hold.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// Largest `limit` of one history request (a larger or zero limit is cut to it).
    pub max_history_limit: u32,
    /// Most clients one presence reply lists (`truncated` set beyond).
    pub max_presence_clients: usize,
    /// History reads (requests and recoveries) the node runs at once; more wait (5 s,
    /// then 107).
    pub history_reads_per_node: usize,
    /// Bytes of history pages the node holds until written; more wait (5 s, then 107).
    pub history_bytes_per_node: usize,
}

/// The HTTP API for backends.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `X-API-Key`; the API is disabled (403) without one.
    pub key: Option<String>,
    /// Whether `/admin` is served (only with a key: every call the page makes needs it).
    pub admin: bool,
    pub body_bytes: usize,
    pub timeout: Duration,
    pub concurrency: usize,
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
    /// A server no node of the current server list has seen for this long counts as
    /// having sat out a layout change: channel epochs restart (see ARCHITECTURE.md).
    pub layout_stale_seconds: u64,
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
            layout_stale_seconds: 300,
        }
    }
}

/// What the Redis broker is built from.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` URLs of independent servers, or `redis+cluster://` seeds of one cluster.
    pub urls: Vec<String>,
    pub prefix: String,
    pub pubsub_connections: usize,
    pub command_timeout: Duration,
    pub unsubscribe_delay: Duration,
    pub probe_interval: Duration,
    pub presence_ttl: Duration,
    pub layout_stale: Duration,
    /// `[blobs] cache_bytes`: the per-node cache of blobs read from Redis.
    pub blob_cache_bytes: usize,
}

/// Token verification: keys and claim checks (`[auth]`). With no key and no JWKS URL,
/// clients connect anonymously.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secrets for HS256/HS384/HS512 tokens (any kid).
    pub hmac_secrets: Vec<String>,
    /// PEM public keys (RSA: RS256/384/512; EC: ES256/384; Ed25519: EdDSA; any kid).
    pub public_keys_pem: Vec<String>,
    /// Keys pinned to one algorithm and optionally a `kid`, inline or from files.
    pub keys: Vec<KeyConfig>,
    /// When set, a token's `aud` must name one of these.
    pub audience: Vec<String>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    pub leeway_seconds: u64,
    /// When > 0, tokens need an `iat` no older than this (0: no age limit).
    pub max_token_age_seconds: u64,
    /// JSON Web Key Set URL (http or https); fetched at start, every
    /// `jwks_refresh_seconds`, and when a token names an unknown `kid`.
    pub jwks_url: Option<String>,
    pub jwks_refresh_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hmac_secrets: Vec::new(),
            public_keys_pem: Vec::new(),
            keys: Vec::new(),
            audience: Vec::new(),
            issuer: None,
            leeway_seconds: 5,
            max_token_age_seconds: 0,
            jwks_url: None,
            jwks_refresh_seconds: 300,
        }
    }
}

/// One `[[auth.keys]]` entry: exactly one of `secret`, `secret_file`, `pem`, `pem_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The only algorithm this key verifies (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
    pub alg: String,
    /// When set, tokens whose header names this `kid` are checked against this key only.
    pub kid: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub pem: Option<String>,
    pub pem_file: Option<String>,
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
    /// Image types blobs uploaded for this namespace may have (default: `[blobs]
    /// allowed_types`).
    pub blob_types: Option<KindSet>,
    /// Channels here may be used only by connections whose token grants them (`grants`
    /// claim) or that subscribed with a subscription token for the channel.
    pub private: bool,
    /// Publications wait up to this long before they are written, so that several go
    /// out in one write (Centrifugo's `client_write_delay`): fewer syscalls per delivery
    /// at low rates, for this much latency. 0 (the default) writes at once.
    pub write_delay_ms: u64,
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
            blob_types: None,
            private: false,
            write_delay_ms: 0,
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

/// The configured namespaces; always holds `default`.
#[derive(Debug, Clone)]
pub struct Namespaces(HashMap<String, NamespaceOptions>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Name(#[from] ChannelError),
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
}

impl Namespaces {
    pub fn new(mut map: HashMap<String, NamespaceOptions>) -> Self {
        map.entry("default".into()).or_default();
        Self(map)
    }

    pub fn get(&self, namespace: &str) -> Option<&NamespaceOptions> {
        self.0.get(namespace)
    }

    /// The options of a channel's namespace; the defaults if it is not configured (only
    /// for channels that were resolved once, so whose namespace exists).
    pub fn options(&self, channel: &ChannelName) -> NamespaceOptions {
        self.get(channel.namespace()).copied().unwrap_or_default()
    }

    /// Validates a channel name and finds its namespace's options.
    pub fn resolve(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), ResolveError> {
        let channel = ChannelName::parse(name)?;
        let options = *self
            .get(channel.namespace())
            .ok_or_else(|| ResolveError::UnknownNamespace(channel.namespace().to_owned()))?;
        Ok((channel, options))
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// The node's whole configuration, by concern.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub log_format: LogFormat,
    /// As given (comma-separated); see [`Config::redis`].
    pub redis_url: Option<String>,
    pub transport: TransportConfig,
    pub session: SessionConfig,
    pub reads: ReadLimits,
    pub api: ApiConfig,
    /// SIGTERM: 1012 closes are spread over this.
    pub drain: Duration,
    pub auth: AuthConfig,
    redis_options: RedisOptions,
    pub blobs: BlobsConfig,
    pub rpc: RpcConfig,
    pub namespaces: Namespaces,
}

impl File {
    /// What a node runs with when no `--config` file is given: the defaults plus a `chat`
    /// namespace with Join/Leave, so the README's examples and the demo chat work as
    /// written.
    fn built_in() -> Self {
        let mut file = Self::default();
        let chat = NamespaceOptions {
            join_leave: true,
            ..NamespaceOptions::default()
        };
        file.namespaces.insert("chat".into(), chat);
        file
    }
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
                Self::parse_file(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => File::built_in(),
        };
        let limits = file.limits.clone();
        let cert = args.tls_cert.is_some() || file.tls.cert_file.is_some();
        let key = args.tls_key.is_some() || file.tls.key_file.is_some();
        if cert != key {
            return Err(ConfigError::Invalid(
                "TLS needs both a certificate and a key (--tls-cert and --tls-key)".into(),
            ));
        }
        for n in &file.trusted_proxies {
            Network::parse(n).map_err(|e| ConfigError::Invalid(format!("trusted_proxies: {e}")))?;
        }
        let config = Self::from_parts(args, file);
        config.validate(&limits)?;
        Ok(config)
    }

    fn parse_file(text: &str) -> Result<File, toml::de::Error> {
        toml::from_str(text)
    }

    fn from_parts(args: Args, file: File) -> Self {
        let l = file.limits;
        Config {
            node_id: args
                .node_id
                .or(file.node_id)
                .unwrap_or_else(default_node_id),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            redis_url: args.redis_url.or(file.redis_url),
            transport: TransportConfig {
                listen: args
                    .listen
                    .or(file.listen)
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
                allowed_origins: file.allowed_origins,
                max_connections: l.max_connections,
                max_connections_per_ip: l.max_connections_per_ip,
                max_connections_per_user: l.max_connections_per_user,
                trusted_proxies: file
                    .trusted_proxies
                    .iter()
                    .filter_map(|n| Network::parse(n).ok())
                    .collect(),
                tls: args
                    .tls_cert
                    .or(file.tls.cert_file)
                    .zip(args.tls_key.or(file.tls.key_file)),
                handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
                max_message_bytes: l.max_message_bytes,
                ws_read_buffer_bytes: l.ws_read_buffer_bytes,
            },
            session: SessionConfig {
                max_channels_per_connection: l.max_channels_per_connection,
                max_message_bytes: l.max_message_bytes,
                max_frames_per_message: l.max_frames_per_message,
                outbound_queue_bytes: l.outbound_queue_bytes,
                ping_interval: Duration::from_millis(l.ping_interval_ms),
                write_timeout: Duration::from_millis(l.write_timeout_ms.max(1)),
                commands_per_second: l.commands_per_second,
                command_burst: l.command_burst,
                rate_limit_strikes: l.rate_limit_strikes,
                bytes_per_second: l.bytes_per_second,
                bytes_burst: l
                    .bytes_burst
                    .max(u32::try_from(l.max_message_bytes).unwrap_or(u32::MAX)),
            },
            reads: ReadLimits {
                max_history_limit: l.max_history_limit.max(1),
                max_presence_clients: l.max_presence_clients.max(1),
                history_reads_per_node: l.history_reads_per_node.max(1),
                history_bytes_per_node: l.history_bytes_per_node.max(1024),
            },
            api: ApiConfig {
                admin: args.admin || file.admin,
                key: args.api_key.or(file.api_key).filter(|k| !k.is_empty()),
                body_bytes: l.api_body_bytes,
                timeout: Duration::from_millis(l.api_timeout_ms),
                concurrency: l.api_concurrency,
            },
            drain: Duration::from_secs(l.drain_seconds),
            auth: file.auth,
            redis_options: file.redis,
            blobs: BlobsConfig {
                max_bytes: file.blobs.max_bytes,
                ttl: Duration::from_secs(file.blobs.ttl_seconds.max(1)),
                url_ttl: Duration::from_secs(file.blobs.url_ttl_seconds.max(1)),
                signing_key: args
                    .blob_signing_key
                    .or(file.blobs.signing_key)
                    .filter(|k| !k.is_empty()),
                allowed_types: file.blobs.allowed_types,
                max_uploads_per_connection: file.blobs.max_uploads_per_connection,
                max_downloads_per_connection: file.blobs.max_downloads_per_connection,
                upload_budget_bytes: file.blobs.upload_budget_bytes,
                upload_idle: Duration::from_secs(file.blobs.upload_idle_seconds.max(1)),
                memory_store_bytes: file.blobs.memory_store_bytes,
                cache_bytes: file.blobs.cache_bytes,
                max_blobs_per_publication: file.blobs.max_blobs_per_publication,
            },
            rpc: RpcConfig {
                url: args
                    .rpc_url
                    .or(file.rpc.url)
                    .filter(|u| !u.is_empty())
                    .map(|u| u.trim_end_matches('/').to_owned()),
                timeout: Duration::from_millis(file.rpc.timeout_ms.max(1)),
                max_in_flight: file.rpc.max_in_flight,
                max_response_bytes: file.rpc.max_response_bytes,
            },
            namespaces: Namespaces::new(file.namespaces),
        }
    }

    fn validate(&self, l: &LimitsFile) -> Result<(), ConfigError> {
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
        let schemes = [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "redis+sentinel://",
        ];
        if urls
            .iter()
            .any(|u| !schemes.iter().any(|s| u.starts_with(s)))
        {
            return Err(ConfigError::Invalid(
                "redis_url: each comma-separated URL must start with redis://, rediss://, redis+sentinel:// or redis+cluster://"
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
        if let Some(url) = &self.rpc.url
            && !url.starts_with("http://")
        {
            return Err(ConfigError::Invalid(format!(
                "rpc.url {url:?} must be an http:// URL"
            )));
        }
        for name in self.namespaces.names() {
            if name.is_empty()
                || !name.bytes().all(crate::channel::is_name_byte)
                || name.contains(':')
            {
                return Err(ConfigError::Invalid(format!("bad namespace name {name:?}")));
            }
        }
        Ok(())
    }

    /// The Redis servers channels are sharded over; empty for the embedded broker. URLs
    /// are comma-separated; a piece without a scheme continues the previous URL, so a
    /// Sentinel URL can list its sentinels (`redis+sentinel://h1:26379,h2:26379/name`).
    pub fn redis_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = Vec::new();
        for piece in self.redis_url.iter().flat_map(|u| u.split(',')) {
            let piece = piece.trim();
            if piece.is_empty() {
                continue;
            }
            match urls.last_mut() {
                Some(last) if !piece.contains("://") => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ => urls.push(piece.to_owned()),
            }
        }
        urls
    }

    /// The Redis broker's settings, or `None` for the embedded broker.
    pub fn redis(&self) -> Option<RedisConfig> {
        let urls = self.redis_urls();
        if urls.is_empty() {
            return None;
        }
        let r = &self.redis_options;
        Some(RedisConfig {
            urls,
            prefix: r.prefix.clone(),
            pubsub_connections: r.pubsub_connections.max(1),
            command_timeout: Duration::from_millis(r.command_timeout_ms),
            unsubscribe_delay: Duration::from_millis(r.unsubscribe_delay_ms),
            probe_interval: Duration::from_millis(r.probe_interval_ms),
            presence_ttl: Duration::from_secs(r.presence_ttl_seconds.max(1)),
            layout_stale: Duration::from_secs(r.layout_stale_seconds.max(1)),
            blob_cache_bytes: self.blobs.cache_bytes,
        })
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
        assert_eq!(c.transport.listen.port(), 9000);
        assert_eq!(c.transport.max_connections, 5);
        assert_eq!(c.session.ping_interval, Duration::from_millis(25_000));
        let chat = c.namespaces.get("chat").unwrap();
        assert_eq!(chat.history_size, 10);
        assert!(chat.join_leave && chat.presence);
        assert_eq!(
            c.namespaces.get("default"),
            Some(&NamespaceOptions::default())
        );
    }

    #[test]
    fn redis_urls_split_on_commas_except_inside_a_sentinel_url() {
        let c = Config {
            redis_url: Some("redis://a:1, redis+sentinel://s1:26379,s2:26379/m,redis://b:2".into()),
            ..Config::default()
        };
        assert_eq!(
            c.redis_urls(),
            vec![
                "redis://a:1",
                "redis+sentinel://s1:26379,s2:26379/m",
                "redis://b:2"
            ]
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<File>("[limits]\nmax_conections = 5").is_err());
    }

    /// The README documents every key in one example file: it must parse, and mean
    /// what the defaults mean where it shows them.
    #[test]
    fn the_readme_example_config_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\nlisten = ")
            .expect("README has the example config");
        let body = &readme[start + "```toml\n".len()..];
        let toml_text = &body[..body.find("```").expect("closed code block")];
        // The example elides secrets and keys as "…": make them plain strings.
        let file = Config::parse_file(toml_text).expect("README example config parses");
        let limits = file.limits.clone();
        let c = Config::from_parts(Args::default(), file);
        c.validate(&limits).expect("README example config is valid");
        assert_eq!(c.transport.max_connections, 100_000);
        assert_eq!(c.drain, Duration::from_secs(10));
        assert!(c.namespaces.get("chat").is_some_and(|n| n.join_leave));
        assert_eq!(c.redis_options.pubsub_connections, 2);
    }

    #[test]
    fn resolves_channels_to_their_namespace() {
        let ns = Namespaces::new(HashMap::from([(
            "chat".to_owned(),
            NamespaceOptions {
                join_leave: true,
                ..Default::default()
            },
        )]));
        let (c, o) = ns.resolve("chat:room").unwrap();
        assert_eq!((c.as_str(), o.join_leave), ("chat:room", true));
        assert!(!ns.resolve("lobby").unwrap().1.join_leave);
        assert_eq!(
            ns.resolve("nope:x"),
            Err(ResolveError::UnknownNamespace("nope".into()))
        );
        assert!(matches!(ns.resolve("bad name"), Err(ResolveError::Name(_))));
    }
}
