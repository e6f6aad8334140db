//! Key and pub/sub channel names. Everything of one channel carries `{channel}` as its
//! hash tag, so one channel's keys share a Redis Cluster slot and one script can touch
//! them all.

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>{<channel>}<suffix…>`, built without the formatting machinery (every
    /// publish makes four of these).
    fn tagged(&self, channel: &str, suffix: &[&str]) -> String {
        let len = suffix.iter().map(|s| s.len()).sum::<usize>();
        let mut key = String::with_capacity(self.prefix.len() + channel.len() + 2 + len);
        key.push_str(&self.prefix);
        key.push('{');
        key.push_str(channel);
        key.push('}');
        suffix.iter().for_each(|s| key.push_str(s));
        key
    }

    /// The stream of publications (entry id = offset).
    pub fn stream(&self, c: &str) -> String {
        self.tagged(c, &[":s"])
    }

    /// The meta hash: offset `o`, epoch `e`, and the identity of the Redis instance that
    /// last vouched for the epoch.
    pub fn meta(&self, c: &str) -> String {
        self.tagged(c, &[":m"])
    }

    pub fn idempotency(&self, c: &str, key: &str) -> String {
        self.tagged(c, &[":i:", key])
    }

    /// Presence: a sorted set of client ids scored by expiry, and a hash client → user.
    pub fn presence(&self, c: &str) -> String {
        self.tagged(c, &[":p"])
    }

    pub fn presence_users(&self, c: &str) -> String {
        self.tagged(c, &[":pu"])
    }

    /// The pub/sub channel carrying a gateway channel's publications.
    pub fn pubsub(&self, c: &str) -> String {
        self.tagged(c, &[""])
    }

    /// Control messages every node hears (disconnect a user).
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// A blob's bytes, under the blob's own hash tag.
    pub fn blob(&self, id: &str) -> String {
        format!("{}blob:{{{id}}}", self.prefix)
    }

    /// A blob's meta (size, type, dimensions).
    pub fn blob_meta(&self, id: &str) -> String {
        format!("{}blob:{{{id}}}:m", self.prefix)
    }

    /// The channels a blob is granted to (a set).
    pub fn blob_grants(&self, id: &str) -> String {
        format!("{}blob:{{{id}}}:c", self.prefix)
    }

    /// A value every node shares (e.g. the blob URL signing key).
    pub fn shared(&self, name: &str) -> String {
        format!("{}shared:{name}", self.prefix)
    }

    /// A server's layout record (see `layout.rs`).
    pub fn layout(&self) -> String {
        format!("{}layout", self.prefix)
    }

    /// The node registry hash.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// The gateway channel of a pub/sub channel name.
    pub fn channel_of<'a>(&self, redis_channel: &'a str) -> Option<&'a str> {
        redis_channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix('}')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_channel_hash_tag() {
        let k = Keys::new("gw:");
        assert_eq!(k.stream("chat:room"), "gw:{chat:room}:s");
        assert_eq!(k.meta("chat:room"), "gw:{chat:room}:m");
        assert_eq!(k.pubsub("chat:room"), "gw:{chat:room}");
        assert_eq!(k.channel_of("gw:{chat:room}"), Some("chat:room"));
        assert_eq!(k.channel_of("gw:control"), None);
    }
}
