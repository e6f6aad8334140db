//! Where one Redis server is reached: a fixed `redis://` URL, or — with
//! `redis+sentinel://` — whichever master Sentinel names at the moment of connecting, so
//! every reconnect after a failover finds the promoted replica.

use super::sharding::{SENTINEL_SCHEME, Shard, UrlError};
use redis::{
    Client, RedisConnectionInfo, RedisResult,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

pub enum Endpoint {
    Url(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl Endpoint {
    pub fn open(shard: &Shard) -> Result<Self, UrlError> {
        let bad = |why: String| UrlError {
            url: shard.url.clone(),
            why,
        };
        let Some(rest) = shard.url.strip_prefix(SENTINEL_SCHEME) else {
            return Client::open(shard.url.as_str())
                .map(Self::Url)
                .map_err(|e| bad(e.to_string()));
        };
        // [user:pass@]host:port[,host:port…]/service[/db]; the credentials and db are the
        // master's; the sentinels themselves are reached without.
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("needs /service-name".into()))?;
        let mut parts = path.split('/');
        let service = parts.next().unwrap_or_default().to_owned();
        let db = parts.next().and_then(|d| d.parse().ok()).unwrap_or(0);
        let mut info = RedisConnectionInfo::default().set_db(db);
        if let Some(auth) = auth {
            let (user, password) = auth.split_once(':').unwrap_or(("", auth));
            if !user.is_empty() {
                info = info.set_username(user);
            }
            if !password.is_empty() {
                info = info.set_password(password);
            }
        }
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
            .map(|c| Self::Sentinel(tokio::sync::Mutex::new(c)))
            .map_err(|e| bad(e.to_string()))
    }

    /// A client for the server to use now.
    pub async fn client(&self) -> RedisResult<Client> {
        match self {
            Self::Url(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}
