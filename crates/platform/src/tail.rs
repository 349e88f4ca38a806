//! The newest events of the embedded log, kept in memory by the process
//! that appends them, so that its consumers take their batches from here
//! instead of reading back, through SQLite, what was written a moment ago.
//!
//! Measured before: reading the log was the largest single item of SQLite
//! time in the embedded shape (~19% of the connection threads' time; a
//! reader's page cache is dropped whenever anyone commits, so every read
//! went back to the WAL), and each row crossed a thread and was copied
//! three times on its way to the consumer.
//!
//! The tail answers only for a range it holds completely; for anything else
//! (a consumer far behind, a start, events appended by another process) the
//! caller reads the table, so the tail can make reads cheaper but never
//! different.

use std::collections::VecDeque;

/// One appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailEvent {
    pub seq: i64,
    pub event_type: String,
    pub payload: String,
}

#[derive(Debug)]
pub struct Tail {
    /// Every event of the log with `lo < seq <= hi` is in `events`.
    lo: i64,
    hi: i64,
    /// In `seq` order.
    events: VecDeque<TailEvent>,
    capacity: usize,
}

impl Tail {
    /// An empty tail of a log whose last sequence number is `hi`.
    pub fn new(hi: i64, capacity: usize) -> Tail {
        Tail {
            lo: hi,
            hi,
            events: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
        }
    }

    /// Records a committed append. `before` was the log's last sequence
    /// number when the append took the write lock, `appended` is what it
    /// inserted (every `seq` above `before`), and `last` the last sequence
    /// number at its commit. If someone else appended since the last call
    /// (`before` is not where the tail ends), the tail starts again at
    /// `before`.
    pub fn extend(&mut self, before: i64, mut appended: Vec<TailEvent>, last: i64) {
        if before != self.hi || last < before {
            self.events.clear();
            self.lo = before;
        }
        appended.sort_by_key(|e| e.seq);
        self.events.extend(appended);
        self.hi = last;
        while self.events.len() > self.capacity {
            let oldest = self.events.pop_front().expect("over capacity");
            self.lo = oldest.seq;
        }
    }

    /// Up to `max` events of `types` after `position`, with the position
    /// read up to (the last one returned when `max` were found, else the end
    /// of the tail). `None` when the tail does not hold everything after
    /// `position`, or holds nothing new: read the table then.
    pub fn read(
        &self,
        position: i64,
        types: &[&str],
        max: usize,
    ) -> Option<(Vec<(i64, String)>, i64)> {
        if position < self.lo || position >= self.hi {
            return None;
        }
        let start = self.events.partition_point(|e| e.seq <= position);
        let mut out = Vec::new();
        for e in self.events.range(start..) {
            if types.contains(&e.event_type.as_str()) {
                out.push((e.seq, e.payload.clone()));
                if out.len() >= max {
                    return Some((out, e.seq));
                }
            }
        }
        Some((out, self.hi))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn ev(seq: i64, t: &str) -> TailEvent {
        TailEvent {
            seq,
            event_type: t.into(),
            payload: format!("{t}@{seq}"),
        }
    }

    #[test]
    fn answers_only_for_what_it_holds() {
        let mut tail = Tail::new(10, 4);
        assert_eq!(tail.read(10, &["A"], 10), None, "nothing new");
        tail.extend(10, vec![ev(12, "B"), ev(11, "A")], 12);
        assert_eq!(
            tail.read(10, &["A"], 10),
            Some((vec![(11, "A@11".into())], 12))
        );
        assert_eq!(tail.read(9, &["A"], 10), None, "before the tail");
        // Another process appended 13..=20: the tail restarts at 20.
        tail.extend(20, vec![ev(21, "A")], 21);
        assert_eq!(tail.read(12, &["A"], 10), None);
        assert_eq!(
            tail.read(20, &["A"], 10),
            Some((vec![(21, "A@21".into())], 21))
        );
        // Capacity: the oldest go, and with them the claim to cover them.
        tail.extend(21, (22..=25).map(|s| ev(s, "A")).collect(), 25);
        assert_eq!(tail.read(20, &["A"], 10), None);
        let (batch, upto) = tail.read(21, &["A"], 2).unwrap();
        assert_eq!(batch.iter().map(|e| e.0).collect::<Vec<_>>(), vec![22, 23]);
        assert_eq!(upto, 23, "read up to the last one returned when cut short");
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// This process appends events of these types (gaps in seq allowed).
        Append(Vec<(u8, bool)>),
        /// Another process appends this many events.
        Foreign(u8),
        Read(u8, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => prop::collection::vec((0u8..3, any::<bool>()), 0..6).prop_map(Step::Append),
            1 => (1u8..4).prop_map(Step::Foreign),
            4 => (0u8..40, 1usize..5).prop_map(|(back, max)| Step::Read(back, max)),
        ]
    }

    proptest! {
        /// Whatever the tail answers is exactly what reading the whole log
        /// would have answered.
        #[test]
        fn agrees_with_the_log(steps in prop::collection::vec(step(), 1..60)) {
            const TYPES: [&str; 3] = ["A", "B", "C"];
            let mut log: BTreeMap<i64, TailEvent> = BTreeMap::new();
            let mut seq = 0i64;
            let mut tail = Tail::new(0, 8);
            for s in steps {
                match s {
                    Step::Append(events) => {
                        let before = seq;
                        let mut appended = Vec::new();
                        for (t, gap) in events {
                            seq += 1 + gap as i64;
                            let e = ev(seq, TYPES[t as usize]);
                            log.insert(seq, e.clone());
                            appended.push(e);
                        }
                        appended.reverse();
                        tail.extend(before, appended, seq);
                    }
                    Step::Foreign(n) => {
                        for _ in 0..n {
                            seq += 1;
                            log.insert(seq, ev(seq, "A"));
                        }
                    }
                    Step::Read(back, max) => {
                        let position = (seq - back as i64).max(0);
                        let wanted = ["A", "C"];
                        if let Some((batch, upto)) = tail.read(position, &wanted, max) {
                            let expected: Vec<(i64, String)> = log
                                .range(position + 1..=upto)
                                .filter(|(_, e)| wanted.contains(&e.event_type.as_str()))
                                .map(|(s, e)| (*s, e.payload.clone()))
                                .collect();
                            prop_assert_eq!(&batch, &expected);
                            prop_assert!(batch.len() <= max);
                            prop_assert!(upto > position && upto <= seq);
                        }
                    }
                }
            }
        }
    }
}
