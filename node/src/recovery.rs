//! Start-up recovery: bring snapshots and indexes up to the journal's end.
//!
//! The journal holds every acknowledged entry since the last checkpoint. At
//! start-up, before the node takes requests, each batch after the
//! checkpoint is read once; the derived indexes (outbox, audit) of the
//! batches from the writer's mark on are written again (a crash may have
//! taken them from sled; see [`journal::REDO_KEY`]), the seen ids of every batch the
//! [`crate::seen`] index's runs do not cover yet, and each entity that
//! has entries there gets its snapshot, the entries after it replayed, and
//! a new snapshot. An entity that journals its whole state (customers,
//! wheels, jackpots) simply takes its last entry as its snapshot, kept in
//! memory ([`Recovered`]) and written after the node is ready; until they
//! are all written, the tail stays and the next checkpoint writes what is
//! left before it drops the tail. When nothing is pending, the checkpoint moves to the end at once
//! and the replayed batches are dropped. The tail is bounded by the
//! checkpoint interval, so recovery time is too.
//!
//! Writes go in the order snapshots, checkpoint, deletions, and are flushed
//! once: sled persists writes in order, so a crash during recovery leaves
//! either the old checkpoint (and recovery runs again) or the new one with
//! every snapshot it relies on. The journal's segments below a new
//! checkpoint are deleted only after that flush.

use crate::actor::Entity;
use crate::entities::{CustomerEntity, JackpotEntity, LeaderboardEntity, WheelEntity};
use crate::journal::{self, EntryView, JournalEntry, Snapshot, CHECKPOINT_KEY};
use crate::storage::{decode, encode, SharedBytes, StorageError, StorageResult, Store};
use crate::FastMap;
use bazaar_observability::Metrics;
use parking_lot::Mutex;
use std::time::Instant;

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The sequence number the journal writer continues from.
    pub next_seq: u64,
    pub batches: usize,
    pub entries: usize,
    pub entities: usize,
}

pub fn recover(store: &Store, metrics: &Metrics) -> StorageResult<(RecoveryReport, Recovered)> {
    let started = Instant::now();
    // Entries borrowed from the mapped segments: most of a tail is never
    // needed whole (see [`journal::EntryView`]).
    let tail = journal::open_tail(store)?;
    let batches = tail.views()?;
    let read = started.elapsed();
    let mut report = RecoveryReport { next_seq: tail.checkpoint, batches: batches.len(), entries: 0, entities: 0 };
    // The writer makes a batch's derived writes in sled once the batch is
    // durable, then marks the first batch whose derived writes, or whose
    // carried outbox messages, may still be missing; sled keeps a prefix
    // of its writes, so everything before the mark is there.
    let last = batches.last().map_or(0, |(seq, _)| *seq);
    let redo_from = journal::read_redo_from(store, last)?;
    let reindex_from = batches.partition_point(|(seq, _)| *seq < redo_from);
    // The idempotency records are the exception: those after the index's
    // last run are only in the journal (see [`crate::seen`]).
    let covered = store.seen.covered();
    for (seq, entries) in &batches[..reindex_from] {
        if covered.is_none_or(|covered| covered < *seq) {
            let records: Vec<(SharedBytes, SharedBytes)> =
                entries.iter().filter_map(|entry| entry.seen).map(|(key, value)| (key.into(), value.into())).collect();
            store.seen.insert(*seq, &records);
        }
    }
    // A message whose receiver's record is anywhere in the tail was applied
    // and replays with it: it needs no redelivery.
    let mut indexer = journal::Indexer::recovering(&batches, reindex_from)?;
    for (seq, entries) in &batches[reindex_from..] {
        let mut entries: Vec<JournalEntry> = entries.iter().map(EntryView::to_entry).collect();
        indexer.before_flush(store, &entries, false)?;
        indexer.index_derived(store, *seq, &mut entries)?;
    }
    indexer.finish(store)?;
    let indexed = started.elapsed();
    // Entities that journal their whole state need only their last entry,
    // which becomes their pending snapshot; the others (leaderboards,
    // jackpots) replay every entry of theirs, on a thread of their own beside.
    let (pending, replayed_in_full) = std::thread::scope(|scope| {
        let replaying = scope.spawn(|| -> StorageResult<usize> {
            let mut changes: FastMap<&str, Vec<(u64, &[u8])>> = FastMap::default();
            for entry in batches.iter().flat_map(|(_, entries)| entries) {
                if !journals_state(entry.entity)? {
                    changes.entry(entry.entity).or_default().push((entry.entity_seq, entry.change));
                }
            }
            for (entity, changes) in &changes {
                match entity.split('/').nth(1) {
                    Some("leaderboard") => replay::<LeaderboardEntity>(store, entity, changes)?,
                    Some("jackpot") => replay::<JackpotEntity>(store, entity, changes)?,
                    _ => return Err(StorageError::Codec(format!("journal entry for unknown entity {entity:?}"))),
                }
            }
            Ok(changes.len())
        });
        // The last entry is the whole state, encoded as a snapshot's is,
        // and at least as new as any stored snapshot: the writer stores a
        // snapshot after the entries it covers, so the tail holds every
        // entry up to it (or none of the entity's at all). Scanned newest
        // first, straight into the pending map: an entity met again is
        // only looked up, and only a new one's kind is read.
        let mut pending: FastMap<String, Snapshot> = FastMap::default();
        for entry in batches.iter().rev().flat_map(|(_, entries)| entries.iter().rev()) {
            if !pending.contains_key(entry.entity) && journals_state(entry.entity)? {
                pending.insert(
                    entry.entity.to_string(),
                    Snapshot { entity_seq: entry.entity_seq, state: entry.change.to_vec() },
                );
            }
        }
        let replayed_in_full =
            replaying.join().map_err(|_| StorageError::Codec("the replaying thread panicked".into()))??;
        Ok::<_, StorageError>((pending, replayed_in_full))
    })?;
    for (seq, entries) in &batches {
        report.entries += entries.len();
        report.next_seq = seq + 1;
    }
    report.entities = pending.len() + replayed_in_full;
    let replayed = started.elapsed();
    // Every batch of the tail is indexed now, and nothing is carried.
    store.meta.insert(journal::REDO_KEY, &report.next_seq.to_be_bytes())?;
    // With snapshots still to write, the tail stays: the first checkpoint
    // writes them and then drops it.
    if !pending.is_empty() {
        store.flush()?;
    } else if !batches.is_empty() {
        store.seen.persist()?;
        // What the checkpoint relies on is durable before it is written
        // (see the writer's checkpoint).
        store.flush()?;
        store.meta.insert(CHECKPOINT_KEY, &report.next_seq.to_be_bytes())?;
        for key in store.journal.range(..report.next_seq.to_be_bytes()).keys() {
            store.journal.remove(key?)?;
        }
        store.flush()?;
        crate::wal::trim(&store.journal_dir, report.next_seq, crate::storage::Pace::AtOnce, &|| false)?;
    }
    // The mappings go before the journal writer starts (see
    // `wal::read_file`).
    drop(batches);
    drop(tail);
    metrics.outbox_backlog.set(i64::try_from(store.outbox.len()).unwrap_or(i64::MAX));
    if 0 < report.entries {
        tracing::info!(
            batches = report.batches,
            entries = report.entries,
            entities = report.entities,
            elapsed_ms = started.elapsed().as_millis() as u64,
            read_ms = read.as_millis() as u64,
            index_ms = (indexed - read).as_millis() as u64,
            replay_ms = (replayed - indexed).as_millis() as u64,
            pending_snapshots = pending.len(),
            "recovered the journal tail"
        );
    }
    Ok((report, Recovered { pending: Mutex::new(pending) }))
}

/// The snapshots recovery found in the journal tail and has not written
/// yet: the last entry of every entity that journals its whole state.
/// Writing a million of them took most of a restart, so the node starts
/// with them in memory; an activation takes its entity's from here, and
/// [`Recovered::write_some`] writes the rest in the background. The
/// journal tail stays until the first checkpoint after they are all
/// written.
pub struct Recovered {
    /// By entity key (foldhash: a million of them are inserted while the
    /// node is not ready yet).
    pending: Mutex<FastMap<String, Snapshot>>,
}

impl Recovered {
    /// Nothing pending (for nodes built without recovery, such as tests').
    pub fn none() -> Self {
        Self { pending: Mutex::new(FastMap::default()) }
    }

    /// Hands `entity`'s pending snapshot to `activate` and forgets it once
    /// `activate` succeeded.
    pub fn take_with<T>(
        &self,
        entity: &str,
        activate: impl FnOnce(&Snapshot) -> StorageResult<T>,
    ) -> StorageResult<Option<T>> {
        let mut pending = self.pending.lock();
        let Some(snapshot) = pending.get(entity) else {
            return Ok(None);
        };
        let activated = activate(snapshot)?;
        pending.remove(entity);
        Ok(Some(activated))
    }

    /// Writes up to `count` pending snapshots to sled; returns how many it
    /// wrote and how many are left. Each is written before it leaves the
    /// map, under its lock, so an activation finds it in one place or the
    /// other.
    pub fn write_some(&self, store: &Store, count: usize) -> StorageResult<(usize, usize)> {
        let mut pending = self.pending.lock();
        let keys: Vec<String> = pending.keys().take(count).cloned().collect();
        for key in &keys {
            if let Some(snapshot) = pending.get(key) {
                store.snapshots.insert(key.as_bytes(), encode(snapshot))?;
            }
            pending.remove(key);
        }
        Ok((keys.len(), pending.len()))
    }

    pub fn is_empty(&self) -> bool {
        self.pending.lock().is_empty()
    }
}

/// Whether entries of `entity` (`tenant/kind/id`) carry its whole state.
/// Asked of every entry of the tail, twice: the kind is read as a prefix
/// of what follows the tenant, without looking for the slash after it
/// (with a `split`, a tenth of replaying a four-million-entry tail).
fn journals_state(entity: &str) -> StorageResult<bool> {
    let kinds = [
        ("customer/", CustomerEntity::JOURNALS_STATE),
        ("wheel/", WheelEntity::JOURNALS_STATE),
        ("jackpot/", JackpotEntity::JOURNALS_STATE),
        ("leaderboard/", LeaderboardEntity::JOURNALS_STATE),
    ];
    let rest = entity.split_once('/').map_or("", |(_, rest)| rest);
    kinds
        .iter()
        .find(|(kind, _)| rest.starts_with(kind))
        .map(|(_, journals)| *journals)
        .ok_or_else(|| StorageError::Codec(format!("journal entry for unknown entity {entity:?}")))
}

/// Brings the snapshot of an entity that journals changes up to the tail:
/// its stored snapshot, the entries after it replayed, written back.
fn replay<E: Entity>(store: &Store, entity: &str, changes: &[(u64, &[u8])]) -> StorageResult<()> {
    let (mut state, covered) = match store.snapshots.get(entity.as_bytes())? {
        Some(bytes) => {
            let snapshot: Snapshot = decode(&bytes)?;
            (decode::<E::State>(&snapshot.state)?, snapshot.entity_seq)
        }
        None => (E::State::default(), 0),
    };
    let newer: Vec<&[u8]> = changes.iter().filter(|(seq, _)| covered < *seq).map(|&(_, change)| change).collect();
    E::replay(&mut state, &newer)?;
    let entity_seq = changes.last().map_or(covered, |&(seq, _)| seq.max(covered));
    store.snapshots.insert(entity.as_bytes(), encode(&Snapshot { entity_seq, state: encode(&state) }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_indexes_again_the_messages_a_node_before_the_mark_may_have_left_carried() {
        use crate::journal::JournalEntry;
        use crate::outbox::OutboxMessage;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let id = |s: &str| bazaar_games::Id::parse(s).expect("id");
        let score = |n: usize| OutboxMessage::score("t", &id(&format!("e-{n}")), &id("top"), &id("c-1"), 1, 1);
        let cause = |n: usize| JournalEntry {
            entity: "t/customer/c-1".into(),
            entity_seq: n as u64 + 1,
            change: vec![1],
            seen: Some((format!("t/event/e-{n}").into_bytes().into(), vec![1].into())),
            outbox: vec![score(n).record()],
            audit: Vec::new(),
        };
        // A tail of 34 batches in the sled tree, as a node before the
        // segment files wrote them, each with one score no receiver
        // applied, and none in the `outbox` tree: that writer indexed a
        // batch's message in the commit 32 later, so only the last 33
        // batches' can be missing (the last commit's indexing may be lost
        // with the crash); the one before them was indexed by a commit the
        // tail shows durable.
        let batches = 34;
        for n in 0..batches {
            store.journal.insert((n as u64).to_be_bytes(), encode(&vec![cause(n)])).expect("insert");
        }
        let metrics = Metrics::new().expect("metrics");
        let (report, _) = recover(&store, &metrics).expect("recover");
        assert_eq!((report.batches, report.next_seq), (batches, batches as u64));
        assert!(store.outbox.get(score(0).storage_key()).expect("read").is_none(), "before the window");
        for n in 1..batches {
            assert!(store.outbox.get(score(n).storage_key()).expect("read").is_some(), "batch {n} indexed again");
            assert!(store.seen.get(format!("t/event/e-{n}")).expect("read").is_some());
        }
    }

    #[test]
    fn recovery_indexes_again_from_the_writers_mark_on() {
        use crate::journal::{JournalEntry, REDO_KEY};
        use crate::outbox::OutboxMessage;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let id = |s: &str| bazaar_games::Id::parse(s).expect("id");
        let score = |n: u64| OutboxMessage::score("t", &id(&format!("e-{n}")), &id("top"), &id("c-1"), 1, 1);
        let cause = |n: u64| JournalEntry {
            entity: "t/customer/c-1".into(),
            entity_seq: n + 1,
            change: vec![1],
            seen: Some((format!("t/event/e-{n}").into_bytes().into(), vec![1].into())),
            outbox: vec![score(n).record()],
            audit: Vec::new(),
        };
        // Sixty batches in the segments, each with a score no receiver
        // applied; the writer's last durable mark says batch 25 may still
        // have carried its messages, and none of the scores reached the
        // `outbox` tree (a crash took sled's last writes, or they were still
        // carried).
        let mut appender = crate::wal::Appender::open(&store.journal_dir, 0).expect("open");
        for n in 0..60 {
            let mut record = Vec::new();
            crate::wal::begin_record(&mut record);
            crate::storage::encode_into(&mut record, &vec![cause(n)]);
            crate::wal::seal_record(&mut record, n).expect("sealed");
            appender.append(n, &record).expect("append");
        }
        appender.sync().expect("sync");
        store.meta.insert(REDO_KEY, &25u64.to_be_bytes()).expect("insert");
        let metrics = Metrics::new().expect("metrics");
        let (report, _) = recover(&store, &metrics).expect("recover");
        assert_eq!((report.batches, report.next_seq), (60, 60));
        // The messages of the batches before the mark were applied or
        // indexed by then: not written again; every later one is.
        let first = 25;
        for n in 0..60 {
            let indexed = store.outbox.get(score(n).storage_key()).expect("read").is_some();
            assert_eq!(indexed, first <= n, "batch {n}");
            assert!(store.seen.get(format!("t/event/e-{n}")).expect("read").is_some(), "batch {n}");
        }
        assert_eq!(crate::journal::read_redo_from(&store, 59).expect("read"), 60, "nothing left to redo");
    }

    #[test]
    fn a_pending_snapshot_is_taken_by_its_activation_or_written_never_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let snapshot = |n: u64| Snapshot { entity_seq: n, state: vec![n as u8] };
        let pending = (0..5).map(|n| (format!("t/customer/c-{n}"), snapshot(n))).collect();
        let recovered = Recovered { pending: Mutex::new(pending) };
        // A failed activation leaves the snapshot pending.
        let failed = recovered.take_with("t/customer/c-1", |_| Err::<(), _>(StorageError::Codec("bad".into())));
        assert!(failed.is_err());
        let taken = recovered.take_with("t/customer/c-1", |s| Ok(s.entity_seq)).expect("taken");
        assert_eq!(taken, Some(1));
        assert_eq!(recovered.take_with("t/customer/c-1", |s| Ok(s.entity_seq)).expect("gone"), None);
        assert_eq!(recovered.write_some(&store, 3).expect("written"), (3, 1));
        assert_eq!(recovered.write_some(&store, 3).expect("written"), (1, 0));
        assert_eq!(recovered.write_some(&store, 3).expect("written"), (0, 0));
        assert!(recovered.is_empty());
        // The one an activation took is not written behind its back.
        assert!(store.snapshots.get("t/customer/c-1").expect("read").is_none());
        for n in [0, 2, 3, 4] {
            let stored: Snapshot =
                decode(&store.snapshots.get(format!("t/customer/c-{n}")).expect("read").expect("written"))
                    .expect("decode");
            assert_eq!(stored.entity_seq, n);
        }
    }
}
