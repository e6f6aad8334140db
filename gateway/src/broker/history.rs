//! Positions, epochs and history pages: the rules both brokers share.
//!
//! An epoch names one lifetime of a channel's stream. It is created when a stream starts
//! (no stream known) and replaced whenever the stream may have lost or rolled back
//! acknowledged publications, so an `(epoch, offset)` pair names one publication forever.

use broker_proto::v1::Publication;

/// Where a channel's stream stands. `offset` is the last assigned offset (0: none yet).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// A fresh random epoch.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Publications after some offset, oldest first, and the stream's position when read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryPage {
    pub position: Position,
    pub publications: Vec<Publication>,
}

impl HistoryPage {
    /// Whether this page is exactly what a client positioned at `since` (in this page's
    /// epoch) missed: every publication from `since + 1` up to the position, none trimmed
    /// or expired before the first, none cut off after the last. A `since` ahead of the
    /// position is never recoverable.
    pub fn recovers(&self, since: u64) -> bool {
        let (Some(first), Some(last)) = (self.publications.first(), self.publications.last())
        else {
            return since == self.position.offset;
        };
        first.offset == since + 1
            && last.offset == self.position.offset
            && self.publications.len() as u64 == last.offset - first.offset + 1
    }

    /// The offset a subscriber has after receiving this page from `since`.
    pub fn end(&self, since: u64) -> u64 {
        self.publications.last().map_or(since, |p| p.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(offsets: &[u64], position: u64) -> HistoryPage {
        HistoryPage {
            position: Position {
                offset: position,
                epoch: "e".into(),
            },
            publications: offsets
                .iter()
                .map(|&offset| Publication {
                    offset,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_page_recovers_only_the_whole_range_to_the_position() {
        assert!(page(&[4, 5, 6], 6).recovers(3));
        assert!(page(&[], 6).recovers(6), "nothing missed");
        assert!(!page(&[5, 6], 6).recovers(3), "4 was trimmed");
        assert!(!page(&[4, 5], 6).recovers(3), "cut off before the position");
        assert!(!page(&[], 6).recovers(3), "everything after 3 expired");
        assert!(!page(&[], 6).recovers(9), "an offset from the future");
        assert!(!page(&[4, 6], 6).recovers(3), "a hole");
        assert_eq!(page(&[4, 5], 6).end(3), 5);
        assert_eq!(page(&[], 6).end(6), 6);
    }

    #[test]
    fn epochs_are_random() {
        assert_ne!(new_epoch(), new_epoch());
        assert_eq!(new_epoch().len(), 16);
    }
}
