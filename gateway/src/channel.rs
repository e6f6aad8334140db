//! `ChannelName`: a validated channel name, split into namespace and name once, so no
//! other code re-checks strings.

use std::{fmt, sync::Arc};

/// Longest channel name in bytes.
pub const MAX_LEN: usize = 255;

pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_.:@#/=-".contains(&b)
}

/// A channel such as `chat:room`, or a bare `room` in the `default` namespace.
/// Cloning is cheap: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName {
    full: Arc<str>,
    /// Byte index of the `:` separating namespace and name, if any (a name is at most
    /// [`MAX_LEN`] bytes, so it fits a byte: many structures hold a name).
    colon: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name must be 1-{MAX_LEN} bytes")]
    Length,
    #[error("channel name may only contain [A-Za-z0-9_.:@#/=-]")]
    Bytes,
    #[error("channel name must not have an empty namespace or name")]
    EmptyPart,
}

impl ChannelName {
    pub fn parse(s: &str) -> Result<Self, ChannelError> {
        if s.is_empty() || s.len() > MAX_LEN {
            return Err(ChannelError::Length);
        }
        if !s.bytes().all(is_name_byte) {
            return Err(ChannelError::Bytes);
        }
        let colon = s.find(':');
        if let Some(i) = colon
            && (i == 0 || i + 1 == s.len())
        {
            return Err(ChannelError::EmptyPart);
        }
        const { assert!(MAX_LEN <= u8::MAX as usize + 1) };
        Ok(Self {
            full: s.into(),
            colon: colon.map(|i| i as u8),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn shared(&self) -> &Arc<str> {
        &self.full
    }

    /// The same name held in `full` (the same text), to share one allocation.
    pub fn sharing(self, full: Arc<str>) -> Self {
        debug_assert_eq!(*full, *self.full);
        if *full != *self.full {
            return self;
        }
        Self {
            full,
            colon: self.colon,
        }
    }

    /// The namespace whose options apply: the part before the first `:`, or `default`.
    pub fn namespace(&self) -> &str {
        match self.colon {
            Some(i) => &self.full[..usize::from(i)],
            None => "default",
        }
    }

    /// The part after the namespace.
    pub fn name(&self) -> &str {
        match self.colon {
            Some(i) => &self.full[usize::from(i) + 1..],
            None => &self.full,
        }
    }

    /// For a user-limited channel (`chat:#alice`), the one user who may use it.
    pub fn owner(&self) -> Option<&str> {
        self.name().strip_prefix('#')
    }

    /// Whether `user` may subscribe or publish as a client, as far as the name says.
    pub fn allows_user(&self, user: &str) -> bool {
        self.owner()
            .is_none_or(|owner| !user.is_empty() && owner == user)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_namespace_and_name() {
        let c = ChannelName::parse("chat:room/1").unwrap();
        assert_eq!((c.namespace(), c.name()), ("chat", "room/1"));
        let c = ChannelName::parse("lobby").unwrap();
        assert_eq!((c.namespace(), c.name()), ("default", "lobby"));
        let c = ChannelName::parse("a:b:c").unwrap();
        assert_eq!((c.namespace(), c.name()), ("a", "b:c"));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(ChannelName::parse(""), Err(ChannelError::Length));
        assert_eq!(
            ChannelName::parse(&"a".repeat(256)),
            Err(ChannelError::Length)
        );
        assert!(ChannelName::parse(&"a".repeat(255)).is_ok());
        assert_eq!(ChannelName::parse("a b"), Err(ChannelError::Bytes));
        assert_eq!(ChannelName::parse("é"), Err(ChannelError::Bytes));
        assert_eq!(ChannelName::parse(":x"), Err(ChannelError::EmptyPart));
        assert_eq!(ChannelName::parse("x:"), Err(ChannelError::EmptyPart));
    }

    #[test]
    fn user_limited_channels() {
        let c = ChannelName::parse("chat:#alice").unwrap();
        assert_eq!(c.owner(), Some("alice"));
        assert!(c.allows_user("alice"));
        assert!(!c.allows_user("bob"));
        assert!(!c.allows_user(""));
        assert!(ChannelName::parse("chat:room").unwrap().allows_user(""));
    }
}
