//! Which Redis server (of several independent ones) holds a channel, and which of a
//! server's pub/sub connections carries it: rendezvous hashing over a hash that is stable
//! across processes and versions, so every node makes the same choice.
//!
//! Servers are named, not identified by their URL text: `redis://localhost:6379`,
//! `redis://127.0.0.1:6379/0` and `redis://:secret@127.0.0.1` are one server,
//! `127.0.0.1:6379`, so nodes configured with different spellings (or a password rotated
//! during a rolling restart) still agree where each channel lives. `?shard=NAME` in a URL
//! names a server explicitly (for DNS names that differ per node, for instance).

/// FNV-1a, then murmur3's 64-bit finalizer: stable across processes and versions (unlike
/// std's hasher), so every node maps a channel to the same server and connection. The
/// finalizer matters: plain FNV-1a of two URLs differing only in the port digits ranks the
/// servers the same way for most channels, and rendezvous hashing then piles every channel
/// onto one server.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis url {url:?}: {why}")]
pub struct UrlError {
    pub url: String,
    pub why: String,
}

/// One server of the sharding layout: its name, and the URL to connect with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub name: String,
    pub url: String,
}

pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

impl Shard {
    /// Names a `redis://`, `rediss://` or `redis+sentinel://` URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |why: &str| UrlError {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (url, explicit) = strip_shard_param(url);
        if let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) {
            // redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]
            let path = rest.rsplit_once('@').map_or(rest, |(_, p)| p);
            let (_, path) = path
                .split_once('/')
                .ok_or_else(|| bad("needs /service-name after the sentinel addresses"))?;
            let mut parts = path.split('/');
            let service = parts.next().filter(|s| !s.is_empty());
            let service = service.ok_or_else(|| bad("needs /service-name"))?;
            let db = parts
                .next()
                .and_then(|d| d.parse::<i64>().ok())
                .unwrap_or(0);
            let name = explicit.unwrap_or_else(|| with_db(format!("sentinel:{service}"), db));
            return Ok(Self { name, url });
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| bad(&e.to_string()))?;
        let db = info.redis_settings().db();
        let base = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{}:{port}", canonical_host(host))
            }
            redis::ConnectionAddr::Unix(path) => format!("unix:{}", path.display()),
            other => other.to_string(),
        };
        let name = explicit.unwrap_or_else(|| with_db(base, db));
        Ok(Self { name, url })
    }
}

fn with_db(name: String, db: i64) -> String {
    if db == 0 {
        name
    } else {
        format!("{name}/{db}")
    }
}

fn canonical_host(host: &str) -> String {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    match host.as_str() {
        "localhost" | "::1" | "0:0:0:0:0:0:0:1" => "127.0.0.1".to_owned(),
        _ => host,
    }
}

/// Removes our own `shard=NAME` query parameter (redis-rs does not know it).
fn strip_shard_param(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut explicit = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("shard=") {
            Some(name) => {
                explicit = Some(name.to_owned()).filter(|n| !n.is_empty());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, explicit)
}

/// The layout's fingerprint: the same for every node sharding over the same servers,
/// whatever order or spelling their URLs have.
pub fn fingerprint(names: &[String]) -> String {
    let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let parts: Vec<&[u8]> = sorted.iter().map(|n| n.as_bytes()).collect();
    format!("{:016x}", stable_hash(&parts))
}

/// The server that holds node-wide records (the node registry): the one with the
/// smallest name, so every node of a layout picks the same one.
pub fn registry(names: &[String]) -> usize {
    (0..names.len()).min_by_key(|&i| &names[i]).unwrap_or(0)
}

/// Rendezvous hashing: the server with the highest score for the channel wins, so adding
/// or removing a server moves only the channels that scored highest there.
pub fn pick_server(servers: &[String], channel: &str) -> usize {
    (0..servers.len())
        .max_by_key(|&i| stable_hash(&[servers[i].as_bytes(), channel.as_bytes()]))
        .unwrap_or(0)
}

/// Which of `connections` pub/sub connections carries `channel`.
pub fn pick_connection(connections: usize, channel: &str) -> usize {
    stable_hash(&[channel.as_bytes()]) as usize % connections.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(url: &str) -> String {
        Shard::parse(url).unwrap().name
    }

    #[test]
    fn one_server_has_one_name_however_its_url_is_spelled() {
        let n = "127.0.0.1:6379";
        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1",
            "redis://localhost:6379/0",
            "redis://:secret@LOCALHOST:6379",
            "redis://user:other@127.0.0.1:6379/0",
        ] {
            assert_eq!(name(url), n, "{url}");
        }
        assert_eq!(name("redis://127.0.0.1:6379/2"), "127.0.0.1:6379/2");
        assert_eq!(name("redis://redis-0.redis:6380"), "redis-0.redis:6380");
        assert_eq!(name("redis://10.0.0.5:6379?shard=s1"), "s1");
        let s = Shard::parse("redis://10.0.0.5:6379?shard=s1&protocol=resp3").unwrap();
        assert_eq!(s.url, "redis://10.0.0.5:6379?protocol=resp3");
        assert_eq!(
            name("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"),
            "sentinel:mymaster"
        );
        assert_eq!(
            name("redis+sentinel://:pw@h:26379/mymaster/3"),
            "sentinel:mymaster/3"
        );
        assert!(Shard::parse("redis+sentinel://h:26379").is_err());
        assert!(Shard::parse("redis://").is_err());
    }

    #[test]
    fn the_fingerprint_ignores_order_and_spelling() {
        let a = vec![
            name("redis://127.0.0.1:7001"),
            name("redis://localhost:7002/0"),
        ];
        let b = vec![
            name("redis://127.0.0.1:7002"),
            name("redis://:pw@127.0.0.1:7001"),
        ];
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&a[..1]));
        assert_eq!(registry(&a), registry(&[a[0].clone(), a[1].clone()]));
        assert_eq!(
            a[registry(&a)],
            b[registry(&b)],
            "every node picks the same registry"
        );
    }

    #[test]
    fn rendezvous_hashing_spreads_channels_whatever_the_ports() {
        let channels: Vec<String> = (0..1000).map(|i| format!("shard{i}")).collect();
        for seed in 0..50u32 {
            // Pairs of nearby ports like the ones tests and deployments get.
            let port = 20_000 + seed * 797 % 40_000;
            let urls = vec![
                format!("redis://127.0.0.1:{port}"),
                format!("redis://127.0.0.1:{}", port + 1 + seed % 7),
            ];
            let on_first = channels
                .iter()
                .filter(|c| pick_server(&urls, c) == 0)
                .count();
            assert!(
                (350..650).contains(&on_first),
                "{urls:?}: {on_first} of 1000 on the first server"
            );
        }
    }

    #[test]
    fn rendezvous_hashing_is_stable_and_moves_little() {
        let three: Vec<String> = (0..3)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let four: Vec<String> = (0..4)
            .map(|i| format!("redis://127.0.0.1:{}", 7000 + i))
            .collect();
        let channels: Vec<String> = (0..1000).map(|i| format!("c{i}")).collect();
        let mut per = [0; 3];
        let mut moved = 0;
        for c in &channels {
            let a = pick_server(&three, c);
            per[a] += 1;
            assert_eq!(a, pick_server(&three, c));
            let b = pick_server(&four, c);
            if a != b {
                assert_eq!(b, 3, "a channel only moves to the new server");
                moved += 1;
            }
        }
        assert!(per.iter().all(|&n| n > 250), "{per:?}");
        assert!((150..350).contains(&moved), "{moved}");
    }
}
