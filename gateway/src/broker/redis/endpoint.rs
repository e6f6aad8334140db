//! Where one Redis server is reached: a fixed `redis://` URL, or — with
//! `redis+sentinel://` — whichever master Sentinel names at the moment of connecting, so
//! every reconnect after a failover finds the promoted replica. A Sentinel endpoint also
//! listens for `+switch-master` and counts the switches, so connections to a demoted
//! master are dropped at once rather than written to until it is reconfigured (writes
//! there would be lost).

use super::sharding::{SENTINEL_SCHEME, Shard, UrlError};
use redis::{
    Client, RedisConnectionInfo, RedisResult,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

pub enum Endpoint {
    Url(Client),
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        /// `redis://host:port` of each sentinel.
        sentinels: Vec<String>,
        service: String,
        switches: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    },
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
        let client = SentinelClient::build(
            sentinels.clone(),
            service.clone(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(Self::Sentinel {
            client: tokio::sync::Mutex::new(client),
            sentinels,
            service,
            switches: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// Master switches heard so far (always 0 for a fixed URL); a connection made before
    /// the latest one may be talking to a demoted master.
    pub fn switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Url(_) => None,
            Self::Sentinel { switches, .. } => Some(switches.subscribe()),
        }
    }

    pub fn switch_count(&self) -> u64 {
        match self {
            Self::Url(_) => 0,
            Self::Sentinel { switches, .. } => *switches.borrow(),
        }
    }

    /// For a Sentinel endpoint: listens to one sentinel after another for `+switch-master`
    /// of our service, counting each. Stops once the endpoint is dropped (checked whenever
    /// a sentinel connection ends).
    pub async fn watch_switches(endpoint: std::sync::Weak<Self>) {
        let mut backoff = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(2),
        );
        for attempt in 0usize.. {
            let Some(me) = endpoint.upgrade() else { return };
            let Self::Sentinel {
                sentinels,
                service,
                switches,
                ..
            } = &*me
            else {
                return;
            };
            let address = sentinels[attempt % sentinels.len()].clone();
            let (service, switches) = (service.clone(), switches.clone());
            drop(me);
            match listen(&address, &service, &switches, &mut backoff).await {
                Ok(()) => {}
                Err(e) => tracing::debug!(sentinel = %address, error = %e, "sentinel watch lost"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// A client for the server to use now.
    pub async fn client(&self) -> RedisResult<Client> {
        match self {
            Self::Url(client) => Ok(client.clone()),
            Self::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }
}

/// Subscribes to one sentinel's `+switch-master` until the connection ends.
async fn listen(
    address: &str,
    service: &str,
    switches: &tokio::sync::watch::Sender<u64>,
    backoff: &mut crate::backoff::Backoff,
) -> RedisResult<()> {
    use futures_util::StreamExt;
    let connect = async {
        let mut pubsub = Client::open(address)?.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "sentinel connect timed out"))
        })??;
    backoff.reset();
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        // "<service> <old-ip> <old-port> <new-ip> <new-port>"
        let payload: String = msg.get_payload().unwrap_or_default();
        if payload.split(' ').next() == Some(service) {
            tracing::warn!(%payload, "sentinel switched the master; reconnecting");
            switches.send_modify(|n| *n += 1);
        }
    }
    Ok(())
}
