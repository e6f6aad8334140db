//! Who is on the other end of a socket, and how many sockets each address (and each
//! user) holds.
//!
//! The client's address is the socket's peer, unless that peer is a configured trusted
//! proxy: then it is the nearest address in `X-Forwarded-For` (or `Forwarded: for=`) that
//! is not itself a trusted proxy. Headers from anyone else are ignored, so a client cannot
//! claim another address by sending them.

use http::HeaderMap;
use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// An address or a network: `10.0.0.0/8`, `::1`, `192.168.1.7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(n.to_bits()), u128::from(i.to_bits()), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= bits || (net ^ ip) >> host_bits == 0
    }
}

/// IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address as this node should account it.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Each proxy appends the address it received from: walk back from the nearest.
    let mut hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(forwarded_ip)
        .collect();
    if hops.is_empty() {
        hops = headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([',', ';']))
            .filter_map(|part| {
                let (key, value) = part.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for").then_some(value)
            })
            .filter_map(forwarded_ip)
            .collect();
    }
    hops.into_iter()
        .rev()
        .map(canonical)
        .find(|ip| !is_trusted(*ip))
        .unwrap_or(peer)
}

/// `for=` values of RFC 7239: `1.2.3.4`, `"1.2.3.4:80"`, `"[::1]:80"`, `"[::1]"`.
fn forwarded_ip(value: &str) -> Option<IpAddr> {
    let v = value.trim().trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.parse()
        .ok()
        .or_else(|| v.rsplit_once(':').and_then(|(a, _)| a.parse().ok()))
}

/// Open sockets per key (client address, user), bounded by `limit` (0: unbounded).
pub struct PerKey<K: Hash + Eq + Clone> {
    limit: usize,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

/// One counted socket; the count drops with it (nothing is counted without a limit).
pub struct Slot<K: Hash + Eq + Clone> {
    key: K,
    counts: Option<Arc<Mutex<HashMap<K, usize>>>>,
}

/// Sockets per client address (`max_connections_per_ip`).
pub type PerAddress = PerKey<IpAddr>;
pub type AddressSlot = Slot<IpAddr>;
/// Sockets per authenticated user on this node (`max_connections_per_user`).
pub type PerUser = PerKey<String>;
pub type UserSlot = Slot<String>;

impl<K: Hash + Eq + Clone> PerKey<K> {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            counts: Arc::default(),
        }
    }

    /// Counts a socket for `key`; `None` when the key already holds `limit`.
    pub fn take(&self, key: K) -> Option<Slot<K>> {
        if self.limit == 0 {
            return Some(Slot { key, counts: None });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.clone()).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            key,
            counts: Some(self.counts.clone()),
        })
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let Some(counts) = &self.counts else { return };
        let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// A reserved WebSocket slot (`max_connections`), released when dropped. Here rather than
/// in `node`, which takes it, so the session that holds it needs nothing of the node.
pub struct SocketSlot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl SocketSlot {
    /// Holds one of `taken`, already counted by the caller.
    pub fn new(taken: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Self(taken)
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_by_prefix() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")), "v4-mapped v6");
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Network::parse("::1").unwrap().contains(ip("::1")));
        assert!(!Network::parse("::1").unwrap().contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted = [
            Network::parse("127.0.0.0/8").unwrap(),
            Network::parse("10.0.0.0/8").unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.0.0.2"),
        );
        // From a trusted proxy: the nearest untrusted hop (a client cannot spoof past it).
        assert_eq!(
            client_addr(ip("127.0.0.1"), &h, &trusted),
            ip("203.0.113.9")
        );
        // From anyone else: the peer, whatever the headers say.
        assert_eq!(
            client_addr(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        let mut f = HeaderMap::new();
        f.insert(
            "forwarded",
            HeaderValue::from_static(r#"for="[2001:db8::7]:4711";proto=https, for=10.0.0.5"#),
        );
        assert_eq!(client_addr(ip("10.0.0.1"), &f, &trusted), ip("2001:db8::7"));
        // Some proxies append `ip:port`.
        let mut p = HeaderMap::new();
        p.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9:4711"),
        );
        assert_eq!(
            client_addr(ip("127.0.0.1"), &p, &trusted),
            ip("203.0.113.9")
        );
        // Only trusted hops: the peer itself.
        let mut t = HeaderMap::new();
        t.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.3"));
        assert_eq!(client_addr(ip("127.0.0.1"), &t, &trusted), ip("127.0.0.1"));
    }

    #[test]
    fn an_address_holds_at_most_the_limit_and_slots_give_back() {
        let per = PerAddress::new(2);
        let a = per.take(ip("1.1.1.1")).unwrap();
        let _b = per.take(ip("1.1.1.1")).unwrap();
        assert!(per.take(ip("1.1.1.1")).is_none());
        assert!(per.take(ip("2.2.2.2")).is_some());
        drop(a);
        assert!(per.take(ip("1.1.1.1")).is_some());
        assert!(
            per.counts.lock().unwrap().len() <= 1,
            "empty entries are removed"
        );
        let unlimited = PerAddress::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| unlimited.take(ip("1.1.1.1")).unwrap())
            .collect();
        assert_eq!(slots.len(), 100);
    }
}
