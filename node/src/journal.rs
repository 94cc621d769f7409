//! The journal writer: group commit of every entry that arrived since the
//! last flush, as one sled value, with one flush.
//!
//! Actors never wait for it. An actor applies a message, hands the entry to
//! [`Journal::submit`] and gets a [`Ticket`] back at once; whoever answers
//! the client waits with [`Journal::durable`] until the writer has flushed
//! that ticket. Tickets are handed out under the same lock that queues the
//! entry, so the journal's order is the tickets' order, and "ticket `t` is
//! durable" means every ticket up to `t` is.
//!
//! The writer is one OS thread (flushing blocks), looping:
//! 1. take every queued operation;
//! 2. append all entries as one `journal` value (key: batch sequence), write
//!    the queued snapshots, delete acknowledged outbox messages;
//! 3. flush once;
//! 4. write the indexes derived from the entries (seen ids, outbox, audit):
//!    in sled's memory at once, durable with the next flush, and rebuilt
//!    from the journal by recovery if the node dies first;
//! 5. publish the durable ticket and release whoever waited.
//!
//! If a flush fails the writer stops and the node answers 503 from then on:
//! actors may hold state the disk does not, and only a restart (recovery
//! from the journal) makes the two agree again.

use crate::storage::{decode, encode, StorageError, StorageResult, Store};
use bazaar_observability::Metrics;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, watch};

/// A position in the journal's order; durable once the writer says so.
pub type Ticket = u64;

/// A key and a value for one of the derived trees.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One applied message of one entity: what changed, what it answered (for
/// idempotency), what it causes elsewhere, and what the audit keeps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalEntry {
    /// `tenant/kind/id`.
    pub entity: String,
    /// This entity's own counter of entries: replay applies the entries
    /// after the one its snapshot covers.
    pub entity_seq: u64,
    /// The entity's change: its new state, or an operation (leaderboards).
    pub change: Vec<u8>,
    /// The idempotency record (`seen` tree).
    pub seen: Option<KeyValue>,
    /// Cross-entity messages (`outbox` tree) until acknowledged.
    pub outbox: Vec<KeyValue>,
    /// Draws and hits (`audit` tree).
    pub audit: Vec<KeyValue>,
}

/// A snapshot as stored: the state and the entity sequence it covers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub entity_seq: u64,
    pub state: Vec<u8>,
}

/// Where the writer stands, as published to waiters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durability {
    pub ticket: Ticket,
    pub failed: bool,
}

enum Op {
    Entry(JournalEntry),
    Snapshot {
        key: Vec<u8>,
        value: Vec<u8>,
        done: Option<oneshot::Sender<()>>,
    },
    OutboxAck(Vec<u8>),
    /// Reply with the sequence number the next batch will get.
    Marker(oneshot::Sender<u64>),
    /// Every batch below `upto` is covered by snapshots: drop it.
    Checkpoint {
        upto: u64,
        done: oneshot::Sender<()>,
    },
}

struct Queue {
    next_ticket: Ticket,
    ops: Vec<(Ticket, Op)>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    durable: watch::Sender<Durability>,
}

/// The handle actors and services use; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

/// The key under `meta` of the first batch not yet covered by snapshots.
pub const CHECKPOINT_KEY: &[u8] = b"journal_checkpoint";

impl Journal {
    /// Starts the writer thread, appending from batch `next_seq` on.
    pub fn start(store: Store, metrics: Arc<Metrics>, next_seq: u64) -> (Self, std::thread::JoinHandle<()>) {
        let (durable, _) = watch::channel(Durability { ticket: 0, failed: false });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { next_ticket: 1, ops: Vec::new(), closed: false }),
            wake: Condvar::new(),
            durable,
        });
        let writer = Writer { store, metrics, shared: shared.clone(), next_seq };
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .expect("the OS can start one thread at start-up");
        (Self { shared }, thread)
    }

    fn push(&self, op: Op) -> Result<Ticket, StorageError> {
        let mut queue = self.shared.queue.lock();
        if queue.closed || self.shared.durable.borrow().failed {
            return Err(StorageError::Unavailable(
                "the node's journal is closed: the node is stopping or its storage failed".into(),
            ));
        }
        let ticket = queue.next_ticket;
        if matches!(op, Op::Entry(_)) {
            queue.next_ticket += 1;
        }
        queue.ops.push((ticket, op));
        drop(queue);
        self.shared.wake.notify_one();
        Ok(ticket)
    }

    /// Queues an entry; it is durable once [`Journal::durable`] says so.
    pub fn submit(&self, entry: JournalEntry) -> StorageResult<Ticket> {
        self.push(Op::Entry(entry))
    }

    /// Queues a snapshot; the receiver fires once it is written (after every
    /// entry queued before it).
    pub fn snapshot(&self, key: Vec<u8>, snapshot: &Snapshot) -> StorageResult<oneshot::Receiver<()>> {
        let (done, written) = oneshot::channel();
        self.push(Op::Snapshot { key, value: encode(snapshot), done: Some(done) })?;
        Ok(written)
    }

    /// Queues the deletion of an acknowledged outbox message.
    pub fn outbox_ack(&self, key: Vec<u8>) -> StorageResult<()> {
        self.push(Op::OutboxAck(key)).map(|_| ())
    }

    /// The sequence number the next batch will get.
    pub async fn marker(&self) -> StorageResult<u64> {
        let (reply, answer) = oneshot::channel();
        self.push(Op::Marker(reply))?;
        answer.await.map_err(|_| writer_gone())
    }

    /// Drops the journal below `upto`; the caller guarantees that snapshots
    /// cover every entry there.
    pub async fn checkpoint(&self, upto: u64) -> StorageResult<()> {
        let (done, finished) = oneshot::channel();
        self.push(Op::Checkpoint { upto, done })?;
        finished.await.map_err(|_| writer_gone())
    }

    /// Waits until `ticket` is durable.
    pub async fn durable(&self, ticket: Ticket) -> StorageResult<()> {
        let mut receiver = self.shared.durable.subscribe();
        let state = receiver.wait_for(|d| ticket <= d.ticket || d.failed).await.map_err(|_| writer_gone())?;
        if ticket <= state.ticket {
            Ok(())
        } else {
            Err(StorageError::Unavailable("the node's storage failed; retry on another node or after a restart".into()))
        }
    }

    /// The last durable ticket.
    pub fn durable_ticket(&self) -> Ticket {
        self.shared.durable.borrow().ticket
    }

    /// Whether the writer has stopped after a failed flush.
    pub fn failed(&self) -> bool {
        self.shared.durable.borrow().failed
    }

    /// Refuses new operations; the writer drains the queue, flushes and
    /// exits.
    pub fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

fn writer_gone() -> StorageError {
    StorageError::Unavailable("the journal writer has stopped".into())
}

struct Writer {
    store: Store,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    next_seq: u64,
}

impl Writer {
    fn run(mut self) {
        loop {
            let ops = {
                let mut queue = self.shared.queue.lock();
                while queue.ops.is_empty() && !queue.closed {
                    self.shared.wake.wait(&mut queue);
                }
                if queue.ops.is_empty() {
                    break;
                }
                std::mem::take(&mut queue.ops)
            };
            if let Err(error) = self.commit(ops) {
                tracing::error!(%error, "journal commit failed; the node stops accepting writes");
                self.shared.durable.send_modify(|d| d.failed = true);
                return;
            }
        }
        if let Err(error) = self.store.flush() {
            tracing::error!(%error, "final journal flush failed");
        }
    }

    fn commit(&mut self, ops: Vec<(Ticket, Op)>) -> StorageResult<()> {
        let started = Instant::now();
        let mut entries = Vec::new();
        let mut last_ticket = None;
        let mut after_flush = Vec::new();
        for (ticket, op) in ops {
            match op {
                Op::Entry(entry) => {
                    entries.push(entry);
                    last_ticket = Some(ticket);
                }
                Op::Snapshot { key, value, done } => {
                    self.store.snapshots.insert(key, value)?;
                    after_flush.push(AfterFlush::Done(done));
                }
                Op::OutboxAck(key) => {
                    if self.store.outbox.remove(key)?.is_some() {
                        self.metrics.outbox_backlog.dec();
                    }
                }
                Op::Marker(reply) => after_flush.push(AfterFlush::Marker(reply)),
                Op::Checkpoint { upto, done } => {
                    self.store.meta.insert(CHECKPOINT_KEY, &upto.to_be_bytes())?;
                    for old in self.store.journal.range(..upto.to_be_bytes()).keys() {
                        self.store.journal.remove(old?)?;
                    }
                    after_flush.push(AfterFlush::Done(Some(done)));
                }
            }
        }
        if !entries.is_empty() {
            self.store.journal.insert(self.next_seq.to_be_bytes(), encode(&entries))?;
            self.next_seq += 1;
        }
        self.store.flush()?;
        if !entries.is_empty() {
            self.metrics.journal_flush_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.journal_batch_entries.observe(entries.len() as f64);
        }
        let indexed = index(&self.store, &entries)?;
        self.metrics.outbox_backlog.add(indexed);
        if let Some(ticket) = last_ticket {
            self.shared.durable.send_modify(|d| d.ticket = ticket);
        }
        for action in after_flush {
            match action {
                AfterFlush::Done(Some(done)) => {
                    let _ = done.send(());
                }
                AfterFlush::Done(None) => {}
                AfterFlush::Marker(reply) => {
                    let _ = reply.send(self.next_seq);
                }
            }
        }
        Ok(())
    }
}

enum AfterFlush {
    Done(Option<oneshot::Sender<()>>),
    Marker(oneshot::Sender<u64>),
}

/// Writes the derived indexes of `entries`; returns how many outbox
/// messages it added.
///
/// An outbox message whose receiver applied it in this same batch (the
/// receiver's idempotency record for the message is here too) is durable
/// together with its cause: no crash can separate them, so it can never
/// need redelivery and is not indexed. With inline delivery that is most
/// messages, which saves an insert and a delete per message.
pub fn index(store: &Store, entries: &[JournalEntry]) -> StorageResult<i64> {
    let applied: std::collections::HashSet<&[u8]> =
        entries.iter().filter_map(|entry| entry.seen.as_ref()).map(|(key, _)| key.as_slice()).collect();
    let mut outbox_added = 0;
    for entry in entries {
        if let Some((key, value)) = &entry.seen {
            store.seen.insert(key.as_slice(), value.as_slice())?;
        }
        for (key, value) in &entry.outbox {
            if crate::outbox::receipt_key(key).is_some_and(|receipt| applied.contains(receipt.as_slice())) {
                continue;
            }
            if store.outbox.insert(key.as_slice(), value.as_slice())?.is_none() {
                outbox_added += 1;
            }
        }
        for (key, value) in &entry.audit {
            store.audit.insert(key.as_slice(), value.as_slice())?;
        }
    }
    Ok(outbox_added)
}

/// One group commit: its sequence number and entries.
pub type Batch = (u64, Vec<JournalEntry>);

/// Reads the checkpoint and every batch from it on, in order.
pub fn read_tail(store: &Store) -> StorageResult<(u64, Vec<Batch>)> {
    let checkpoint = match store.meta.get(CHECKPOINT_KEY)? {
        Some(bytes) => u64::from_be_bytes(
            bytes.as_ref().try_into().map_err(|_| StorageError::Codec("journal checkpoint is not 8 bytes".into()))?,
        ),
        None => 0,
    };
    let mut batches = Vec::new();
    for item in store.journal.range(checkpoint.to_be_bytes()..) {
        let (key, value) = item?;
        let seq = u64::from_be_bytes(
            key.as_ref().try_into().map_err(|_| StorageError::Codec("journal key is not 8 bytes".into()))?,
        );
        batches.push((seq, decode::<Vec<JournalEntry>>(&value)?));
    }
    Ok((checkpoint, batches))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> JournalEntry {
        JournalEntry {
            entity: format!("t/customer/c-{n}"),
            entity_seq: n,
            change: vec![n as u8],
            seen: Some((format!("t/event/e-{n}").into_bytes(), vec![1])),
            outbox: vec![(format!("t/m-{n}").into_bytes(), vec![2])],
            audit: Vec::new(),
        }
    }

    #[test]
    fn messages_applied_in_the_same_batch_are_not_indexed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let cause = entry(1);
        let mut receiver = entry(2);
        // The receiver of the cause's message applied it: its record is here.
        receiver.seen = Some((b"t/msg/m-1".to_vec(), vec![1]));
        receiver.outbox.clear();
        assert_eq!(index(&store, &[cause.clone(), receiver]).expect("indexed"), 0);
        assert!(store.outbox.get(b"t/m-1").expect("read").is_none());
        // Alone, the message waits in the outbox for its receiver.
        assert_eq!(index(&store, &[cause]).expect("indexed"), 1);
        assert!(store.outbox.get(b"t/m-1").expect("read").is_some());
    }

    #[tokio::test]
    async fn entries_are_durable_and_indexed_before_their_ticket_is_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (journal, thread) = Journal::start(store.clone(), metrics.clone(), 0);
        let tickets: Vec<Ticket> = (0..50).map(|n| journal.submit(entry(n)).expect("open")).collect();
        assert_eq!(tickets, (1..=50).collect::<Vec<_>>());
        journal.durable(50).await.expect("durable");
        assert!(store.seen.get(b"t/event/e-49").expect("read").is_some());
        assert_eq!(metrics.outbox_backlog.get(), 50);
        journal.outbox_ack(b"t/m-3".to_vec()).expect("open");
        let marker = journal.marker().await.expect("marker");
        assert_eq!(metrics.outbox_backlog.get(), 49);
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!(checkpoint, 0);
        let replayed: usize = batches.iter().map(|(_, entries)| entries.len()).sum();
        assert_eq!(replayed, 50);
        journal.checkpoint(marker).await.expect("checkpoint");
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!((checkpoint, batches.len()), (marker, 0));
        journal.close();
        thread.join().expect("writer exits cleanly");
        assert!(journal.submit(entry(99)).is_err(), "closed journal refuses entries");
    }
}
