//! Live leaderboards with O(log n) rank queries.
//!
//! Members are kept in an order-statistic B-tree ([`wabi_tree::OSBTreeMap`])
//! ordered by score (highest first) and then by the moment the member
//! reached that score (earliest first), so a tie goes to whoever got there
//! first. Rank, top-N and "around me" are a descent of that tree, never a
//! scan, which keeps them fast at ten million members.
//!
//! The tree's keys are those two integers (the moment is unique), the
//! member its value: a descent compares integers only, in leaves that
//! hold their keys together, and moving a member allocates nothing. (With
//! the member in the key, a score change in a board of a hundred thousand
//! cost about a tenth of the actor threads' time under batched load, most
//! of it in the cache misses of the old key's descent.)
//!
//! "The moment" is a sequence number the board hands out with every score
//! change, not a clock: replaying the same updates in the same order
//! rebuilds the same board.

use crate::ids::Id;
use crate::DefinitionError;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::HashMap;
use wabi_tree::OSBTreeMap;

/// The members' map: foldhash, not the standard SipHash, which was a
/// tenth of replaying a million scores at start-up (the ids come from
/// authenticated callers; the seed is per process).
type ByMember<V> = HashMap<Id, V, foldhash::fast::RandomState>;

/// What a leaderboard ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Metric {
    /// Points earned under the leaderboard's campaign.
    Points,
    /// Spend in minor units under the campaign.
    Spend,
    /// Number of purchases under the campaign.
    Purchases,
    /// Missions of the campaign completed.
    Missions,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaderboardDef {
    pub campaign: Id,
    pub metric: Metric,
    /// How many entries the board shows and streams by default.
    #[serde(default = "default_top_size")]
    pub top_size: u32,
}

fn default_top_size() -> u32 {
    10
}

/// The most entries one query may return.
pub const MAX_ENTRIES: u32 = 1_000;

impl LeaderboardDef {
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if self.top_size == 0 || MAX_ENTRIES < self.top_size {
            return Err(DefinitionError::new("top_size", "must be between 1 and 1000"));
        }
        Ok(())
    }
}

/// One row of a leaderboard answer; `rank` starts at 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Entry {
    pub rank: u64,
    pub customer: Id,
    pub score: i64,
}

/// The ordering key: highest score first, then earliest to reach it.
type Key = (Reverse<i64>, u64);

/// A leaderboard's members and scores.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "Members")]
pub struct Leaderboard {
    scores: ByMember<(i64, u64)>,
    order: OSBTreeMap<Key, Id>,
    next_seq: u64,
}

/// The serialised form: members with their score and sequence number.
#[derive(Serialize, Deserialize)]
struct Members {
    next_seq: u64,
    members: Vec<(Id, i64, u64)>,
}

impl From<Members> for Leaderboard {
    fn from(members: Members) -> Self {
        // Stored in rank order: the tree is built in one pass.
        Leaderboard {
            order: members
                .members
                .iter()
                .map(|(customer, score, seq)| ((Reverse(*score), *seq), customer.clone()))
                .collect(),
            scores: members.members.into_iter().map(|(customer, score, seq)| (customer, (score, seq))).collect(),
            next_seq: members.next_seq,
        }
    }
}

/// Serialised as `Members` is, in rank order, straight from the tree:
/// `serde(into)` cloned the whole board first, and a checkpoint serialises
/// a board of a million members while every score waits for it.
impl Serialize for Leaderboard {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct InRankOrder<'a>(&'a OSBTreeMap<Key, Id>);
        impl Serialize for InRankOrder<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.iter().map(|((Reverse(score), seq), customer)| (customer, score, seq)))
            }
        }
        let mut members = serializer.serialize_struct("Members", 2)?;
        members.serialize_field("next_seq", &self.next_seq)?;
        members.serialize_field("members", &InRankOrder(&self.order))?;
        members.end()
    }
}

impl PartialEq for Leaderboard {
    fn eq(&self, other: &Self) -> bool {
        self.next_seq == other.next_seq && self.scores == other.scores
    }
}

impl Leaderboard {
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Adds `delta` to the customer's score (joining the board at 0 first)
    /// and returns the new score. A zero delta changes nothing, so it does
    /// not cost the member its place among equal scores.
    pub fn add(&mut self, customer: &Id, delta: i64) -> i64 {
        if delta == 0 {
            return self.scores.get(customer).map_or(0, |(score, _)| *score);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.scores.get_mut(customer) {
            Some(entry) => {
                let (score, before) = *entry;
                let member =
                    self.order.remove(&(Reverse(score), before)).expect("every member in `scores` is in `order`");
                let score = score.saturating_add(delta);
                *entry = (score, seq);
                self.order.insert((Reverse(score), seq), member);
                score
            }
            None => {
                self.scores.insert(customer.clone(), (delta, seq));
                self.order.insert((Reverse(delta), seq), customer.clone());
                delta
            }
        }
    }

    /// Applies `changes` in order, leaving exactly the board that [`add`]
    /// one by one would. The order is updated once per member that moved,
    /// and rebuilt in one pass when most of the board did: replaying a
    /// journal of a million scores at start-up.
    ///
    /// [`add`]: Leaderboard::add
    pub fn add_all(&mut self, changes: impl IntoIterator<Item = (Id, i64)>) {
        let changes = changes.into_iter();
        // At least as many changes as members: the order is rebuilt
        // whatever moves (doing so costs no more than the changes), and
        // nobody's place before needs remembering. (Remembering it, in a
        // map of every member that moved, was two fifths of replaying two
        // million scores onto an empty board.)
        if self.scores.len() <= changes.size_hint().0 {
            for (customer, delta) in changes {
                if delta != 0 {
                    self.score(customer, delta);
                }
            }
            self.rebuild_order();
            return;
        }
        // Each moved member's key in `order` before the changes.
        let mut moved: ByMember<Option<(i64, u64)>> = ByMember::default();
        for (customer, delta) in changes {
            if delta == 0 {
                continue;
            }
            let before = self.score(customer.clone(), delta);
            moved.entry(customer).or_insert(before);
        }
        if self.scores.len() < 2 * moved.len() {
            self.rebuild_order();
            return;
        }
        for (customer, before) in moved {
            if let Some((score, seq)) = before {
                self.order.remove(&(Reverse(score), seq));
            }
            let (score, seq) = self.scores[&customer];
            self.order.insert((Reverse(score), seq), customer);
        }
    }

    /// Adds `delta` to the customer's entry in `scores` only (not in
    /// `order`), with the next sequence number; returns the entry before.
    fn score(&mut self, customer: Id, delta: i64) -> Option<(i64, u64)> {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.scores.get_mut(&customer) {
            Some(entry) => Some(std::mem::replace(entry, (entry.0.saturating_add(delta), seq))),
            None => self.scores.insert(customer, (delta, seq)),
        }
    }

    /// `order` made again from `scores`, in one pass.
    fn rebuild_order(&mut self) {
        self.order =
            self.scores.iter().map(|(customer, &(score, seq))| ((Reverse(score), seq), customer.clone())).collect();
    }

    /// The customer's 1-based rank and score, if on the board.
    pub fn rank(&self, customer: &Id) -> Option<Entry> {
        let (score, seq) = *self.scores.get(customer)?;
        let index = self.order.rank_of(&(Reverse(score), seq)).expect("every member in `scores` is in `order`");
        Some(Entry { rank: index as u64 + 1, customer: customer.clone(), score })
    }

    /// The first `n` entries.
    pub fn top(&self, n: usize) -> Vec<Entry> {
        self.range(0, n)
    }

    /// Up to `n` entries above and `n` below the customer, the customer
    /// included; empty if not on the board.
    pub fn around(&self, customer: &Id, n: usize) -> Vec<Entry> {
        let Some(me) = self.rank(customer) else {
            return Vec::new();
        };
        let index = usize::try_from(me.rank - 1).expect("ranks fit in usize");
        let start = index.saturating_sub(n);
        self.range(start, index + n + 1 - start)
    }

    fn range(&self, start: usize, count: usize) -> Vec<Entry> {
        (start..start.saturating_add(count))
            .map_while(|index| {
                self.order.get_by_rank(index).map(|((Reverse(score), _), customer)| Entry {
                    rank: index as u64 + 1,
                    customer: customer.clone(),
                    score: *score,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u32) -> Id {
        Id::parse(&format!("c-{n}")).expect("valid")
    }

    #[test]
    fn ties_go_to_whoever_reached_the_score_first() {
        let mut board = Leaderboard::default();
        board.add(&id(1), 50);
        board.add(&id(2), 80);
        board.add(&id(3), 30);
        board.add(&id(3), 20); // reaches 50 after c-1
        let top: Vec<(u64, Id, i64)> = board.top(10).into_iter().map(|e| (e.rank, e.customer, e.score)).collect();
        assert_eq!(top, vec![(1, id(2), 80), (2, id(1), 50), (3, id(3), 50)]);
        assert_eq!(board.rank(&id(3)).map(|e| e.rank), Some(3));
        assert_eq!(board.rank(&id(9)), None);
        let around: Vec<u64> = board.around(&id(1), 1).into_iter().map(|e| e.rank).collect();
        assert_eq!(around, vec![1, 2, 3]);
        assert_eq!(board.around(&id(2), 5).len(), 3);
    }

    #[test]
    fn serialised_form_round_trips() {
        let mut board = Leaderboard::default();
        for n in 0..50 {
            board.add(&id(n % 7), i64::from(n));
        }
        // Written straight from the tree, in the form boards were stored in
        // before (a `Members` value), and read back the same.
        let members = Members {
            next_seq: board.next_seq,
            members: board
                .order
                .iter()
                .map(|((Reverse(score), seq), customer)| (customer.clone(), *score, *seq))
                .collect(),
        };
        let bytes = bincode::serialize(&board).expect("serialise");
        assert_eq!(bytes, bincode::serialize(&members).expect("serialise"));
        let back: Leaderboard = bincode::deserialize(&bytes).expect("deserialise");
        assert_eq!(back, board);
        assert_eq!(back.top(7), board.top(7));
    }

    proptest! {
        /// Applying changes together leaves the board applying them one
        /// by one does, on an empty board or one with members, whether
        /// few or most of them move.
        #[test]
        fn add_all_matches_add_one_by_one(
            before in prop::collection::vec((0u32..60, -50i64..100), 0..200),
            changes in prop::collection::vec((0u32..60, -50i64..100), 0..200),
        ) {
            let mut one_by_one = Leaderboard::default();
            for (member, delta) in &before {
                one_by_one.add(&id(*member), *delta);
            }
            let mut together = one_by_one.clone();
            for (member, delta) in &changes {
                one_by_one.add(&id(*member), *delta);
            }
            together.add_all(changes.iter().map(|(member, delta)| (id(*member), *delta)));
            prop_assert_eq!(&together, &one_by_one);
            prop_assert_eq!(together.top(1_000), one_by_one.top(1_000));
            prop_assert_eq!(together.len(), together.order.len());
        }

        /// Against a naive model (sort everything), rank, top-N and around
        /// agree after any sequence of updates.
        #[test]
        fn matches_a_sorted_model(updates in prop::collection::vec((0u32..40, -50i64..100), 1..300)) {
            let mut board = Leaderboard::default();
            let mut model: HashMap<Id, (i64, u64)> = HashMap::new();
            let mut seq = 0;
            for (member, delta) in updates {
                let customer = id(member);
                board.add(&customer, delta);
                if delta != 0 {
                    let entry = model.entry(customer).or_insert((0, 0));
                    entry.0 += delta;
                    entry.1 = seq;
                    seq += 1;
                }
            }
            let mut sorted: Vec<(Id, i64, u64)> = model.into_iter().map(|(c, (s, q))| (c, s, q)).collect();
            sorted.sort_by_key(|(_, score, seq)| (Reverse(*score), *seq));
            let expected: Vec<Entry> = sorted
                .iter()
                .enumerate()
                .map(|(i, (c, s, _))| Entry { rank: i as u64 + 1, customer: c.clone(), score: *s })
                .collect();
            prop_assert_eq!(board.top(1_000), expected.clone());
            for entry in &expected {
                prop_assert_eq!(board.rank(&entry.customer), Some(entry.clone()));
                let around = board.around(&entry.customer, 2);
                let index = usize::try_from(entry.rank - 1).expect("small");
                let start = index.saturating_sub(2);
                let end = (index + 3).min(expected.len());
                prop_assert_eq!(around, expected[start..end].to_vec());
            }
        }
    }
}
