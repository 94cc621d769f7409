//! Start-up recovery: bring snapshots and indexes up to the journal's end.
//!
//! The journal holds every acknowledged entry since the last checkpoint. At
//! start-up, before the node takes requests, each batch after the
//! checkpoint is read once: its derived indexes (seen ids, outbox, audit)
//! are written again (they may have been lost with the crash), and each
//! entity that has entries there gets its snapshot, the entries after it
//! replayed, and a new snapshot. Then the checkpoint moves to the end and
//! the replayed batches are dropped. The tail is bounded by the checkpoint
//! interval, so recovery time is too; activations afterwards only read a
//! snapshot.
//!
//! Writes go in the order snapshots, checkpoint, deletions, and are flushed
//! once: sled persists writes in order, so a crash during recovery leaves
//! either the old checkpoint (and recovery runs again) or the new one with
//! every snapshot it relies on.

use crate::actor::Entity;
use crate::entities::{CustomerEntity, JackpotEntity, LeaderboardEntity, WheelEntity};
use crate::journal::{self, Snapshot, CHECKPOINT_KEY};
use crate::storage::{decode, encode, StorageError, StorageResult, Store};
use bazaar_observability::Metrics;
use std::collections::BTreeMap;
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

pub fn recover(store: &Store, metrics: &Metrics) -> StorageResult<RecoveryReport> {
    let started = Instant::now();
    let (checkpoint, batches) = journal::read_tail(store)?;
    let mut report = RecoveryReport { next_seq: checkpoint, batches: batches.len(), entries: 0, entities: 0 };
    let mut tails: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    let mut indexer = journal::Indexer::default();
    for (seq, entries) in &batches {
        indexer.before_flush(store, entries)?;
        indexer.after_flush(store, entries)?;
        report.entries += entries.len();
        report.next_seq = seq + 1;
        for entry in entries {
            tails.entry(entry.entity.clone()).or_default().push((entry.entity_seq, entry.change.clone()));
        }
    }
    indexer.finish(store)?;
    report.entities = tails.len();
    for (entity, changes) in &tails {
        match entity.split('/').nth(1) {
            Some("customer") => replay::<CustomerEntity>(store, entity, changes)?,
            Some("wheel") => replay::<WheelEntity>(store, entity, changes)?,
            Some("jackpot") => replay::<JackpotEntity>(store, entity, changes)?,
            Some("leaderboard") => replay::<LeaderboardEntity>(store, entity, changes)?,
            _ => return Err(StorageError::Codec(format!("journal entry for unknown entity {entity:?}"))),
        }
    }
    if !batches.is_empty() {
        store.meta.insert(CHECKPOINT_KEY, &report.next_seq.to_be_bytes())?;
        for (seq, _) in &batches {
            store.journal.remove(seq.to_be_bytes())?;
        }
        store.flush()?;
    }
    metrics.outbox_backlog.set(i64::try_from(store.outbox.len()).unwrap_or(i64::MAX));
    if 0 < report.entries {
        tracing::info!(
            batches = report.batches,
            entries = report.entries,
            entities = report.entities,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered the journal tail"
        );
    }
    Ok(report)
}

fn replay<E: Entity>(store: &Store, entity: &str, changes: &[(u64, Vec<u8>)]) -> StorageResult<()> {
    let (mut state, mut covered) = match store.snapshots.get(entity.as_bytes())? {
        Some(bytes) => {
            let snapshot: Snapshot = decode(&bytes)?;
            (decode::<E::State>(&snapshot.state)?, snapshot.entity_seq)
        }
        None => (E::State::default(), 0),
    };
    for (entity_seq, change) in changes {
        if covered < *entity_seq {
            E::replay(&mut state, change)?;
            covered = *entity_seq;
        }
    }
    let snapshot = Snapshot { entity_seq: covered, state: encode(&state) };
    store.snapshots.insert(entity.as_bytes(), encode(&snapshot))?;
    Ok(())
}
