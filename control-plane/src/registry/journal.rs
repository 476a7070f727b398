//! The nodes whose [`Stamp`](super::Stamp) moved, in order: what lets the
//! engine read again only the nodes that changed since its last pass
//! ([`Registry::changed_since`](super::Registry::changed_since)) instead of
//! looking up every watched node of a 10k-node deployment each time.

use std::collections::VecDeque;

/// Entries kept when nobody reads them: a reader further behind than this
/// looks at every node once, as it does on its first pass. A pass of the
/// engine takes milliseconds, so between two of them a fleet of tens of
/// thousands of nodes changes far fewer than this.
pub(super) const JOURNAL_CAP: usize = 16 * 1024;

/// A bounded log of node ids, each entry numbered: the `n`th id ever
/// pushed has sequence number `n`.
#[derive(Debug)]
pub(super) struct Journal {
    /// Sequence number of `ids[0]`.
    first: u64,
    ids: VecDeque<String>,
    cap: usize,
}

impl Journal {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            first: 0,
            ids: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Note that `id`'s stamp moved; the oldest entry goes when full.
    pub(super) fn push(&mut self, id: &str) {
        if self.ids.len() == self.cap {
            self.ids.pop_front();
            self.first += 1;
        }
        self.ids.push_back(id.to_string());
    }

    /// The sequence number the next entry will have.
    pub(super) fn end(&self) -> u64 {
        self.first + self.ids.len() as u64
    }

    /// Every id pushed at or after `cursor`, oldest first, and the cursor
    /// to pass next time; `None` when some of them were already dropped
    /// (the reader must look at everything).
    pub(super) fn since(&self, cursor: u64, mut each: impl FnMut(&str)) -> Option<u64> {
        if cursor < self.first {
            return None;
        }
        let skip = usize::try_from(cursor - self.first).ok()?;
        for id in self.ids.iter().skip(skip) {
            each(id);
        }
        Some(self.end().max(cursor))
    }

    #[cfg(test)]
    pub(super) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.ids.len() > self.cap {
            self.ids.pop_front();
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn read(journal: &Journal, cursor: u64) -> Option<(Vec<String>, u64)> {
        let mut ids = Vec::new();
        journal
            .since(cursor, |id| ids.push(id.to_string()))
            .map(|next| (ids, next))
    }

    #[test]
    fn a_reader_gets_what_was_pushed_since_its_cursor() {
        let mut journal = Journal::new(4);
        let start = journal.end();
        journal.push("a");
        journal.push("b");
        let (ids, next) = read(&journal, start).expect("kept");
        assert_eq!(ids, ["a", "b"]);
        journal.push("a");
        assert_eq!(read(&journal, next), Some((vec!["a".to_string()], 3)));
        // Nothing new: nothing, and the same cursor.
        assert_eq!(read(&journal, 3), Some((Vec::new(), 3)));
    }

    #[test]
    fn a_reader_behind_the_oldest_kept_entry_is_told_so() {
        let mut journal = Journal::new(2);
        for id in ["a", "b", "c"] {
            journal.push(id);
        }
        assert_eq!(read(&journal, 0), None);
        assert_eq!(
            read(&journal, 1),
            Some((vec!["b".to_string(), "c".to_string()], 3))
        );
    }

    proptest! {
        /// Against a log that keeps everything: a reader is given exactly
        /// the entries since its cursor, or told that some are gone, and
        /// never told that when they are all still kept.
        #[test]
        fn matches_an_unbounded_log(
            cap in 1usize..6,
            steps in proptest::collection::vec((0u8..4, any::<bool>()), 0..60),
        ) {
            let mut journal = Journal::new(cap);
            let mut all: Vec<String> = Vec::new();
            let mut cursor = journal.end();
            for (id, read_now) in steps {
                if read_now {
                    match read(&journal, cursor) {
                        Some((ids, next)) => {
                            prop_assert_eq!(&ids[..], &all[cursor as usize..]);
                            prop_assert_eq!(next, all.len() as u64);
                            cursor = next;
                        }
                        None => {
                            prop_assert!(all.len() - cursor as usize > cap);
                            cursor = journal.end();
                        }
                    }
                } else {
                    let id = format!("n{id}");
                    journal.push(&id);
                    all.push(id);
                }
            }
        }
    }
}
