//! `ChannelLog`: one channel's stream in memory — the offset counter, the epoch, the
//! retained publications and the idempotency keys — driven with explicit time, so tests
//! exercise trimming and expiry without sleeping.

use crate::{
    broker::{HistoryPage, Position, PublishRequest, history::new_epoch},
    channel::ChannelName,
    config::NamespaceOptions,
    metrics,
};
use broker_proto::v1::Publication;
use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

/// Idempotency keys are remembered at least this long, even in channels without history.
pub const MIN_IDEMPOTENCY_TTL: Duration = Duration::from_secs(60);
/// Idempotency keys one channel remembers at most; beyond it the oldest is forgotten
/// early (counted in `gateway_idempotency_keys_evicted_total`). Keys are at most 128
/// bytes, so a channel's keys stay under ~2 MiB however fast clients publish.
pub const MAX_IDEMPOTENCY_KEYS: usize = 10_000;

#[derive(Debug)]
pub struct ChannelLog {
    epoch: String,
    offset: u64,
    entries: VecDeque<(Instant, Publication)>,
    idempotency: HashMap<String, Position>,
    /// The keys in `idempotency`, oldest first, to expire and evict without a scan.
    idempotency_order: VecDeque<(Instant, String)>,
    last_publish: Instant,
}

/// What [`ChannelLog::append`] decided.
#[derive(Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a return value that lives for one call; boxing would allocate per publish"
)]
pub enum Appended {
    /// A new publication, to be delivered.
    New(Position, Publication),
    /// A retry of an earlier publish: its first result, not delivered again.
    Duplicate(Position),
}

impl ChannelLog {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: new_epoch(),
            offset: 0,
            entries: VecDeque::new(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            last_publish: now,
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    pub fn append(
        &mut self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: PublishRequest,
        now: Instant,
        unix_ms: i64,
    ) -> Appended {
        self.expire(options, now);
        if !request.idempotency_key.is_empty()
            && let Some(position) = self.idempotency.get(&request.idempotency_key)
        {
            return Appended::Duplicate(position.clone());
        }
        let history = options.has_history();
        let (offset, epoch) = if history {
            self.offset += 1;
            (self.offset, self.epoch.clone())
        } else {
            (0, String::new())
        };
        let publication = Publication {
            channel: channel.as_str().to_owned(),
            offset,
            epoch: epoch.clone(),
            data: request.data,
            content_type: request.content_type,
            info: request.info,
            time_unix_ms: unix_ms,
            blobs: request.blobs,
        };
        let position = Position { offset, epoch };
        if history {
            self.entries.push_back((now, publication.clone()));
            while self.entries.len() > options.history_size {
                self.entries.pop_front();
            }
        }
        if !request.idempotency_key.is_empty() {
            if self.idempotency_order.len() >= MAX_IDEMPOTENCY_KEYS
                && let Some((_, oldest)) = self.idempotency_order.pop_front()
            {
                self.idempotency.remove(&oldest);
                metrics::idempotency_key_evicted();
            }
            self.idempotency_order
                .push_back((now, request.idempotency_key.clone()));
            self.idempotency
                .insert(request.idempotency_key, position.clone());
        }
        self.last_publish = now;
        Appended::New(position, publication)
    }

    /// Drops publications older than the history TTL and forgotten idempotency keys.
    pub fn expire(&mut self, options: &NamespaceOptions, now: Instant) {
        let ttl = options.history_ttl();
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= ttl)
        {
            self.entries.pop_front();
        }
        let key_ttl = ttl.max(MIN_IDEMPOTENCY_TTL);
        while let Some((at, _)) = self.idempotency_order.front()
            && now.saturating_duration_since(*at) >= key_ttl
        {
            if let Some((_, key)) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&key);
            }
        }
    }

    /// Publications after `since`, at most `limit` (0: all retained).
    pub fn history(
        &mut self,
        options: &NamespaceOptions,
        since: u64,
        limit: usize,
        now: Instant,
    ) -> HistoryPage {
        self.expire(options, now);
        let publications = self
            .entries
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p.offset > since)
            .take(if limit == 0 { usize::MAX } else { limit })
            .cloned()
            .collect();
        HistoryPage {
            position: self.position(),
            publications,
        }
    }

    /// Whether nothing would be lost by forgetting this log (its epoch goes with it):
    /// no publication or idempotency key is young enough to matter.
    pub fn idle(&self, options: &NamespaceOptions, now: Instant) -> bool {
        let keep = options.history_ttl().max(MIN_IDEMPOTENCY_TTL);
        now.saturating_duration_since(self.last_publish) >= keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn opts(size: usize, ttl: u64) -> NamespaceOptions {
        NamespaceOptions {
            history_size: size,
            history_ttl_seconds: ttl,
            ..NamespaceOptions::default()
        }
    }

    fn req(data: &'static str, key: &str) -> PublishRequest {
        PublishRequest {
            data: Bytes::from_static(data.as_bytes()),
            idempotency_key: key.into(),
            ..Default::default()
        }
    }

    fn offsets(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().map(|p| p.offset).collect()
    }

    #[test]
    fn offsets_are_gapless_and_history_is_bounded() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(3, 60);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        for i in 1..=5u64 {
            match log.append(&ch, &o, req("x", ""), t, 0) {
                Appended::New(p, publication) => assert_eq!((p.offset, publication.offset), (i, i)),
                other => panic!("{other:?}"),
            }
        }
        let page = log.history(&o, 0, 0, t);
        assert_eq!(offsets(&page), vec![3, 4, 5]);
        assert!(!page.recovers(0), "offsets 1 and 2 were trimmed");
        assert!(log.history(&o, 2, 0, t).recovers(2));
        let page = log.history(&o, 3, 1, t);
        assert_eq!(offsets(&page), vec![4]);
        assert!(
            !page.recovers(3),
            "a limited page does not reach the position"
        );
        let page = log.history(&o, 5, 0, t);
        assert!(page.recovers(5) && page.publications.is_empty());
        assert!(
            !log.history(&o, 9, 0, t).recovers(9),
            "an offset from the future is not recoverable"
        );
    }

    #[test]
    fn history_expires_by_ttl() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 5);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        log.append(&ch, &o, req("a", ""), t, 0);
        log.append(&ch, &o, req("b", ""), t + Duration::from_secs(3), 0);
        let page = log.history(&o, 0, 0, t + Duration::from_secs(6));
        assert_eq!(offsets(&page), vec![2]);
        assert!(!page.recovers(0));
        assert_eq!(
            page.position.offset, 2,
            "the offset counter survives expiry"
        );
    }

    #[test]
    fn idempotency_key_returns_the_first_result() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 5);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        let Appended::New(first, _) = log.append(&ch, &o, req("a", "k1"), t, 0) else {
            panic!()
        };
        assert_eq!(
            log.append(&ch, &o, req("a", "k1"), t, 0),
            Appended::Duplicate(first.clone())
        );
        assert!(
            matches!(log.append(&ch, &o, req("a", "k2"), t, 0), Appended::New(p, _) if p.offset == 2)
        );
        // Keys are remembered at least a minute, then forgotten.
        let later = t + MIN_IDEMPOTENCY_TTL;
        assert!(
            matches!(log.append(&ch, &o, req("a", "k1"), later, 0), Appended::New(p, _) if p.offset == 3)
        );
    }

    /// Found by the hostile-input sweep: keys had no count bound (one client pinned
    /// hundreds of MB with distinct keys). The oldest goes first; the newest are kept.
    #[test]
    fn a_channel_remembers_a_bounded_number_of_keys() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 5);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        for i in 0..MAX_IDEMPOTENCY_KEYS + 5 {
            log.append(&ch, &o, req("a", &format!("k{i}")), t, 0);
        }
        assert_eq!(log.idempotency.len(), MAX_IDEMPOTENCY_KEYS);
        assert_eq!(log.idempotency_order.len(), MAX_IDEMPOTENCY_KEYS);
        assert!(matches!(
            log.append(&ch, &o, req("a", "k0"), t, 0),
            Appended::New(..)
        ));
        let newest = format!("k{}", MAX_IDEMPOTENCY_KEYS + 4);
        assert!(matches!(
            log.append(&ch, &o, req("a", &newest), t, 0),
            Appended::Duplicate(..)
        ));
    }

    #[test]
    fn channels_without_history_get_no_offsets() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(0, 60);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        let Appended::New(p, _) = log.append(&ch, &o, req("a", ""), t, 0) else {
            panic!()
        };
        assert_eq!(
            p,
            Position {
                offset: 0,
                epoch: String::new()
            }
        );
        assert!(log.history(&o, 0, 0, t).publications.is_empty());
    }

    #[test]
    fn a_log_is_idle_once_nothing_young_is_left() {
        let ch = ChannelName::parse("c").unwrap();
        let o = opts(10, 300);
        let t = Instant::now();
        let mut log = ChannelLog::new(t);
        log.append(&ch, &o, req("a", ""), t, 0);
        assert!(!log.idle(&o, t + Duration::from_secs(299)));
        assert!(log.idle(&o, t + Duration::from_secs(300)));
        let short = opts(10, 5);
        assert!(
            !log.idle(&short, t + Duration::from_secs(59)),
            "keys live 60 s"
        );
        assert!(log.idle(&short, t + MIN_IDEMPOTENCY_TTL));
    }
}
