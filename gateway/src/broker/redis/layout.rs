//! The layout: the set of servers a node shards channels over, and what changing it means
//! for history. A channel lives on one server of the layout; a different layout may put
//! it on another server, which has its own (older, or no) history of it. So every channel
//! epoch is tied to the layout it was vouched for:
//!
//! - each server keeps a layout record `{prefix}layout`: the fingerprint of the layout
//!   whose nodes last used it, a random token, and when a node last saw it;
//! - a node starting with a layout that any of its servers does not show (or that a
//!   server has not seen for `layout_stale`, e.g. it sat outside a layout that was tried
//!   and reverted) gives every one of its servers a new token;
//! - the scripts store the token with each channel's epoch and rotate the epoch when the
//!   server's token differs: after a layout change every channel restarts its history
//!   (subscribers get a reset, recoveries from before answer `recovered=false`) rather
//!   than resume a history that missed what was published elsewhere meanwhile.
//!
//! A layout switched to completely different servers and back within `layout_stale` is
//! not detected (no server saw the other layout); nor does a deployment whose nodes
//! disagree on the layout converge — nodes say so (warning, `gateway_redis_layout_mismatch`).

use super::{RedisBroker, Server, reply};
use crate::broker::BrokerError;
use redis::Value;
use std::time::Duration;

/// One server's layout record as a node read it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Empty: no record (a new or emptied server).
    pub fingerprint: String,
    pub token: String,
    /// Since a node of this fingerprint last saw the server; `None` without a record.
    pub age: Option<Duration>,
}

/// What a starting node does with its servers' records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Every server shows this layout, recently: keep their tokens (servers without a
    /// record, emptied by a restart, get their own new token).
    Keep,
    /// The layout changed, or some server missed part of its history: every server
    /// gets a new token.
    Rotate,
}

pub fn at_startup(mine: &str, records: &[Record], stale: Duration) -> Startup {
    let changed = records.iter().any(|r| {
        let foreign = !r.fingerprint.is_empty() && r.fingerprint != mine;
        let stale = !r.fingerprint.is_empty() && r.age.is_none_or(|a| a > stale);
        foreign || stale
    });
    if changed {
        Startup::Rotate
    } else {
        Startup::Keep
    }
}

/// KEYS: layout record. ARGV: this node's fingerprint. Returns {fingerprint, token,
/// age ms (-1 without a record)}, and refreshes the record's time if it is this layout's.
pub const READ: &str = r#"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('hmget', KEYS[1], 'f', 't', 's')
local age = -1
if r[3] then age = now - tonumber(r[3]) end
if r[1] == ARGV[1] then redis.call('hset', KEYS[1], 's', now) end
return {r[1] or '', r[2] or '', age}
"#;

/// KEYS: layout record. ARGV: fingerprint, new token, expected fingerprint, expected
/// token. Writes the new record if the old one is still the expected one (another node
/// may have claimed it first); returns the record's {fingerprint, token}.
pub const CLAIM: &str = r#"
local r = redis.call('hmget', KEYS[1], 'f', 't')
if (r[1] or '') == ARGV[3] and (r[2] or '') == ARGV[4] then
  local t = redis.call('time')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('hset', KEYS[1], 'f', ARGV[1], 't', ARGV[2], 's', now)
  return {ARGV[1], ARGV[2]}
end
return {r[1] or '', r[2] or ''}
"#;

fn new_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl RedisBroker {
    async fn read_layout(&self, server: &Server) -> Result<Record, BrokerError> {
        let (script, key, mine) = (
            &self.scripts.layout_read,
            self.keys.layout(),
            self.layout.clone(),
        );
        let response: Vec<Value> = server
            .commands
            .run(|mut conn| async move { script.key(key).arg(mine).invoke_async(&mut conn).await })
            .await?;
        let [f, t, age] = response.as_slice() else {
            return Err(reply::bad_reply("layout"));
        };
        Ok(Record {
            fingerprint: reply::text(f),
            token: reply::text(t),
            age: reply::int(age)
                .and_then(|a| u64::try_from(a).ok())
                .map(Duration::from_millis),
        })
    }

    async fn claim_layout(&self, server: &Server, seen: &Record) -> Result<Record, BrokerError> {
        let (script, key) = (&self.scripts.layout_claim, self.keys.layout());
        let (mine, token) = (self.layout.clone(), new_token());
        let (f, t) = (seen.fingerprint.clone(), seen.token.clone());
        let response: Vec<Value> = server
            .commands
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(mine)
                    .arg(token)
                    .arg(f)
                    .arg(t)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let [f, t] = response.as_slice() else {
            return Err(reply::bad_reply("layout claim"));
        };
        Ok(Record {
            fingerprint: reply::text(f),
            token: reply::text(t),
            age: None,
        })
    }

    fn adopt(&self, server: &Server, record: &Record) {
        if record.fingerprint != self.layout {
            self.layout_mismatch(&record.fingerprint);
        }
        *server.layout_token() = Some(record.token.clone());
    }

    /// At startup: reads every server's layout record and settles the tokens (see the
    /// module doc). Until it succeeds the node is not ready.
    pub(super) async fn settle_layout(&self) -> Result<(), BrokerError> {
        let mut records = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            records.push(self.read_layout(server).await?);
        }
        let decision = at_startup(&self.layout, &records, self.config.layout_stale);
        if decision == Startup::Rotate {
            tracing::warn!(
                layout = %self.layout,
                "redis layout changed since the servers last saw it: every channel's epoch restarts"
            );
        }
        for (server, seen) in self.servers.iter().zip(records) {
            let record = if decision == Startup::Rotate || seen.fingerprint.is_empty() {
                self.claim_layout(server, &seen).await?
            } else {
                seen
            };
            self.adopt(server, &record);
        }
        Ok(())
    }

    /// Every upkeep: keeps this layout's records fresh, gives an emptied server (restarted
    /// without persistence) a record again, and follows a token another node set.
    pub(super) async fn layout_upkeep(&self) {
        for server in &self.servers {
            let Ok(seen) = self.read_layout(server).await else {
                continue;
            };
            let record = if seen.fingerprint.is_empty() {
                match self.claim_layout(server, &seen).await {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            } else {
                seen
            };
            self.adopt(server, &record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(300);

    fn rec(f: &str, age_s: Option<u64>) -> Record {
        Record {
            fingerprint: f.into(),
            token: if f.is_empty() {
                String::new()
            } else {
                "t".into()
            },
            age: age_s.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_restart_with_the_same_layout_keeps_every_epoch() {
        let records = [rec("L1", Some(4)), rec("L1", Some(1))];
        assert_eq!(at_startup("L1", &records, STALE), Startup::Keep);
    }

    #[test]
    fn a_new_deployment_or_an_emptied_server_is_not_a_layout_change() {
        assert_eq!(at_startup("L1", &[rec("", None)], STALE), Startup::Keep);
        let records = [rec("L1", Some(3)), rec("", None)];
        assert_eq!(at_startup("L1", &records, STALE), Startup::Keep);
    }

    #[test]
    fn adding_a_server_or_reverting_a_change_rotates_every_token() {
        // [A, B] -> [A, B, C]: A and B show the old layout.
        let records = [rec("L1", Some(2)), rec("L1", Some(2)), rec("", None)];
        assert_eq!(at_startup("L2", &records, STALE), Startup::Rotate);
        // ... and back to [A, B]: A and B show L2 now.
        let records = [rec("L2", Some(2)), rec("L2", Some(2))];
        assert_eq!(at_startup("L1", &records, STALE), Startup::Rotate);
    }

    #[test]
    fn a_server_that_sat_out_a_layout_for_a_while_rotates_every_token() {
        // [A] -> [B] -> [A]: A shows L1 still, but nobody of L1 saw it for long.
        let records = [rec("L1", Some(900))];
        assert_eq!(at_startup("L1", &records, STALE), Startup::Rotate);
    }
}
