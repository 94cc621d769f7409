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
//! 2. append all entries as one `journal` batch (key: batch sequence, then
//!    part: see [`PART_BYTES`]),
//!    delete acknowledged outbox messages, index the outbox messages
//!    earlier batches left undelivered for [`CARRY_COMMITS`] commits (see
//!    [`Indexer`]), and do some
//!    background work: write queued snapshots, move the checkpoint once the
//!    snapshots queued before it are written, delete batches below it.
//!    While entries come in, background work takes at most a tenth of the
//!    writer's time, so a checkpoint's hundred thousand snapshots do not
//!    hold answers up;
//! 3. flush once, on a thread of its own ([`Flusher`]), and meanwhile
//! 4. write the indexes derived from the entries: the audit, in sled's
//!    memory at once and durable with this flush or the next, and the
//!    seen ids, in the [`crate::seen`] index's memtable, durable once a
//!    run holds them; recovery rebuilds both from the journal if the node
//!    dies first;
//! 5. once both are done, publish the durable ticket and release whoever
//!    waited.
//!
//! If a flush fails the writer stops and the node answers 503 from then on:
//! actors may hold state the disk does not, and only a restart (recovery
//! from the journal) makes the two agree again.

use crate::storage::{decode, encode, StorageError, StorageResult, Store};
use crate::{FastMap, FastSet};
use bazaar_observability::Metrics;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
    /// The idempotency record (`seen` tree).
    #[serde(with = "crate::storage::byte_pairs::option")]
    pub seen: Option<KeyValue>,
    /// Cross-entity messages (`outbox` tree) until acknowledged.
    #[serde(with = "crate::storage::byte_pairs")]
    pub outbox: Vec<KeyValue>,
    /// Draws and hits (`audit` tree).
    #[serde(with = "crate::storage::byte_pairs")]
    pub audit: Vec<KeyValue>,
}

/// A snapshot as stored: the state and the entity sequence it covers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub entity_seq: u64,
    #[serde(with = "serde_bytes")]
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
    /// A snapshot to write (none: only wait for those queued before).
    Snapshot {
        write: Option<KeyValue>,
        done: Option<oneshot::Sender<()>>,
    },
    /// Acknowledged outbox messages: out of the `outbox` tree if there.
    OutboxAck(Vec<Vec<u8>>),
    /// Index every carried outbox message now; reply once flushed.
    Settle(oneshot::Sender<()>),
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
    /// Snapshots the writer holds and has not written yet.
    snapshot_backlog: AtomicUsize,
}

impl Shared {
    fn new() -> Arc<Self> {
        let (durable, _) = watch::channel(Durability { ticket: 0, failed: false });
        Arc::new(Shared {
            queue: Mutex::new(Queue { next_ticket: 1, ops: Vec::new(), closed: false }),
            wake: Condvar::new(),
            durable,
            snapshot_backlog: AtomicUsize::new(0),
        })
    }
}

/// The handle actors and services use; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    seen: crate::seen::SeenIndex,
}

/// The key under `meta` of the first batch not yet covered by snapshots.
pub const CHECKPOINT_KEY: &[u8] = b"journal_checkpoint";

impl Journal {
    /// Starts the writer thread, appending from batch `next_seq` on.
    /// `patience`: once the last checkpoint moved this long ago, background
    /// work is no longer paced, so that a checkpoint under sustained load
    /// ends and the journal tail (recovery's work) stays bounded.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        next_seq: u64,
        patience: Duration,
    ) -> StorageResult<(Self, std::thread::JoinHandle<()>)> {
        let shared = Shared::new();
        let seen = store.seen.clone();
        let writer = Writer::new(store, metrics, shared.clone(), next_seq, patience)?;
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .expect("the OS can start one thread at start-up");
        Ok((Self { shared, seen }, thread))
    }

    fn push(&self, op: Op) -> Result<Ticket, StorageError> {
        self.push_then(op, |_| ())
    }

    /// Queues `op`, calling `queued` with its ticket before the writer can
    /// take it.
    fn push_then(&self, op: Op, queued: impl FnOnce(Ticket)) -> Result<Ticket, StorageError> {
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
        queued(ticket);
        queue.ops.push((ticket, op));
        drop(queue);
        self.shared.wake.notify_one();
        Ok(ticket)
    }

    /// Queues an entry; it is durable once [`Journal::durable`] says so.
    /// Its idempotency record is pending in the [`crate::seen`] index from
    /// now until then.
    pub fn submit(&self, entry: JournalEntry) -> StorageResult<Ticket> {
        let held = entry.seen.clone().map(|(key, value)| self.seen.prepare(key, value));
        self.push_then(Op::Entry(entry), |ticket| {
            if let Some(record) = held {
                // Before the writer can see the entry, so its release
                // comes after.
                self.seen.hold(record, ticket);
            }
        })
    }

    /// Queues a snapshot; the receiver fires once it is written (after every
    /// entry queued before it).
    pub fn snapshot(&self, key: Vec<u8>, snapshot: &Snapshot) -> StorageResult<oneshot::Receiver<()>> {
        let (done, written) = oneshot::channel();
        self.push(Op::Snapshot { write: Some((key, encode(snapshot))), done: Some(done) })?;
        Ok(written)
    }

    /// The receiver fires once every snapshot queued so far is written.
    pub fn snapshots_written(&self) -> StorageResult<oneshot::Receiver<()>> {
        let (done, written) = oneshot::channel();
        self.push(Op::Snapshot { write: None, done: Some(done) })?;
        Ok(written)
    }

    /// Queues the deletion of acknowledged outbox messages (by their
    /// `outbox` keys), in one operation however many.
    pub fn outbox_ack(&self, keys: Vec<Vec<u8>>) -> StorageResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.push(Op::OutboxAck(keys)).map(|_| ())
    }

    /// Writes every outbox message still carried in memory (see
    /// [`Indexer`]) to the `outbox` tree; returns once that is durable.
    pub async fn settle(&self) -> StorageResult<()> {
        let (reply, answer) = oneshot::channel();
        self.push(Op::Settle(reply))?;
        answer.await.map_err(|_| writer_gone())
    }

    /// The sequence number the next batch will get.
    pub async fn marker(&self) -> StorageResult<u64> {
        let (reply, answer) = oneshot::channel();
        self.push(Op::Marker(reply))?;
        answer.await.map_err(|_| writer_gone())
    }

    /// Drops the journal below `upto`; the caller guarantees that snapshots
    /// cover every entry there. The idempotency records of those entries
    /// are written as runs first (see [`crate::seen`]).
    pub async fn checkpoint(&self, upto: u64) -> StorageResult<()> {
        let seen = self.seen.clone();
        tokio::task::spawn_blocking(move || seen.persist())
            .await
            .map_err(|e| StorageError::Unavailable(format!("writing the seen index: {e}")))??;
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

    /// Whether the writer holds more than a commit's slice of snapshots
    /// not written yet (after a checkpoint's request): an actor that
    /// passivated now would wait for them all, its mailbox closed.
    pub fn snapshots_waiting(&self) -> bool {
        SNAPSHOT_SLICE <= self.shared.snapshot_backlog.load(Ordering::Relaxed)
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
    flusher: Flusher,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    next_seq: u64,
    indexer: Indexer,
    /// Batches below this are covered by snapshots and go, a slice per
    /// commit ([`TRIM_SLICE`]).
    trim_below: u64,
    /// Snapshots not written yet, in the order they came; a slice goes per
    /// commit ([`SNAPSHOT_SLICE`]).
    snapshots: VecDeque<QueuedSnapshot>,
    /// How many snapshots (and barriers) were ever written.
    popped: u64,
    /// Checkpoints waiting for the snapshots queued before them: the
    /// checkpoint, how many had been queued when it came, its waiter.
    checkpoints: Vec<(u64, u64, oneshot::Sender<()>)>,
    /// Set once the journal is closed: nothing is paced any more.
    closing: bool,
    /// Nor once the checkpoint last moved longer than `patience` ago.
    patience: Duration,
    checkpointed_at: Instant,
    /// When the last commit with entries began.
    last_entries: Instant,
    /// Time the writer may still spend on background work while busy, and
    /// when it was last added to.
    credit: Duration,
    credited: Instant,
}

/// What one commit may spend on background work.
struct Budget {
    paced: bool,
    began: Instant,
    credit: Duration,
}

impl Budget {
    fn spent(&self) -> bool {
        self.paced && self.credit <= self.began.elapsed()
    }

    fn left(&self) -> Duration {
        self.credit.saturating_sub(self.began.elapsed())
    }
}

struct QueuedSnapshot {
    write: Option<KeyValue>,
    done: Option<oneshot::Sender<()>>,
}

/// Old batches deleted per commit. A checkpoint after 30 s at ten thousand
/// events a second leaves tens of thousands of them; deleted in one commit,
/// they held every answer up for half a second.
const TRIM_SLICE: usize = 256;

/// Snapshots written per commit at most. A checkpoint asks every changed
/// actor for one: a hundred thousand of them written in one commit held
/// every answer up for a second.
const SNAPSHOT_SLICE: usize = 256;

/// While entries come in, background work (snapshots, deleting old
/// batches) may take one part in this many of the writer's time. At full
/// speed, a checkpoint's hundred thousand snapshots took a core for two
/// seconds and deleting the batches they covered took the writer for
/// another, and on two cores answers waited up to a second behind them.
const BACKGROUND_SHARE: u32 = 10;

/// The most background time the writer saves up: a busy commit spends at
/// most this on it.
const MAX_BACKGROUND_CREDIT: Duration = Duration::from_millis(2);

/// Entries committed this recently mean the node is busy.
const BUSY_WITHIN: Duration = Duration::from_millis(100);

/// How long a busy writer with only background work left waits for its
/// share to grow (or for entries).
const BACKGROUND_PACE: Duration = Duration::from_millis(1);

impl Writer {
    fn new(
        store: Store,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        next_seq: u64,
        patience: Duration,
    ) -> StorageResult<Self> {
        // Batches below the checkpoint that a crash left undeleted go
        // first, a slice at a time.
        let trim_below = read_checkpoint(&store)?;
        Ok(Writer {
            indexer: Indexer::writing(&store)?,
            flusher: Flusher::start(store.clone())?,
            store,
            metrics,
            shared,
            next_seq,
            trim_below,
            snapshots: VecDeque::new(),
            popped: 0,
            checkpoints: Vec::new(),
            closing: false,
            patience,
            checkpointed_at: Instant::now(),
            last_entries: Instant::now(),
            credit: Duration::ZERO,
            credited: Instant::now(),
        })
    }

    fn run(mut self) {
        loop {
            let ops = {
                let mut queue = self.shared.queue.lock();
                self.closing = queue.closed;
                while queue.ops.is_empty() && !queue.closed {
                    if self.snapshots.is_empty() && !self.trimming() {
                        self.shared.wake.wait(&mut queue);
                    } else if !self.paced(Instant::now())
                        || self.shared.wake.wait_for(&mut queue, BACKGROUND_PACE).timed_out()
                    {
                        break;
                    }
                }
                if queue.ops.is_empty() && queue.closed && self.snapshots.is_empty() && self.checkpoints.is_empty() {
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
        match self.indexer.finish(&self.store) {
            Ok(added) => self.metrics.outbox_backlog.add(added),
            Err(error) => tracing::error!(%error, "indexing the last outbox messages failed; recovery will"),
        }
        if let Err(error) = self.store.flush() {
            tracing::error!(%error, "final journal flush failed");
        }
    }

    /// Whether old batches are left to delete.
    fn trimming(&self) -> bool {
        0 < self.trim_below
    }

    /// Whether background work is paced: entries are coming in, the
    /// journal is open, and the last checkpoint is recent enough.
    fn paced(&self, now: Instant) -> bool {
        !self.closing
            && now.saturating_duration_since(self.last_entries) < BUSY_WITHIN
            && now.saturating_duration_since(self.checkpointed_at) < self.patience
    }

    /// How much background work (snapshots, then deleting old batches)
    /// this commit may do: a slice of each while the node is quiet; while
    /// entries come in, only what the writer's share for it allows
    /// ([`BACKGROUND_SHARE`]).
    fn background_budget(&mut self, started: Instant) -> Budget {
        let since = started.saturating_duration_since(self.credited);
        self.credited = started;
        self.credit = (self.credit + since / BACKGROUND_SHARE).min(MAX_BACKGROUND_CREDIT);
        Budget { paced: self.paced(started), began: Instant::now(), credit: self.credit }
    }

    /// Writes queued snapshots, in order, as far as `budget` allows (a
    /// barrier costs nothing).
    fn write_snapshots(&mut self, budget: &Budget, after_flush: &mut Vec<AfterFlush>) -> StorageResult<()> {
        let mut written = 0;
        while written < SNAPSHOT_SLICE && !budget.spent() {
            let Some(snapshot) = self.snapshots.pop_front() else { break };
            self.popped += 1;
            if let Some((key, value)) = snapshot.write {
                self.store.snapshots.insert(key, value)?;
                written += 1;
            }
            after_flush.push(AfterFlush::Done(snapshot.done));
        }
        Ok(())
    }

    /// Deletes batches below the checkpoint, as far as `budget` allows.
    fn trim(&mut self, budget: &Budget) -> StorageResult<()> {
        if !self.trimming() {
            return Ok(());
        }
        for (deleted, key) in self.store.journal.range(..self.trim_below.to_be_bytes()).keys().enumerate() {
            if TRIM_SLICE <= deleted || budget.spent() {
                return Ok(());
            }
            self.store.journal.remove(key?)?;
        }
        self.trim_below = 0;
        Ok(())
    }

    fn commit(&mut self, ops: Vec<(Ticket, Op)>) -> StorageResult<()> {
        let started = Instant::now();
        let mut entries = Vec::new();
        let mut settle = false;
        let mut last_ticket = None;
        let mut after_flush = Vec::new();
        for (ticket, op) in ops {
            match op {
                Op::Entry(entry) => {
                    entries.push(entry);
                    last_ticket = Some(ticket);
                }
                Op::Snapshot { write, done } => {
                    self.snapshots.push_back(QueuedSnapshot { write, done });
                }
                Op::OutboxAck(keys) => {
                    for key in keys {
                        if self.indexer.acknowledge(&self.store, &key)? {
                            self.metrics.outbox_backlog.dec();
                        }
                    }
                }
                Op::Marker(reply) => after_flush.push(AfterFlush::Marker(reply)),
                Op::Settle(reply) => {
                    settle = true;
                    after_flush.push(AfterFlush::Done(Some(reply)));
                }
                Op::Checkpoint { upto, done } => {
                    let queued = self.popped + self.snapshots.len() as u64;
                    self.checkpoints.push((upto, queued, done));
                }
            }
        }
        // sled persists writes in the order they are made, so they go in
        // the order that keeps every prefix consistent: the entries, the
        // snapshots (which may cover these entries), the outbox messages
        // carried from earlier batches, then the checkpoint (which relies on
        // the snapshots queued before it and may drop the carried messages'
        // batches).
        if !entries.is_empty() {
            for (part, entries) in parts(&entries).enumerate() {
                self.store.journal.insert(part_key(self.next_seq, part)?, encode(entries))?;
            }
            self.next_seq += 1;
            self.last_entries = started;
        }
        let budget = self.background_budget(started);
        self.write_snapshots(&budget, &mut after_flush)?;
        // A checkpoint moves once every snapshot queued before it is
        // written (not every snapshot queued since: under load those never
        // stop coming).
        let popped = self.popped;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.checkpoints).into_iter().partition(|(_, queued, _)| *queued <= popped);
        self.checkpoints = waiting;
        let checkpoint = ready.iter().map(|(upto, _, _)| *upto).max();
        after_flush.extend(ready.into_iter().map(|(_, _, done)| AfterFlush::Checkpointed(done)));
        // Carried messages wait for commits with entries (up to
        // CARRY_COMMITS of them), but never past a checkpoint or a request
        // to settle them. (They may go after the snapshots: only the
        // checkpoint, which drops their batches, relies on them.)
        let indexed = match (entries.is_empty(), checkpoint.is_some() || settle) {
            (true, false) => 0,
            (_, all) => self.indexer.before_flush(&self.store, &entries, all)?,
        };
        if let Some(upto) = checkpoint {
            // Recovery reads from the checkpoint on: the batches below it are
            // garbage from now on, deleted a slice per commit.
            self.store.meta.insert(CHECKPOINT_KEY, &upto.to_be_bytes())?;
            self.trim_below = self.trim_below.max(upto);
            self.checkpointed_at = started;
        }
        self.trim(&budget)?;
        self.credit = budget.left();
        self.shared.snapshot_backlog.store(self.snapshots.len(), Ordering::Relaxed);
        // The derived indexes go while the flush runs: the writer's CPU work
        // and the disk's wait overlap instead of adding up (under batched
        // load the indexing had been about 40 % of a commit). Whatever of
        // them the flush misses is durable with the next, and a crash before
        // that loses only what recovery rebuilds from this batch.
        self.flusher.begin()?;
        let derived = self.indexer.index_derived(&self.store, self.next_seq.saturating_sub(1), &entries);
        self.flusher.finish()?;
        let indexed = indexed + derived?;
        if !entries.is_empty() {
            self.metrics.journal_flush_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.journal_batch_entries.observe(entries.len() as f64);
        }
        self.metrics.outbox_backlog.add(indexed);
        if let Some(ticket) = last_ticket {
            self.shared.durable.send_modify(|d| d.ticket = ticket);
            // Durable and indexed (see `index_derived`): a retry finds them
            // in the index now.
            self.store.seen.release(seen_keys(&entries), ticket);
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
                AfterFlush::Checkpointed(done) => {
                    let _ = done.send(());
                }
            }
        }
        Ok(())
    }
}

/// The thread that flushes the store while the writer indexes: one
/// flush at a time, each begun after the writes it must make durable.
struct Flusher {
    requests: Option<std::sync::mpsc::Sender<()>>,
    results: std::sync::mpsc::Receiver<StorageResult<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(store: Store) -> StorageResult<Self> {
        let (requests, requested) = std::sync::mpsc::channel::<()>();
        let (done, results) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn(move || {
                for () in requested {
                    if done.send(store.flush()).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StorageError::Unavailable(format!("starting the journal's flush thread: {e}")))?;
        Ok(Self { requests: Some(requests), results, thread: Some(thread) })
    }

    /// Starts a flush of every write made so far.
    fn begin(&self) -> StorageResult<()> {
        self.requests.as_ref().and_then(|requests| requests.send(()).ok()).ok_or_else(flusher_gone)
    }

    /// Waits for the flush begun last.
    fn finish(&self) -> StorageResult<()> {
        self.results.recv().map_err(|_| flusher_gone())?
    }
}

fn flusher_gone() -> StorageError {
    StorageError::Unavailable("the journal's flush thread has stopped".into())
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Its channel closed, the thread ends after the flush it may be in.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum AfterFlush {
    Done(Option<oneshot::Sender<()>>),
    Marker(oneshot::Sender<u64>),
    Checkpointed(oneshot::Sender<()>),
}

/// Writes the indexes derived from the journal (`seen`, `outbox`, `audit`),
/// commit by commit: the writer with each flush, recovery for each batch
/// of the tail.
///
/// An outbox message is indexed only if its receiver has not applied it
/// within [`CARRY_COMMITS`] commits (with entries) after its cause's. Until
/// then the journal holds it, and recovery indexes what the tail holds
/// unapplied. A receiver that applied it by then left its idempotency
/// record in one of those commits, so no crash can leave the effect without
/// the cause, or the cause durable without either the effect or the message
/// in the journal tail or the `outbox` tree: the message can never need
/// redelivery, and saves an insert and a delete. With inline delivery that
/// is nearly every message. For the same reason the receiver's record of
/// such a message is not indexed either when nobody needs its answer again
/// (a score: see [`crate::outbox::OutboxMessage::needs_receipt`]); a retry
/// of the cause delivers a score again only while it is in the `outbox`
/// tree. Every carried message is indexed before a checkpoint drops the
/// batches that hold it, and before a retry looks ([`Journal::settle`]).
#[derive(Default)]
pub struct Indexer {
    /// The keys of the `outbox` tree as this indexer wrote them (the
    /// writer's starts from the tree): an acknowledgement of a message
    /// that was never indexed, nearly every one, costs no lookup.
    indexed: FastSet<Vec<u8>>,
    /// Messages of the last [`CARRY_COMMITS`] commits whose receivers had
    /// not applied them, by their receipt (their receiver's record).
    carried: FastMap<Vec<u8>, Carried>,
    /// The receipts of the messages each commit carried, oldest first, with
    /// the commit's number (counting those with entries): a commit looks
    /// up its own records and the one generation due, never every carried
    /// message (re-inserting them all in each commit had been a fifth of the
    /// writer's work under batched load).
    generations: VecDeque<(u64, Vec<Vec<u8>>)>,
    /// Commits with entries so far.
    commits: u64,
    /// Receipts of carried scores applied in this commit: not indexed.
    unneeded: FastSet<Vec<u8>>,
    /// In recovery, every receiver record of the journal tail: a message
    /// applied anywhere in it replays with its effect and is not indexed
    /// (at run time it was acknowledged, which the journal does not hold).
    applied_later: FastSet<Vec<u8>>,
    /// In recovery every receiver record is written: recovery sees only
    /// the batches, not the commits without entries (checkpoints, a stop)
    /// in which the writer may have indexed a carried message, so it cannot
    /// know that a message never reached the `outbox` tree.
    keep_receipts: bool,
}

struct Carried {
    /// Its `outbox` key.
    key: Vec<u8>,
    value: Vec<u8>,
    needs_receipt: bool,
}

/// How many commits with entries after its cause's a message's receiver
/// may take to apply it before the message is indexed in the `outbox`
/// tree. Under batched load the receivers (one leaderboard, one jackpot)
/// apply a batch's messages only after its customers, some commits later:
/// with one commit, most messages went into the tree and out again; with
/// eight, enough still did under 64 streams of 100 that the writer spent
/// 9.7 CPU-µs per event against 8.1 with these. Recovery indexes the last
/// `CARRY_COMMITS + 1` batches again.
pub const CARRY_COMMITS: u32 = 32;

/// The keys of `entries`' idempotency records (for a receiver's entry,
/// the receipts of the messages it applied).
fn seen_keys(entries: &[JournalEntry]) -> impl Iterator<Item = &[u8]> {
    entries.iter().filter_map(|entry| entry.seen.as_ref()).map(|(key, _)| key.as_slice())
}

fn applied(entries: &[JournalEntry]) -> FastSet<&[u8]> {
    seen_keys(entries).collect()
}

impl Indexer {
    /// The writer's indexer, knowing which messages wait in the `outbox`
    /// tree (recovery's and earlier runs').
    pub fn writing(store: &Store) -> StorageResult<Self> {
        let indexed = store.outbox.iter().keys().map(|key| Ok(key?.to_vec())).collect::<StorageResult<_>>()?;
        Ok(Self { indexed, ..Self::default() })
    }

    /// The indexer recovery uses for the journal tail `batches`, of which it
    /// indexes those from `reindex_from` on. Only their messages can be
    /// carried, so only their receivers' records are looked for in the
    /// rest of the tail.
    pub fn recovering(batches: &[Batch], reindex_from: usize) -> StorageResult<Self> {
        let mut candidates = FastSet::default();
        for entry in batches.iter().skip(reindex_from).flat_map(|(_, entries)| entries) {
            for (key, _) in &entry.outbox {
                candidates.insert(crate::outbox::receipt_key(key).ok_or_else(|| {
                    StorageError::Codec(format!("outbox key {:?} has no tenant", String::from_utf8_lossy(key)))
                })?);
            }
        }
        let applied_later = batches
            .iter()
            .flat_map(|(_, entries)| entries)
            .filter_map(|entry| entry.seen.as_ref())
            .filter(|(key, _)| candidates.contains(key))
            .map(|(key, _)| key.clone())
            .collect();
        Ok(Self { applied_later, keep_receipts: true, ..Self::default() })
    }

    /// Before `entries`' commit is flushed (so that it is durable with
    /// it): indexes the carried messages whose receivers did not apply them
    /// in this commit either and have had their [`CARRY_COMMITS`], or all
    /// of them (`all`: before a checkpoint, a settle, a stop). Returns how
    /// many it added to the outbox.
    pub fn before_flush(&mut self, store: &Store, entries: &[JournalEntry], all: bool) -> StorageResult<i64> {
        for receipt in seen_keys(entries) {
            if let Some(carried) = self.carried.remove(receipt) {
                if !carried.needs_receipt && !self.keep_receipts {
                    self.unneeded.insert(receipt.to_vec());
                }
            }
        }
        let mut due = Vec::new();
        if all {
            self.generations.clear();
            due.extend(self.carried.drain().map(|(_, carried)| carried));
        } else {
            self.commits += 1;
            while self.generations.front().is_some_and(|(commit, _)| u64::from(CARRY_COMMITS) <= self.commits - commit)
            {
                let (_, receipts) = self.generations.pop_front().expect("a generation is due");
                due.extend(receipts.iter().filter_map(|receipt| self.carried.remove(receipt)));
            }
        }
        let mut added = 0;
        for carried in due {
            if self.index(store, (carried.key, carried.value))? {
                added += 1;
            }
        }
        Ok(added)
    }

    /// Writes a message to the `outbox` tree; whether it was not there.
    fn index(&mut self, store: &Store, (key, value): KeyValue) -> StorageResult<bool> {
        let added = store.outbox.insert(key.as_slice(), value)?.is_none();
        self.indexed.insert(key);
        Ok(added)
    }

    /// Deletes an acknowledged message from the `outbox` tree; whether it
    /// was there. Most never were: only those this indexer wrote (or found
    /// there at start) are looked for. One still carried is dropped: an
    /// acknowledgement comes once its receiver's answer is durable, and a
    /// receiver whose record was in a commit by then has resolved it, so
    /// this one's receiver left no record (it changed nothing, or there is
    /// none any more) and the message has nothing left to do.
    pub fn acknowledge(&mut self, store: &Store, key: &[u8]) -> StorageResult<bool> {
        if !self.indexed.remove(key) {
            if let Some(receipt) = crate::outbox::receipt_key(key) {
                self.carried.remove(&receipt);
            }
            return Ok(false);
        }
        Ok(store.outbox.remove(key)?.is_some())
    }

    /// After `entries`' batch (number `batch`) is written (the writer:
    /// while it is flushed): the idempotency records and the audit; this
    /// commit's messages that their receivers have not applied yet are
    /// carried to the next commits, except draws, which are indexed at
    /// once. Returns how many messages it added to the outbox.
    pub fn index_derived(&mut self, store: &Store, batch: u64, entries: &[JournalEntry]) -> StorageResult<i64> {
        let applied = applied(entries);
        let mut unneeded = std::mem::take(&mut self.unneeded);
        let mut added = 0;
        let mut generation = Vec::new();
        for entry in entries {
            for (key, value) in &entry.outbox {
                let Some(receipt) = crate::outbox::receipt_key(key) else {
                    return Err(StorageError::Codec(format!(
                        "outbox key {:?} has no tenant",
                        String::from_utf8_lossy(key)
                    )));
                };
                let message = decode::<crate::outbox::OutboxMessage>(value)?;
                let needs_receipt = message.needs_receipt();
                if !message.complete_on_receipt() {
                    // Its receiver's record is only half of its effect (a
                    // draw still has to be settled): it waits in the outbox
                    // until acknowledged.
                    if self.index(store, (key.clone(), value.clone()))? {
                        added += 1;
                    }
                } else if !applied.contains(receipt.as_slice()) {
                    // Applied in a later batch of the tail (recovery): it
                    // replays with its effect, and its record is kept.
                    if !self.applied_later.contains(&receipt) {
                        generation.push(receipt.clone());
                        self.carried.insert(receipt, Carried { key: key.clone(), value: value.clone(), needs_receipt });
                    }
                } else if !needs_receipt {
                    unneeded.insert(receipt);
                }
            }
            for (key, value) in &entry.audit {
                store.audit.insert(key.as_slice(), value.as_slice())?;
            }
        }
        if !generation.is_empty() {
            self.generations.push_back((self.commits, generation));
        }
        if !entries.is_empty() {
            let records = entries.iter().filter_map(|entry| entry.seen.as_ref());
            store.seen.insert(
                batch,
                records
                    .filter(|(key, _)| self.keep_receipts || !unneeded.contains(key))
                    .map(|(key, value)| (key.as_slice(), value.as_slice())),
            );
        }
        Ok(added)
    }

    /// Indexes every carried message (when the writer stops, and at the end
    /// of recovery). Returns how many it added to the outbox.
    pub fn finish(&mut self, store: &Store) -> StorageResult<i64> {
        self.before_flush(store, &[], true)
    }
}

/// One group commit: its sequence number and entries.
pub type Batch = (u64, Vec<JournalEntry>);

/// A batch is stored in parts of about this many bytes, each one sled
/// value. sled writes a log record of more than a quarter segment
/// (128 KiB) to a blob file of its own, and its cache counts a page held
/// in a blob by the size of its pointer, so never evicts it: whole batches
/// of a batched load (hundreds of kilobytes) went there. sled also
/// rewrites a whole leaf (up to 17 values) when it consolidates or splits
/// it, so parts this small keep even the leaves under the blob size. A
/// million customers and two million batched events without a checkpoint
/// took 4.46 GB with whole batches, 3.92 GB with 64 KiB parts and 2.72 GB
/// with these.
pub const PART_BYTES: usize = 7 * 1024;

/// The entries of one batch, cut into parts of about [`PART_BYTES`]
/// encoded (an entry larger than that is a part of its own).
fn parts(entries: &[JournalEntry]) -> impl Iterator<Item = &[JournalEntry]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let length = rest
            .iter()
            .position(|entry| {
                bytes += entry.encoded_len_estimate();
                PART_BYTES < bytes
            })
            .map_or(rest.len(), |at| at.max(1));
        let (part, after) = rest.split_at(length);
        rest = after;
        Some(part)
    })
}

/// A part's key: the batch's sequence number, then the part's, both
/// big-endian, so that keys sort by batch and a batch's range starts at
/// its 8-byte sequence number. (Nodes before parts wrote the 8 bytes
/// alone: read as part 0.)
pub(crate) fn part_key(seq: u64, part: usize) -> StorageResult<[u8; 10]> {
    let part = u16::try_from(part).map_err(|_| StorageError::Codec("a journal batch has over 65,535 parts".into()))?;
    let mut key = [0; 10];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key[8..].copy_from_slice(&part.to_be_bytes());
    Ok(key)
}

/// The batch sequence number of a journal key.
pub fn batch_of(key: &[u8]) -> StorageResult<u64> {
    match key.len() {
        8 | 10 => Ok(u64::from_be_bytes(key[..8].try_into().map_err(|_| bad_journal_key())?)),
        _ => Err(bad_journal_key()),
    }
}

fn bad_journal_key() -> StorageError {
    StorageError::Codec("journal key is neither 8 nor 10 bytes".into())
}

impl JournalEntry {
    /// About how many bytes the entry encodes to (a little more).
    fn encoded_len_estimate(&self) -> usize {
        let pair = |(key, value): &KeyValue| 16 + key.len() + value.len();
        64 + self.entity.len()
            + self.change.len()
            + self.seen.as_ref().map_or(0, pair)
            + self.outbox.iter().map(pair).sum::<usize>()
            + self.audit.iter().map(pair).sum::<usize>()
    }
}

/// Reads the checkpoint and every batch from it on, in order.
pub fn read_tail(store: &Store) -> StorageResult<(u64, Vec<Batch>)> {
    let checkpoint = read_checkpoint(store)?;
    let Some((last, _)) = store.journal.last()? else {
        return Ok((checkpoint, Vec::new()));
    };
    let last = batch_of(&last)?;
    // Parts read and decoded apart, then joined into their batches.
    let mut batches: Vec<Batch> = Vec::new();
    for (seq, entries) in read_parts(store, checkpoint, last)? {
        match batches.last_mut() {
            Some((previous, joined)) if *previous == seq => joined.extend(entries),
            _ => batches.push((seq, entries)),
        }
    }
    Ok((checkpoint, batches))
}

/// The first batch not yet covered by snapshots (0: none is).
fn read_checkpoint(store: &Store) -> StorageResult<u64> {
    Ok(match store.meta.get(CHECKPOINT_KEY)? {
        Some(bytes) => u64::from_be_bytes(
            bytes.as_ref().try_into().map_err(|_| StorageError::Codec("journal checkpoint is not 8 bytes".into()))?,
        ),
        None => 0,
    })
}

/// Reads and decodes the parts of batches `from..=last` on every core,
/// each thread its share of the batches: a tail of millions of entries
/// (hundreds of thousands of parts) is most of a restart's work.
fn read_parts(store: &Store, from: u64, last: u64) -> StorageResult<Vec<(u64, Vec<JournalEntry>)>> {
    if last < from {
        return Ok(Vec::new());
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as u64;
    let share = (last - from + 1).div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..threads)
            .map(|n| from.saturating_add(n.saturating_mul(share)))
            .take_while(|start| *start <= last)
            .map(|start| {
                let end = start.saturating_add(share);
                scope.spawn(move || {
                    let mut parts = Vec::new();
                    for item in store.journal.range(start.to_be_bytes()..end.to_be_bytes()) {
                        let (key, value) = item?;
                        parts.push((batch_of(&key)?, decode::<Vec<JournalEntry>>(&value)?));
                    }
                    Ok::<_, StorageError>(parts)
                })
            })
            .collect();
        let mut parts = Vec::new();
        for reader in readers {
            parts.extend(reader.join().map_err(|_| StorageError::Codec("a journal reading thread panicked".into()))??);
        }
        Ok(parts)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The score message event `n` sends.
    fn message(n: u64) -> crate::outbox::OutboxMessage {
        let id = |s: &str| bazaar_games::Id::parse(s).expect("id");
        crate::outbox::OutboxMessage::score("t", &id(&format!("e-{n}")), &id("top"), &id(&format!("c-{n}")), 1, 1)
    }

    fn entry(n: u64) -> JournalEntry {
        JournalEntry {
            entity: format!("t/customer/c-{n}"),
            entity_seq: n,
            change: vec![n as u8],
            seen: Some((format!("t/event/e-{n}").into_bytes(), vec![1])),
            outbox: vec![message(n).record()],
            audit: Vec::new(),
        }
    }

    /// Entries and snapshots as every earlier build wrote them: byte
    /// strings as plain `Vec<u8>` sequences.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PlainEntry {
        entity: String,
        entity_seq: u64,
        change: Vec<u8>,
        seen: Option<KeyValue>,
        outbox: Vec<KeyValue>,
        audit: Vec<KeyValue>,
    }

    #[test]
    fn byte_strings_are_written_as_they_always_were() {
        let mut entries = vec![entry(1), entry(300)];
        entries[1].seen = None;
        entries[1].audit = vec![(b"t/draw/w/d-1".to_vec(), vec![0, 255, 7]), (Vec::new(), Vec::new())];
        let plain: Vec<PlainEntry> = entries
            .iter()
            .map(|e| PlainEntry {
                entity: e.entity.clone(),
                entity_seq: e.entity_seq,
                change: e.change.clone(),
                seen: e.seen.clone(),
                outbox: e.outbox.clone(),
                audit: e.audit.clone(),
            })
            .collect();
        assert_eq!(encode(&entries), encode(&plain));
        let read: Vec<PlainEntry> = decode(&encode(&entries)).expect("decodes as the old form");
        assert_eq!(read, plain);
        let back: Vec<JournalEntry> = decode(&encode(&plain)).expect("decodes the old form");
        assert_eq!(encode(&back), encode(&entries));

        let snapshot = Snapshot { entity_seq: 9, state: vec![3; 70] };
        assert_eq!(encode(&snapshot), encode(&(9u64, vec![3u8; 70])));
        let read: Snapshot = decode(&encode(&(9u64, vec![3u8; 70]))).expect("decodes the old form");
        assert_eq!((read.entity_seq, read.state), (9, vec![3; 70]));
    }

    #[test]
    fn messages_applied_within_the_carry_window_are_not_indexed() {
        use crate::outbox::OutboxMessage;
        let id = |s: &str| bazaar_games::Id::parse(s).expect("id");
        let score = OutboxMessage::score("t", &id("e-1"), &id("top"), &id("c-1"), 5, 1);
        let contribution = OutboxMessage::contribution("t", &id("e-1"), &id("pot"), &id("c-1"), 5, 1, 1);
        let mut cause = entry(1);
        cause.outbox = vec![score.record(), contribution.record()];
        let receipt = |m: &OutboxMessage| crate::outbox::receipt_key(&m.storage_key()).expect("receipt key");
        let receiver =
            |m: &OutboxMessage| JournalEntry { seen: Some((receipt(m), vec![1])), outbox: vec![], ..entry(2) };
        let commit = |indexer: &mut Indexer, store: &Store, entries: &[JournalEntry]| {
            let added = indexer.before_flush(store, entries, false).expect("before");
            added + indexer.index_derived(store, 0, entries).expect("after")
        };
        let fresh = || {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path()).expect("open");
            (dir, store, Indexer::default())
        };
        // The receivers applied the messages in the cause's commit, or in
        // the next one: nothing waits in the outbox.
        for split in [false, true] {
            let (_dir, store, mut indexer) = fresh();
            let added = if split {
                commit(&mut indexer, &store, std::slice::from_ref(&cause))
                    + commit(&mut indexer, &store, &[receiver(&score), receiver(&contribution)])
            } else {
                commit(&mut indexer, &store, &[cause.clone(), receiver(&score), receiver(&contribution)])
            };
            assert_eq!(added + indexer.finish(&store).expect("finish"), 0, "split {split}");
            for message in [&score, &contribution] {
                assert!(store.outbox.get(message.storage_key()).expect("read").is_none(), "{} indexed", message.id);
            }
            // A score's record is not needed again; a contribution's answer is.
            assert!(store.seen.get(receipt(&score)).expect("read").is_none(), "split {split}");
            assert!(store.seen.get(receipt(&contribution)).expect("read").is_some(), "split {split}");
            assert!(store.seen.get(b"t/event/e-1").expect("read").is_some());
        }
        // Applied by the last commit they may wait for: not indexed.
        let unrelated = JournalEntry { outbox: vec![], ..entry(3) };
        let (_dir, store, mut indexer) = fresh();
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&cause)), 0);
        for _ in 1..CARRY_COMMITS {
            assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&unrelated)), 0);
        }
        assert_eq!(commit(&mut indexer, &store, &[receiver(&score), receiver(&contribution)]), 0);
        assert_eq!(indexer.finish(&store).expect("finish"), 0);
        assert!(store.outbox.get(score.storage_key()).expect("read").is_none());
        // Not applied by then: both wait in the outbox, and the receivers'
        // records are kept when they come.
        let (_dir, store, mut indexer) = fresh();
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&cause)), 0);
        for _ in 1..CARRY_COMMITS {
            assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&unrelated)), 0);
        }
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&unrelated)), 2);
        assert_eq!(commit(&mut indexer, &store, &[receiver(&score)]), 0);
        assert!(store.outbox.get(score.storage_key()).expect("read").is_some());
        assert!(store.seen.get(receipt(&score)).expect("read").is_some());
        // Recovery knows the whole tail: a message applied anywhere in it
        // replays with its effect and needs no redelivery.
        let (_dir, store, _) = fresh();
        let tail: Vec<Batch> =
            vec![(0, vec![cause.clone()]), (1, vec![unrelated.clone()]), (2, vec![receiver(&contribution)])];
        let mut recovering = Indexer::recovering(&tail, 0).expect("recovering");
        let added: i64 = tail.iter().map(|(_, entries)| commit(&mut recovering, &store, entries)).sum();
        assert_eq!(added + recovering.finish(&store).expect("finish"), 1, "only the score waits");
        assert!(store.outbox.get(score.storage_key()).expect("read").is_some());
        assert!(store.seen.get(receipt(&contribution)).expect("read").is_some());
        assert!(crate::outbox::is_receipt(&receipt(&score)) && !crate::outbox::is_receipt(b"t/event/e-1"));
        // Recovery cannot know whether the writer indexed a carried score in
        // a commit without entries, so it keeps every receiver's record.
        let (_dir, store, _) = fresh();
        let tail: Vec<Batch> = vec![(0, vec![cause.clone()]), (1, vec![receiver(&score)])];
        let mut recovering = Indexer::recovering(&tail, 0).expect("recovering");
        for (_, entries) in &tail {
            commit(&mut recovering, &store, entries);
        }
        assert!(store.seen.get(receipt(&score)).expect("read").is_some());
        // A draw is only half done when its wheel has drawn: it waits in
        // the outbox until the spin is settled.
        let (_dir, store, mut indexer) = fresh();
        let draw = OutboxMessage::wheel_draw("t", &id("wheel"), &id("c-1"), &id("r-1"), 1);
        let reserve = JournalEntry { outbox: vec![draw.record()], ..entry(4) };
        assert_eq!(commit(&mut indexer, &store, &[reserve, receiver(&draw)]), 1);
        assert!(store.outbox.get(draw.storage_key()).expect("read").is_some());
        // A writer that stops indexes what it carries, and so does one
        // asked to settle (a retry looks in the tree), whatever their age.
        let (_dir, store, mut indexer) = fresh();
        commit(&mut indexer, &store, std::slice::from_ref(&cause));
        assert_eq!(indexer.finish(&store).expect("finish"), 2);
        let (_dir, store, mut indexer) = fresh();
        commit(&mut indexer, &store, std::slice::from_ref(&cause));
        assert_eq!(indexer.before_flush(&store, &[receiver(&score)], true).expect("settle"), 1);
        assert!(store.outbox.get(contribution.storage_key()).expect("read").is_some());
        // Only what was indexed is looked for when acknowledged.
        assert!(!indexer.acknowledge(&store, &score.storage_key()).expect("ack"));
        assert!(indexer.acknowledge(&store, &contribution.storage_key()).expect("ack"));
        assert!(store.outbox.is_empty());
        assert!(!indexer.acknowledge(&store, &contribution.storage_key()).expect("ack"), "once");
        // The writer's indexer knows what an earlier run left in the tree.
        store.outbox.insert(score.storage_key(), score.record().1).expect("insert");
        let mut writing = Indexer::writing(&store).expect("writing");
        assert!(writing.acknowledge(&store, &score.storage_key()).expect("ack"));
        assert!(store.outbox.is_empty());
        // A message still carried when acknowledged (its receiver changed
        // nothing) has nothing left to do: it is not indexed.
        let (_dir, store, mut indexer) = fresh();
        commit(&mut indexer, &store, std::slice::from_ref(&cause));
        assert!(!indexer.acknowledge(&store, &score.storage_key()).expect("ack"));
        assert_eq!(indexer.finish(&store).expect("finish"), 1, "only the contribution");
        assert!(store.outbox.get(score.storage_key()).expect("read").is_none());
    }

    #[tokio::test]
    async fn entries_are_durable_and_indexed_before_their_ticket_is_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (journal, thread) =
            Journal::start(store.clone(), metrics.clone(), 0, Duration::from_secs(60)).expect("start");
        let tickets: Vec<Ticket> = (0..50)
            .map(|n| {
                let ticket = journal.submit(entry(n)).expect("open");
                // A retry finds the record from the moment it is submitted:
                // pending with its ticket, or already durable and indexed.
                let found = store.seen.lookup(format!("t/event/e-{n}").as_bytes()).expect("read");
                let (value, pending) = found.expect("the record is pending or indexed");
                assert_eq!(value, vec![1]);
                assert!(pending.is_none_or(|pending| pending == ticket), "{pending:?} is not {ticket}");
                assert!(pending.is_some() || ticket <= journal.durable_ticket());
                ticket
            })
            .collect();
        assert_eq!(tickets, (1..=50).collect::<Vec<_>>());
        journal.durable(50).await.expect("durable");
        assert!(store.seen.get(b"t/event/e-49").expect("read").is_some());
        // Released once durable (the writer answers a marker after that).
        journal.marker().await.expect("marker");
        assert_eq!(store.seen.stats().pending_records, 0);
        // No receiver applied the messages by the last commit with entries
        // they may wait for: they wait in the outbox. (The writer may have
        // split the fifty over two commits; the last one has waited one
        // commit less.)
        for n in 1..=CARRY_COMMITS {
            let ticket = journal.submit(JournalEntry { outbox: vec![], ..entry(100 + u64::from(n)) }).expect("open");
            journal.durable(ticket).await.expect("durable");
            let indexed = store.outbox.get(message(49).storage_key()).expect("read").is_some();
            assert_eq!(indexed, n == CARRY_COMMITS, "after {n} commits");
        }
        assert_eq!(metrics.outbox_backlog.get(), 50);
        assert!(store.outbox.get(message(3).storage_key()).expect("read").is_some());
        journal.outbox_ack(vec![message(3).storage_key()]).expect("open");
        let marker = journal.marker().await.expect("marker");
        assert_eq!(metrics.outbox_backlog.get(), 49);
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!(checkpoint, 0);
        let replayed: usize = batches.iter().map(|(_, entries)| entries.len()).sum();
        assert_eq!(replayed, 50 + CARRY_COMMITS as usize);
        journal.checkpoint(marker).await.expect("checkpoint");
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!((checkpoint, batches.len()), (marker, 0));
        trimmed_then_stopped(journal.clone(), thread, &store).await;
        assert!(journal.submit(entry(99)).is_err(), "closed journal refuses entries");
    }

    #[test]
    fn a_large_batch_is_stored_in_parts_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let large = |n: u64| JournalEntry { change: vec![n as u8; 1_000], ..entry(n) };
        let batch: Vec<JournalEntry> = (0..500).map(large).collect();
        let cut: Vec<&[JournalEntry]> = parts(&batch).collect();
        assert!(3 < cut.len(), "{} parts", cut.len());
        for (part, entries) in cut.iter().enumerate() {
            let bytes = encode(entries).len();
            assert!(bytes <= PART_BYTES + 1_500, "part {part}: {bytes} bytes");
            store.journal.insert(part_key(7, part).expect("key"), encode(entries)).expect("insert");
        }
        // An entry larger than a part is a part of its own.
        let huge = JournalEntry { change: vec![0; 3 * PART_BYTES], ..entry(9) };
        assert_eq!(parts(std::slice::from_ref(&huge)).count(), 1);
        // A batch written before parts existed: its 8-byte key alone.
        store.journal.insert(8u64.to_be_bytes(), encode(&vec![entry(1_000)])).expect("insert");
        let (_, batches) = read_tail(&store).expect("tail");
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].0, 7);
        let seqs: Vec<u64> = batches[0].1.iter().map(|entry| entry.entity_seq).collect();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>());
        assert_eq!((batches[1].0, batches[1].1.len()), (8, 1));
    }

    #[test]
    fn snapshots_go_a_slice_per_commit_and_a_checkpoint_moves_once_those_before_it_are_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let mut writer =
            Writer::new(store.clone(), metrics, Shared::new(), 0, Duration::from_secs(60)).expect("writer");
        writer.commit(vec![(1, Op::Entry(JournalEntry { outbox: vec![], ..entry(0) }))]).expect("commit");
        // A quiet node: no entries for a while, so nothing is paced.
        writer.last_entries = Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now);
        let snapshot = |n: usize| {
            let (done, written) = oneshot::channel();
            let key = format!("t/customer/c-{n}").into_bytes();
            let value = encode(&Snapshot { entity_seq: n as u64, state: vec![1] });
            ((0, Op::Snapshot { write: Some((key, value)), done: Some(done) }), written)
        };
        let barrier = || {
            let (done, written) = oneshot::channel();
            ((0, Op::Snapshot { write: None, done: Some(done) }), written)
        };
        let checkpointed = |store: &Store| store.meta.get(CHECKPOINT_KEY).expect("read").is_some();
        // A slice and ten before the checkpoint, then a barrier.
        let (mut ops, mut before): (Vec<_>, Vec<_>) = (0..SNAPSHOT_SLICE + 10).map(snapshot).unzip();
        let (done, mut checkpoint) = oneshot::channel();
        ops.push((0, Op::Checkpoint { upto: 1, done }));
        let (barrier_op, mut barrier_written) = barrier();
        ops.push(barrier_op);
        writer.commit(ops).expect("commit");
        assert_eq!(store.snapshots.len(), SNAPSHOT_SLICE, "one slice per commit");
        assert!(!checkpointed(&store) && checkpoint.try_recv().is_err());
        assert!(before.iter_mut().take(SNAPSHOT_SLICE).all(|w| w.try_recv().is_ok()));
        assert!(before[SNAPSHOT_SLICE].try_recv().is_err(), "not written, not told so");
        // Snapshots keep coming after the checkpoint: it does not wait for
        // them, only for the ten before it.
        let (ops, _after): (Vec<_>, Vec<_>) = (1_000..1_000 + SNAPSHOT_SLICE).map(snapshot).unzip();
        writer.commit(ops).expect("commit");
        assert_eq!(store.snapshots.len(), 2 * SNAPSHOT_SLICE);
        assert!(checkpointed(&store) && !writer.snapshots.is_empty());
        assert_eq!(read_checkpoint(&store).expect("read"), 1);
        assert!(before.iter_mut().skip(SNAPSHOT_SLICE).all(|w| w.try_recv().is_ok()));
        assert!(checkpoint.try_recv().is_ok(), "its waiter hears it moved");
        // The barrier fires in the commit that reaches it, and costs no
        // room in the slice.
        assert!(barrier_written.try_recv().is_ok());
        let (mut ops, _more): (Vec<_>, Vec<_>) = (2_000..2_000 + SNAPSHOT_SLICE).map(snapshot).unzip();
        let (barrier_op, mut last_barrier) = barrier();
        ops.push(barrier_op);
        writer.commit(ops).expect("commit");
        assert!(last_barrier.try_recv().is_err(), "behind ten snapshots still");
        writer.commit(Vec::new()).expect("commit");
        assert!(last_barrier.try_recv().is_ok() && writer.snapshots.is_empty());
        assert_eq!(store.snapshots.len(), 3 * SNAPSHOT_SLICE + 10);
    }

    /// Waits (up to half a minute: the writer paces itself while entries
    /// came in recently) until the old batches are gone on their own,
    /// checks that they are, and stops the writer.
    async fn trimmed_then_stopped(journal: Journal, thread: std::thread::JoinHandle<()>, store: &Store) {
        for _ in 0..3_000 {
            if store.journal.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(store.journal.is_empty());
        journal.close();
        thread.join().expect("writer exits cleanly");
    }

    #[tokio::test]
    async fn old_batches_go_in_the_background_and_after_a_crash_too() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (journal, thread) =
            Journal::start(store.clone(), metrics.clone(), 0, Duration::from_secs(60)).expect("start");
        let batches = TRIM_SLICE as u64 + 44;
        for n in 0..batches {
            let ticket = journal.submit(JournalEntry { outbox: vec![], ..entry(n) }).expect("open");
            journal.durable(ticket).await.expect("durable");
        }
        assert_eq!(store.journal.len() as u64, batches);
        let marker = journal.marker().await.expect("marker");
        journal.checkpoint(marker).await.expect("checkpoint");
        // The checkpoint moves at once; its batches go in the commits
        // after, a slice at most per commit, with or without entries.
        trimmed_then_stopped(journal, thread, &store).await;
        // A crash after the checkpoint moved and before its batches went:
        // the next writer deletes them.
        for seq in 0..batches {
            store.journal.insert(seq.to_be_bytes(), encode(&Vec::<JournalEntry>::new())).expect("insert");
        }
        let (journal, thread) = Journal::start(store.clone(), metrics, marker, Duration::from_secs(60)).expect("start");
        trimmed_then_stopped(journal, thread, &store).await;
    }
}
