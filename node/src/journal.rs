//! The journal writer: group commit of every entry that arrived since the
//! last commit, as one record of the journal's segment files
//! ([`crate::wal`]), made durable by one write (`O_DIRECT | O_DSYNC`, or a
//! write and an `fdatasync` where the file system has no `O_DIRECT`).
//!
//! Actors never wait for it. An actor applies a message, hands the entry to
//! [`Journal::submit`] and gets a [`Ticket`] back at once; whoever answers
//! the client waits with [`Journal::durable`] until the writer has synced
//! that ticket. Tickets are handed out under the same lock that queues the
//! entry, so the journal's order is the tickets' order, and "ticket `t` is
//! durable" means every ticket up to `t` is.
//!
//! A queued entry does not by itself start a commit: [`Journal::durable`]
//! asks for one when it has to wait (every other operation asks at once).
//! An event's entries (its customer's, then its jackpot's and
//! leaderboards', queued as the customer's answer is delivered) and a
//! batch's hundreds of them so go in one commit, not in one per entry
//! that found the writer idle.
//!
//! The writer is one OS thread (syncing blocks), looping:
//! 1. once a commit is asked for, take every queued operation;
//! 2. encode the entries as the next batch and hand it to the flusher
//!    thread (`Flusher`), which appends it to the newest segment and
//!    syncs it;
//! 3. meanwhile, do the last commit's work on sled (`Writer::apply`):
//!    delete acknowledged outbox messages, index the outbox messages
//!    earlier batches left undelivered for [`CARRY_FOR`] (see
//!    [`Indexer`]), write the indexes derived from its entries (the audit,
//!    and the seen ids in the [`crate::seen`] index's memtable, durable
//!    once a run holds them), release its idempotency records, and do
//!    some background work: write queued snapshots, and once the
//!    snapshots queued before a checkpoint are written, hand it to the
//!    checkpoint thread, which syncs sled, records it, syncs again and
//!    deletes the segments below it. While entries come in, background
//!    work takes at most a tenth of the writer's time, so a checkpoint's
//!    hundred thousand snapshots do not hold answers up;
//! 4. once the batch is durable, the flusher publishes its ticket and
//!    releases whoever waited (the writer learns it too); the batch's own
//!    work on sled is done in the next commit, or at once if none comes.
//!
//! Nothing reaches sled before the batch it derives from is durable: sled
//! makes its writes durable on its own schedule too, and nothing durable
//! there may refer to an entry a crash could still take. sled is not
//! flushed per commit: what a crash takes of its writes is rebuilt by
//! recovery from the journal, after the last batch sled had indexed
//! ([`REDO_KEY`]). A checkpoint flushes it before the segments it
//! covers are deleted.
//!
//! If a write or a sync fails the writer stops and the node answers 503 from
//! then on: actors may hold state the disk does not, and only a restart
//! (recovery from the journal) makes the two agree again.

use crate::storage::{decode, encode, Pace, SharedBytes, StorageError, StorageResult, Store};
use crate::{wal, FastMap, FastSet};
use bazaar_observability::Metrics;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// `tenant/kind/id`, shared with its actor (one copy per actor, not
    /// per entry).
    pub entity: Arc<str>,
    /// This entity's own counter of entries: replay applies the entries
    /// after the one its snapshot covers.
    pub entity_seq: u64,
    /// The entity's change: its new state, or an operation (leaderboards).
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
    /// The idempotency record (see [`crate::seen`]), shared with the
    /// pending records and the memtable instead of copied into each.
    #[serde(with = "crate::storage::byte_pairs::shared_option")]
    pub seen: Option<(SharedBytes, SharedBytes)>,
    /// Cross-entity messages (`outbox` tree) until acknowledged.
    #[serde(with = "crate::storage::byte_pairs")]
    pub outbox: Vec<KeyValue>,
    /// Draws and hits (`audit` tree).
    #[serde(with = "crate::storage::byte_pairs")]
    pub audit: Vec<KeyValue>,
}

/// A journal entry as recovery reads it: borrowed from the segment it was
/// read from (decoded from the same bytes as a [`JournalEntry`]), so that
/// a tail of millions of entries costs no allocation per field. Most of a
/// tail is not needed whole: a customer's earlier states, idempotency
/// records the index's runs already hold.
#[derive(Debug, Deserialize)]
pub struct EntryView<'a> {
    #[serde(borrow)]
    pub entity: &'a str,
    pub entity_seq: u64,
    #[serde(borrow)]
    pub change: &'a [u8],
    #[serde(borrow)]
    pub seen: Option<(&'a [u8], &'a [u8])>,
    #[serde(borrow)]
    pub outbox: Vec<(&'a [u8], &'a [u8])>,
    #[serde(borrow)]
    pub audit: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> EntryView<'a> {
    /// A view of an entry decoded whole (one a node before the segment
    /// files left in sled).
    fn of(entry: &'a JournalEntry) -> Self {
        let pairs = |pairs: &'a [KeyValue]| pairs.iter().map(|(key, value)| (&key[..], &value[..])).collect();
        EntryView {
            entity: &entry.entity,
            entity_seq: entry.entity_seq,
            change: &entry.change,
            seen: entry.seen.as_ref().map(|(key, value)| (&key[..], &value[..])),
            outbox: pairs(&entry.outbox),
            audit: pairs(&entry.audit),
        }
    }

    /// The entry itself, for the few batches recovery indexes again.
    pub fn to_entry(&self) -> JournalEntry {
        let pairs =
            |pairs: &[(&[u8], &[u8])]| pairs.iter().map(|(key, value)| (key.to_vec(), value.to_vec())).collect();
        JournalEntry {
            entity: self.entity.into(),
            entity_seq: self.entity_seq,
            change: self.change.to_vec(),
            seen: self.seen.map(|(key, value)| (key.into(), value.into())),
            outbox: pairs(&self.outbox),
            audit: pairs(&self.audit),
        }
    }
}

/// One group commit as recovery reads it.
pub type BatchView<'a> = (u64, Vec<EntryView<'a>>);

/// The journal from the checkpoint on, as read for recovery: the segments
/// mapped, what a node before them left in sled decoded; [`Tail::views`]
/// borrows the entries from it.
pub struct Tail {
    pub checkpoint: u64,
    legacy: Vec<Batch>,
    segments: Vec<wal::SegmentRead>,
}

impl Tail {
    /// Every batch, in order, its entries borrowed from the tail; decoded
    /// on every core, each thread its share of the records.
    pub fn views(&self) -> StorageResult<Vec<BatchView<'_>>> {
        let mut batches: Vec<BatchView<'_>> =
            self.legacy.iter().map(|(seq, entries)| (*seq, entries.iter().map(EntryView::of).collect())).collect();
        let records: Vec<(u64, &[u8])> = self
            .segments
            .iter()
            .flat_map(|segment| segment.records.iter().map(|(seq, range)| (*seq, &segment.bytes[range.clone()])))
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let share = records.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let decoders: Vec<_> = records
                .chunks(share)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(seq, payload)| Ok((*seq, decode::<Vec<EntryView<'_>>>(payload)?)))
                            .collect::<StorageResult<Vec<BatchView<'_>>>>()
                    })
                })
                .collect();
            batches.reserve(records.len());
            for decoder in decoders {
                batches.extend(
                    decoder.join().map_err(|_| StorageError::Codec("a journal decoding thread panicked".into()))??,
                );
            }
            Ok(batches)
        })
    }
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
    /// Every batch below `upto` is covered by snapshots: drop it, at
    /// `pace`.
    Checkpoint {
        upto: u64,
        pace: Pace,
        done: oneshot::Sender<()>,
    },
}

/// A checkpoint asked of the writer.
struct Requested {
    upto: u64,
    pace: Pace,
    /// How many snapshots had been queued when it came: it moves once
    /// they are written.
    queued: u64,
    done: oneshot::Sender<()>,
}

struct Queue {
    next_ticket: Ticket,
    ops: Vec<(Ticket, Op)>,
    closed: bool,
    /// Someone waits for what is queued: the writer commits as soon as it
    /// can. Entries and outbox acknowledgements do not ask for a commit by
    /// being queued, only once their durability is awaited (see
    /// [`Shared::request_commit`]); every other operation asks at once.
    commit_requested: bool,
    /// The last ticket the writer has taken into a commit.
    taken_through: Ticket,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    durable: watch::Sender<Durability>,
    /// Those waiting for a ticket to be durable, by ticket: a commit wakes
    /// only the waiters its batch covers. (Waiting on `durable` itself
    /// woke every waiter at every commit: under 64 unary clients a score
    /// of tasks per commit, most of them to find their ticket not durable
    /// yet and sleep again.)
    waiters: Mutex<BTreeMap<Ticket, Vec<oneshot::Sender<bool>>>>,
    /// The last ticket whose commit's work on sled is done (its indexes
    /// are readable): what readers of the derived trees wait for.
    indexed: watch::Sender<Ticket>,
    /// Snapshots the writer holds and has not written yet.
    snapshot_backlog: AtomicUsize,
    /// `durable`'s `failed`, readable without the watch's lock: every
    /// actor asks it before every command ([`Journal::failed`]).
    failed: AtomicBool,
}

impl Shared {
    fn new() -> Arc<Self> {
        let (durable, _) = watch::channel(Durability { ticket: 0, failed: false });
        let (indexed, _) = watch::channel(0);
        Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_ticket: 1,
                ops: Vec::new(),
                closed: false,
                commit_requested: false,
                taken_through: 0,
            }),
            wake: Condvar::new(),
            durable,
            waiters: Mutex::new(BTreeMap::new()),
            indexed,
            snapshot_backlog: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Publishes `ticket` as durable and wakes those waiting for it or an
    /// earlier one.
    fn made_durable(&self, ticket: Ticket) {
        // Before the waiters are taken: one that registers meanwhile sees
        // the new ticket (see `Shared::durable_at`).
        self.durable.send_modify(|d| d.ticket = ticket);
        let covered = {
            let mut waiters = self.waiters.lock();
            let later = waiters.split_off(&(ticket + 1));
            std::mem::replace(&mut *waiters, later)
        };
        for waiter in covered.into_values().flatten() {
            let _ = waiter.send(true);
        }
    }

    /// Waits until `ticket` is durable.
    async fn durable_at(&self, ticket: Ticket) -> StorageResult<()> {
        let waiting = {
            // The state is read under the waiters' lock, which the writer
            // takes only after publishing a ticket or a failure: either
            // this sees it, or the writer sees this waiter.
            let mut waiters = self.waiters.lock();
            let state = *self.durable.borrow();
            if ticket <= state.ticket {
                return Ok(());
            }
            if state.failed {
                return Err(storage_failed());
            }
            let (waiter, waiting) = oneshot::channel();
            waiters.entry(ticket).or_default().push(waiter);
            waiting
        };
        self.request_commit(ticket);
        match waiting.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(storage_failed()),
            Err(_) => Err(writer_gone()),
        }
    }

    /// Asks the writer for a commit that covers `ticket`, unless one it has
    /// begun does. An event's entries (its customer's, then its jackpot's
    /// and leaderboards') are queued one after the other: committing at
    /// the first one's arrival meant two commits per event on a quiet node,
    /// the second waiting for the first; asked for once the event's answer
    /// waits for them, one commit carries them all.
    fn request_commit(&self, ticket: Ticket) {
        let mut queue = self.queue.lock();
        if ticket <= queue.taken_through || queue.commit_requested {
            return;
        }
        queue.commit_requested = true;
        drop(queue);
        self.wake.notify_one();
    }

    /// Marks the journal failed and answers every waiter so.
    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.durable.send_modify(|d| d.failed = true);
        let waiting = std::mem::take(&mut *self.waiters.lock());
        for waiter in waiting.into_values().flatten() {
            let _ = waiter.send(false);
        }
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

/// The key under `meta` of the first batch whose derived writes (indexes,
/// carried outbox messages) may be missing from sled: every batch before
/// it has its indexes written and its messages applied or indexed. The
/// writer moves it after each batch's indexes; recovery indexes again from
/// it on.
pub const REDO_KEY: &[u8] = b"journal_redo_from";

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
        Self::start_with(store, metrics, next_seq, patience, wal::SEGMENT_BYTES, CARRY_FOR)
    }

    /// [`Journal::start`] with segments of `segment_bytes` and outbox
    /// messages carried for `carry_for` (tests use small ones).
    pub(crate) fn start_with(
        store: Store,
        metrics: Arc<Metrics>,
        next_seq: u64,
        patience: Duration,
        segment_bytes: u64,
        carry_for: Duration,
    ) -> StorageResult<(Self, std::thread::JoinHandle<()>)> {
        let shared = Shared::new();
        let seen = store.seen.clone();
        let appender = wal::Appender::open_with(&store.journal_dir, next_seq, segment_bytes)?;
        let mut writer = Writer::new(store, appender, metrics, shared.clone(), next_seq, patience)?;
        writer.indexer.carry_for = carry_for;
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
        if queue.closed || self.shared.failed.load(Ordering::Relaxed) {
            return Err(StorageError::Unavailable(
                "the node's journal is closed: the node is stopping or its storage failed".into(),
            ));
        }
        let ticket = queue.next_ticket;
        if matches!(op, Op::Entry(_)) {
            queue.next_ticket += 1;
        }
        // An entry waits for whoever awaits its durability to ask for the
        // commit; an acknowledgement rides along with the next one.
        let asks = !matches!(op, Op::Entry(_) | Op::OutboxAck(_));
        queued(ticket);
        queue.ops.push((ticket, op));
        if asks {
            queue.commit_requested = true;
        }
        drop(queue);
        if asks {
            self.shared.wake.notify_one();
        }
        Ok(ticket)
    }

    /// Queues an entry; it is durable once [`Journal::durable`] says so.
    /// Its idempotency record is pending in the [`crate::seen`] index from
    /// now until then.
    pub fn submit(&self, entry: JournalEntry) -> StorageResult<Ticket> {
        let held = entry.seen.as_ref().map(|(key, value)| self.seen.prepare(key.clone(), value.clone()));
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
    pub async fn checkpoint(&self, upto: u64, pace: Pace) -> StorageResult<()> {
        let seen = self.seen.clone();
        tokio::task::spawn_blocking(move || seen.persist())
            .await
            .map_err(|e| StorageError::Unavailable(format!("writing the seen index: {e}")))??;
        let (done, finished) = oneshot::channel();
        self.push(Op::Checkpoint { upto, pace, done })?;
        finished.await.map_err(|_| writer_gone())
    }

    /// Waits until `ticket` is durable.
    pub async fn durable(&self, ticket: Ticket) -> StorageResult<()> {
        self.shared.durable_at(ticket).await
    }

    /// Waits until every durable entry's derived writes (audit, outbox,
    /// idempotency index) are in sled, so that a read of those trees sees
    /// what every answer given so far caused.
    pub async fn indexed(&self) -> StorageResult<()> {
        let durable = self.durable_ticket();
        let mut indexed = self.shared.indexed.subscribe();
        let mut durability = self.shared.durable.subscribe();
        tokio::select! {
            reached = indexed.wait_for(|indexed| durable <= *indexed) => reached.map(drop).map_err(|_| writer_gone()),
            _ = durability.wait_for(|d| d.failed) => Err(writer_gone()),
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
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Whether [`Journal::close`] was called: the node is stopping.
    pub fn closed(&self) -> bool {
        self.shared.queue.lock().closed
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

pub(crate) fn storage_failed() -> StorageError {
    StorageError::Unavailable("the node's storage failed; retry on another node or after a restart".into())
}

struct Writer {
    store: Store,
    /// The queue's buffer, empty, for the next commit's operations.
    spare_ops: Vec<(Ticket, Op)>,
    /// Appends and syncs batches on a thread of its own.
    flusher: Flusher,
    /// Moves the checkpoint, and deletes the segments below it, on a
    /// thread of its own.
    checkpointer: Checkpointer,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// The number the next batch gets.
    next_seq: u64,
    indexer: Indexer,
    /// Batches a node before the segment files left in the sled tree below
    /// this are covered by snapshots and go, a slice per commit
    /// ([`TRIM_SLICE`]).
    trim_below: u64,
    /// Snapshots not written yet, in the order they came; a slice goes per
    /// commit ([`SNAPSHOT_SLICE`]).
    snapshots: VecDeque<QueuedSnapshot>,
    /// How many snapshots (and barriers) were ever written.
    popped: u64,
    /// Checkpoints waiting for the snapshots queued before them.
    checkpoints: Vec<Requested>,
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

/// Old batches of the sled tree deleted per commit. A checkpoint after
/// 30 s at ten thousand events a second left tens of thousands of them;
/// deleted in one commit, they held every answer up for half a second.
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
        appender: wal::Appender,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        next_seq: u64,
        patience: Duration,
    ) -> StorageResult<Self> {
        // Batches below the checkpoint that a crash left undeleted go: the
        // segments at once, the sled tree's a slice at a time; once the
        // checkpoint read is durable (after `kill -9` it may be only in the
        // page cache, which a power cut would still lose).
        let trim_below = read_checkpoint(&store)?;
        store.flush()?;
        wal::trim(&store.journal_dir, trim_below, Pace::AtOnce, &|| false)?;
        Ok(Writer {
            spare_ops: Vec::new(),
            indexer: Indexer::writing(&store)?,
            flusher: Flusher::start(appender, shared.clone())?,
            checkpointer: Checkpointer::start(store.clone())?,
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
        let mut stop = Stop { shared: self.shared.clone(), clean: false };
        // The last commit's work on sled, done while the next commit's
        // batch is written and synced, or at once when none comes.
        let mut deferred: Option<Deferred> = None;
        let stopped = loop {
            let ops = {
                let mut queue = self.shared.queue.lock();
                self.closing = queue.closed;
                // Nothing to commit now: the last commit's work on sled.
                if queue.ops.is_empty() || !(queue.commit_requested || queue.closed) {
                    if let Some(last) = deferred.take() {
                        drop(queue);
                        match self.apply(last) {
                            Ok(()) => continue,
                            Err(error) => break Err(error),
                        }
                    }
                }
                while !queue.commit_requested && !queue.closed {
                    if self.snapshots.is_empty() && !self.trimming() {
                        self.shared.wake.wait(&mut queue);
                    } else if !self.paced(Instant::now())
                        || self.shared.wake.wait_for(&mut queue, BACKGROUND_PACE).timed_out()
                    {
                        break;
                    }
                }
                if queue.ops.is_empty() && queue.closed && self.snapshots.is_empty() && self.checkpoints.is_empty() {
                    break Ok(());
                }
                queue.commit_requested = false;
                queue.taken_through = queue.next_ticket - 1;
                // The last commit's emptied queue, with its capacity: the
                // actors' pushes grew a new one by doubling, copying every
                // entry queued so far at each step.
                std::mem::replace(&mut queue.ops, std::mem::take(&mut self.spare_ops))
            };
            if let Err(error) = self.commit(ops, &mut deferred) {
                break Err(error);
            }
        };
        if let Err(error) = stopped {
            tracing::error!(%error, "journal commit failed; the node stops accepting writes");
            return;
        }
        stop.clean = true;
        match self.indexer.finish(&self.store) {
            Ok(added) => self.metrics.outbox_backlog.add(added),
            Err(error) => tracing::error!(%error, "indexing the last outbox messages failed; recovery will"),
        }
        if let Err(error) = self.store.flush() {
            tracing::error!(%error, "final flush of the derived indexes failed; recovery will rebuild them");
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
    fn write_snapshots(&mut self, budget: &Budget, replies: &mut Vec<Reply>) -> StorageResult<()> {
        let mut written = 0;
        while written < SNAPSHOT_SLICE && !budget.spent() {
            let Some(snapshot) = self.snapshots.pop_front() else { break };
            self.popped += 1;
            if let Some((key, value)) = snapshot.write {
                self.store.snapshots.insert(key, value)?;
                written += 1;
            }
            replies.push(Reply::Done(snapshot.done));
        }
        Ok(())
    }

    /// Deletes batches a node before the segment files left in the sled
    /// tree below the checkpoint, as far as `budget` allows.
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

    /// Begins one commit: its entries, as the next batch, go to the
    /// flusher thread, which appends them to the journal's segment and
    /// syncs it; meanwhile the last commit's work on sled is done
    /// ([`Writer::apply`]). Once the batch is durable its ticket is
    /// published, and this commit's work on sled waits for the next one.
    fn commit(&mut self, mut ops: Vec<(Ticket, Op)>, deferred: &mut Option<Deferred>) -> StorageResult<()> {
        let started = Instant::now();
        let mut entries = Vec::with_capacity(ops.len());
        let mut last_ticket = None;
        let mut others = Vec::new();
        for (ticket, op) in ops.drain(..) {
            match op {
                Op::Entry(entry) => {
                    entries.push(entry);
                    last_ticket = Some(ticket);
                }
                op => others.push(op),
            }
        }
        if ops.capacity() <= SPARE_OPS {
            self.spare_ops = ops;
        }
        let batch = (!entries.is_empty()).then_some(self.next_seq);
        if let Some(seq) = batch {
            let bytes = self.flusher.begin(seq, &entries, last_ticket)?;
            self.metrics.journal_bytes.inc_by(bytes as u64);
            self.next_seq += 1;
            self.last_entries = started;
        }
        if let Some(last) = deferred.take() {
            self.apply(last)?;
        }
        if batch.is_some() {
            // The flusher has published the batch's ticket as durable.
            self.flusher.finish()?;
            self.metrics.journal_flush_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.journal_batch_entries.observe(entries.len() as f64);
        }
        *deferred = Some(Deferred { started, batch, entries, last_ticket, ops: others, next_seq: self.next_seq });
        Ok(())
    }

    /// A commit's work on sled, once its batch is durable (so that nothing
    /// sled makes durable on its own, every half second, refers to a batch
    /// a crash could still take): acknowledged outbox messages, queued
    /// snapshots, the indexes derived from the entries, the checkpoint's
    /// request, then the replies that wait for them.
    ///
    /// Writes go in the order snapshots, carried outbox messages, this
    /// batch's indexes, the mark of the first batch to index again, and
    /// only after a sync of all of them, on the checkpoint thread, the
    /// checkpoint they allow: sled persists its writes in order, so every
    /// prefix a crash can leave is consistent (one with the checkpoint has
    /// everything it relies on, one without it has the segments below it),
    /// and recovery indexes again from the mark on (see [`REDO_KEY`]).
    fn apply(&mut self, commit: Deferred) -> StorageResult<()> {
        if let Some(error) = self.checkpointer.failure() {
            return Err(error);
        }
        let Deferred { started, batch, mut entries, last_ticket, ops, next_seq } = commit;
        let mut settle = false;
        let mut replies = Vec::new();
        for op in ops {
            match op {
                Op::Entry(_) => return Err(StorageError::Codec("a journal entry outside its batch".into())),
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
                Op::Marker(reply) => replies.push(Reply::Marker(reply, next_seq)),
                Op::Settle(reply) => {
                    settle = true;
                    replies.push(Reply::Done(Some(reply)));
                }
                Op::Checkpoint { upto, pace, done } => {
                    let queued = self.popped + self.snapshots.len() as u64;
                    self.checkpoints.push(Requested { upto, pace, queued, done });
                }
            }
        }
        let budget = self.background_budget(started);
        self.write_snapshots(&budget, &mut replies)?;
        // A checkpoint moves once every snapshot queued before it is
        // written (not every snapshot queued since: under load those never
        // stop coming).
        let popped = self.popped;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.checkpoints).into_iter().partition(|requested| requested.queued <= popped);
        self.checkpoints = waiting;
        let checkpoint = ready.iter().map(|requested| requested.upto).max();
        // Spread only if nobody asked for it at once (a stop).
        let pace = match ready.iter().any(|requested| requested.pace == Pace::AtOnce) {
            true => Pace::AtOnce,
            false => Pace::Spread,
        };
        let checkpointed: Vec<oneshot::Sender<()>> = ready.into_iter().map(|requested| requested.done).collect();
        // Carried messages wait (up to CARRY_FOR) while commits with
        // entries come, but never past a checkpoint or a request to settle
        // them.
        let mut indexed = match (entries.is_empty(), checkpoint.is_some() || settle) {
            (true, false) => 0,
            (_, all) => self.indexer.before_flush(&self.store, &entries, all)?,
        };
        if checkpoint.is_some() {
            self.checkpointed_at = started;
        }
        if let Some(batch) = batch {
            indexed += self.indexer.index_derived(&self.store, batch, &mut entries)?;
            let redo_from = self.indexer.redo_from(batch + 1);
            self.store.meta.insert(REDO_KEY, &redo_from.to_be_bytes())?;
        }
        if let Some(ticket) = last_ticket {
            // Durable and indexed: a retry finds them in the index now.
            self.store.seen.release(seen_keys(&entries), ticket);
            self.shared.indexed.send_replace(ticket);
        }
        if let Some(upto) = checkpoint {
            // Every snapshot and carried message it relies on is in sled
            // now (and the indexes of every batch below it were written
            // before its marker was answered): the checkpoint thread makes
            // them durable, then the checkpoint, then deletes the segments.
            self.checkpointer.request(upto, pace, checkpointed);
        }
        // The batches a node before the segment files left in sled go
        // only below a durable checkpoint.
        self.trim_below = self.trim_below.max(self.checkpointer.durable_since());
        self.trim(&budget)?;
        self.credit = budget.left();
        self.shared.snapshot_backlog.store(self.snapshots.len(), Ordering::Relaxed);
        self.metrics.outbox_backlog.add(indexed);
        for reply in replies {
            match reply {
                Reply::Done(Some(done)) => {
                    let _ = done.send(());
                }
                Reply::Done(None) => {}
                Reply::Marker(reply, next_seq) => {
                    let _ = reply.send(next_seq);
                }
            }
        }
        Ok(())
    }
}

/// Fails the journal when its writer's thread ends other than by a clean
/// stop (a failed commit or a panic): new operations are refused, and the
/// queued ones are dropped, so that everyone waiting on one (a marker, a
/// checkpoint, a passivating actor's snapshot) gets an error instead of
/// waiting for ever.
struct Stop {
    shared: Arc<Shared>,
    clean: bool,
}

impl Drop for Stop {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        let queued = {
            let mut queue = self.shared.queue.lock();
            queue.closed = true;
            std::mem::take(&mut queue.ops)
        };
        drop(queued);
        self.shared.fail();
    }
}

/// A commit whose batch is durable (or that had none), waiting for its
/// work on sled ([`Writer::apply`]).
struct Deferred {
    started: Instant,
    /// The number of its batch, if it had entries.
    batch: Option<u64>,
    entries: Vec<JournalEntry>,
    last_ticket: Option<Ticket>,
    /// Its other operations, in their order.
    ops: Vec<Op>,
    /// The number the batch after this commit gets.
    next_seq: u64,
}

/// The thread that appends batches to the journal's segment and syncs
/// them, while the writer does the last commit's work on sled: one batch
/// at a time. Once a batch is durable it publishes the batch's last ticket
/// itself, waking the requests that wait for it: handing that back to the
/// writer first put a second thread's wake-up (0.13 ms of a 0.39 ms
/// commit under 64 unary clients, waiting for a core) on every request's
/// path.
struct Flusher {
    requests: Option<std::sync::mpsc::Sender<FlushRequest>>,
    results: std::sync::mpsc::Receiver<(StorageResult<()>, Vec<u8>)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The buffer a batch is encoded into, back from the thread.
    spare: Vec<u8>,
}

/// A batch for the flusher: its number, its encoded record, and the ticket
/// to publish once it is durable.
type FlushRequest = (u64, Vec<u8>, Option<Ticket>);

/// A buffer this large is not kept for the next batch.
const SPARE_BYTES: usize = 16 << 20;

/// A queue of more operations than this is not kept for the next commit.
const SPARE_OPS: usize = 64 * 1024;

impl Flusher {
    fn start(mut appender: wal::Appender, shared: Arc<Shared>) -> StorageResult<Self> {
        let (requests, requested) = std::sync::mpsc::channel::<FlushRequest>();
        let (done, results) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn(move || {
                for (seq, record, last_ticket) in requested {
                    let written = appender.append(seq, &record).and_then(|()| appender.sync());
                    if let (Ok(()), Some(ticket)) = (&written, last_ticket) {
                        shared.made_durable(ticket);
                    }
                    if done.send((written, record)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StorageError::Unavailable(format!("starting the journal's flush thread: {e}")))?;
        Ok(Self { requests: Some(requests), results, thread: Some(thread), spare: Vec::new() })
    }

    /// Encodes `entries` as batch `seq` and starts writing and syncing it;
    /// once it is durable, `last_ticket` (its entries' last) is published.
    /// Encodes the batch and hands it to the thread; its record's length.
    fn begin(&mut self, seq: u64, entries: &[JournalEntry], last_ticket: Option<Ticket>) -> StorageResult<usize> {
        let mut record = std::mem::take(&mut self.spare);
        wal::begin_record(&mut record);
        crate::storage::encode_into(&mut record, entries);
        wal::seal_record(&mut record, seq)?;
        let bytes = record.len();
        self.requests
            .as_ref()
            .and_then(|requests| requests.send((seq, record, last_ticket)).ok())
            .ok_or_else(flusher_gone)?;
        Ok(bytes)
    }

    /// Waits until the batch begun last is durable.
    fn finish(&mut self) -> StorageResult<()> {
        let (written, record) = self.results.recv().map_err(|_| flusher_gone())?;
        if record.capacity() <= SPARE_BYTES {
            self.spare = record;
        }
        written
    }
}

fn flusher_gone() -> StorageError {
    StorageError::Unavailable("the journal's flush thread has stopped".into())
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Its channel closed, the thread ends after the batch it may be in.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a commit answers once its work on sled is done.
enum Reply {
    Done(Option<oneshot::Sender<()>>),
    /// A marker, with the number of the batch after its commit.
    Marker(oneshot::Sender<u64>, u64),
}

/// What the checkpoint thread is asked: the checkpoint, the pace of the
/// deletions below it, whom to answer.
type CheckpointRequest = (u64, Pace, Vec<oneshot::Sender<()>>);

/// Moves the checkpoint on a thread of its own: syncs sled (the snapshots
/// and carried outbox messages the checkpoint relies on), records the
/// checkpoint, syncs sled again, then deletes the segments below it (at
/// the [`Pace`] asked for: spread out while the node serves) and
/// answers whoever asked. Neither the syncs nor the deletions are on the
/// writer's thread, where each held every commit, and so every answer, up:
/// unlinking 64 MiB segments took 110-140 ms (under an open loop at 9,000
/// events/s, the second of each checkpoint had a p50 of 80 ms), and the
/// syncs as long as sled took to write out what the checkpoint's snapshots
/// left (4-11 ms per checkpoint under an open loop at 15,000 events/s). It
/// runs at background priority, as the deletions alone did. A segment it
/// fails to delete stays for the next checkpoint, or the next start, to
/// delete: the checkpoint itself is durable.
struct Checkpointer {
    requests: Option<std::sync::mpsc::Sender<CheckpointRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The newest checkpoint made durable since the writer last looked (0:
    /// none): the batches a node before the segment files left in sled's
    /// tree below it may go ([`Writer::trim`]).
    durable: Arc<AtomicU64>,
    /// Why the thread stopped, for the writer to fail with.
    failure: Arc<Mutex<Option<StorageError>>>,
    /// Requests for deletions at once not yet done (a stop's checkpoint,
    /// the writer closing): a spread-out deletion under way finishes at
    /// once rather than hold them up.
    hurry: Arc<AtomicUsize>,
}

impl Checkpointer {
    fn start(store: Store) -> StorageResult<Self> {
        let (requests, requested) = std::sync::mpsc::channel::<CheckpointRequest>();
        let durable = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let hurry = Arc::new(AtomicUsize::new(0));
        let (published, failed, hurried) = (durable.clone(), failure.clone(), hurry.clone());
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                crate::background_thread();
                for (upto, pace, waiters) in requested {
                    let started = Instant::now();
                    // Recovery reads from the checkpoint on: the batches
                    // below it are garbage once it is durable. The
                    // snapshots it relies on are made durable first: sled
                    // may write the checkpoint's log record out at any
                    // time, and a snapshot large enough for a blob file of
                    // its own is synced only by a flush (a power cut in
                    // between would keep the checkpoint and lose the
                    // snapshot).
                    let moved = store
                        .flush()
                        .and_then(|()| Ok(store.meta.insert(CHECKPOINT_KEY, &upto.to_be_bytes()).map(drop)?))
                        .and_then(|()| store.flush());
                    if let Err(error) = moved {
                        tracing::error!(%error, upto, "moving the journal's checkpoint failed");
                        *failed.lock() = Some(error);
                        // The waiters hear that the writer is gone.
                        return;
                    }
                    published.fetch_max(upto, Ordering::Relaxed);
                    let synced_ms = started.elapsed().as_millis() as u64;
                    let trimmed = wal::trim(&store.journal_dir, upto, pace, &|| 0 < hurried.load(Ordering::Relaxed));
                    if pace == Pace::AtOnce {
                        hurried.fetch_sub(1, Ordering::Relaxed);
                    }
                    match trimmed {
                        Ok(deleted) => tracing::debug!(
                            deleted,
                            upto,
                            ?pace,
                            synced_ms,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "journal checkpoint moved and the segments below it deleted"
                        ),
                        Err(error) => {
                            tracing::warn!(%error, upto, "deleting journal segments below the checkpoint failed")
                        }
                    }
                    for waiter in waiters {
                        let _ = waiter.send(());
                    }
                }
            })
            .map_err(|e| StorageError::Unavailable(format!("starting the journal's checkpoint thread: {e}")))?;
        Ok(Self { requests: Some(requests), thread: Some(thread), durable, failure, hurry })
    }

    /// Moves the checkpoint to `upto` (every batch below it is covered by
    /// snapshots written to sled), deletes the segments below it at `pace`,
    /// then answers `waiters`.
    fn request(&self, upto: u64, pace: Pace, waiters: Vec<oneshot::Sender<()>>) {
        if let Some(requests) = &self.requests {
            if pace == Pace::AtOnce {
                self.hurry.fetch_add(1, Ordering::Relaxed);
            }
            // Its thread ends only once this sender is dropped, or on a
            // failure, which the writer learns from `failure`.
            let _ = requests.send((upto, pace, waiters));
        }
    }

    /// The newest checkpoint made durable since the last call (0: none).
    fn durable_since(&self) -> u64 {
        self.durable.swap(0, Ordering::Relaxed)
    }

    /// Why the thread stopped, if it failed (once).
    fn failure(&self) -> Option<StorageError> {
        self.failure.lock().take()
    }
}

impl Drop for Checkpointer {
    /// Waits for the checkpoints asked for (one asked for at shutdown is
    /// answered once it is durable and its segments are gone); segments
    /// still going a slice at a time go at once.
    fn drop(&mut self) {
        self.hurry.fetch_add(1, Ordering::Relaxed);
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes the indexes derived from the journal (`seen`, `outbox`, `audit`),
/// commit by commit: the writer once each batch is durable, recovery for
/// each batch of the tail it indexes again.
///
/// An outbox message is indexed only if its receiver has not applied it
/// within [`CARRY_FOR`] of its cause's commit. Until then the journal
/// holds it, and recovery indexes what the tail holds unapplied from the
/// oldest batch whose messages may still have been carried (see
/// [`REDO_KEY`]). A receiver that applied it by then left its idempotency
/// record in a later batch, so no crash can leave the effect without the
/// cause, or the cause durable without either the effect or the message
/// in the journal tail or the `outbox` tree: the message can never need
/// redelivery, and saves an insert and a delete. With inline delivery that
/// is nearly every message. For the same reason the receiver's record of
/// such a message is not indexed either when nobody needs its answer again
/// (a score: see [`crate::outbox::OutboxMessage::needs_receipt`]); a retry
/// of the cause delivers a score again only while it is in the `outbox`
/// tree. Every carried message is indexed before a checkpoint drops the
/// batches that hold it, and before a retry looks ([`Journal::settle`]).
pub struct Indexer {
    /// The keys of the `outbox` tree as this indexer wrote them (the
    /// writer's starts from the tree): an acknowledgement of a message
    /// that was never indexed, nearly every one, costs no lookup.
    indexed: FastSet<Vec<u8>>,
    /// Messages of the last [`CARRY_FOR`] whose receivers had not applied
    /// them, by their receipt (their receiver's record).
    carried: FastMap<Vec<u8>, Carried>,
    /// The receipts of the messages each commit carried, oldest first: a
    /// commit looks up its own records and the generations due, never
    /// every carried message (re-inserting them all in each commit had been
    /// a fifth of the writer's work under batched load).
    generations: VecDeque<Generation>,
    /// How long a message is carried: [`CARRY_FOR`] but in tests.
    carry_for: Duration,
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
    /// A receipt being looked up (see [`crate::outbox::receipt_key_into`]).
    receipt: Vec<u8>,
}

impl Default for Indexer {
    fn default() -> Self {
        Self {
            indexed: FastSet::default(),
            carried: FastMap::default(),
            generations: VecDeque::new(),
            carry_for: CARRY_FOR,
            unneeded: FastSet::default(),
            applied_later: FastSet::default(),
            keep_receipts: false,
            receipt: Vec::new(),
        }
    }
}

/// The messages one batch carried.
struct Generation {
    /// When the batch was indexed.
    at: Instant,
    batch: u64,
    receipts: Vec<Vec<u8>>,
}

struct Carried {
    /// Its `outbox` key.
    key: Vec<u8>,
    value: Vec<u8>,
    needs_receipt: bool,
}

/// How long after its cause's commit a message's receiver may take to
/// apply it before the message is indexed in the `outbox` tree. Under
/// batched load the receivers (one leaderboard, one jackpot) apply a
/// batch's messages only after its customers, behind every batch before
/// it in their mailboxes: with 64 streams of 100 a leaderboard's score
/// came up to a few hundred milliseconds after its cause. Counted in
/// commits (32) instead, most scores went into the tree and out again
/// once commits took a millisecond or two: a quarter of the writer's work.
pub const CARRY_FOR: Duration = Duration::from_secs(1);

/// How many batches recovery indexes again when the journal was written
/// by a node before [`REDO_KEY`]: it carried messages for 32 commits and
/// flushed a batch's indexes with the next.
const LEGACY_REDO_BATCHES: u64 = 33;

/// The keys of `entries`' idempotency records (for a receiver's entry,
/// the receipts of the messages it applied).
fn seen_keys(entries: &[JournalEntry]) -> impl Iterator<Item = &[u8]> {
    entries.iter().filter_map(|entry| entry.seen.as_ref()).map(|(key, _)| &key[..])
}

fn applied(entries: &[JournalEntry]) -> FastSet<&[u8]> {
    let mut applied = FastSet::with_capacity_and_hasher(entries.len(), Default::default());
    applied.extend(seen_keys(entries));
    applied
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
    pub fn recovering(batches: &[BatchView<'_>], reindex_from: usize) -> StorageResult<Self> {
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
            .filter(|(key, _)| candidates.contains(&key[..]))
            .map(|(key, _)| key.to_vec())
            .collect();
        Ok(Self { applied_later, keep_receipts: true, ..Self::default() })
    }

    /// Before `entries`' indexes: indexes the carried messages whose
    /// receivers did not apply them in this commit either and have had
    /// their [`CARRY_FOR`], or all of them (`all`: before a checkpoint, a
    /// settle, a stop). Returns how many it added to the outbox.
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
            let now = Instant::now();
            while self.generations.front().is_some_and(|g| self.carry_for <= now.saturating_duration_since(g.at)) {
                let generation = self.generations.pop_front().expect("a generation is due");
                due.extend(generation.receipts.iter().filter_map(|receipt| self.carried.remove(receipt)));
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
            if !self.carried.is_empty() && crate::outbox::receipt_key_into(key, &mut self.receipt) {
                self.carried.remove(self.receipt.as_slice());
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
    ///
    /// The entries' messages move into the outbox or the carried ones: the
    /// entries are not read for them again.
    pub fn index_derived(&mut self, store: &Store, batch: u64, entries: &mut [JournalEntry]) -> StorageResult<i64> {
        // The receipts of earlier commits' messages not needed (see
        // `before_flush`), and of this commit's: borrowed from the records
        // that applied them, not built again for each message.
        let carried_unneeded = std::mem::take(&mut self.unneeded);
        let mut unneeded: FastSet<&[u8]> = FastSet::default();
        let mut receipt = std::mem::take(&mut self.receipt);
        let mut added = 0;
        let mut generation = Vec::new();
        let outboxes: Vec<Vec<KeyValue>> = entries.iter_mut().map(|entry| std::mem::take(&mut entry.outbox)).collect();
        let entries: &[JournalEntry] = entries;
        let applied = applied(entries);
        for (entry, outbox) in entries.iter().zip(outboxes) {
            for (key, value) in outbox {
                if !crate::outbox::receipt_key_into(&key, &mut receipt) {
                    return Err(StorageError::Codec(format!(
                        "outbox key {:?} has no tenant",
                        String::from_utf8_lossy(&key)
                    )));
                }
                let kind = crate::outbox::kind_of_record(&value)?;
                let needs_receipt = kind.needs_receipt();
                if !kind.complete_on_receipt() {
                    // Its receiver's record is only half of its effect (a
                    // draw still has to be settled): it waits in the outbox
                    // until acknowledged.
                    if self.index(store, (key, value))? {
                        added += 1;
                    }
                    continue;
                }
                match applied.get(receipt.as_slice()) {
                    // Applied in this commit: its record is kept only if
                    // its answer is needed again.
                    Some(record) if !needs_receipt => {
                        unneeded.insert(*record);
                    }
                    Some(_) => {}
                    // Applied in a later batch of the tail (recovery): it
                    // replays with its effect, and its record is kept.
                    None if self.applied_later.contains(receipt.as_slice()) => {}
                    None => {
                        generation.push(receipt.clone());
                        self.carried.insert(receipt.clone(), Carried { key, value, needs_receipt });
                    }
                }
            }
            for (key, value) in &entry.audit {
                store.audit.insert(key.as_slice(), value.as_slice())?;
            }
        }
        self.receipt = receipt;
        if !generation.is_empty() {
            self.generations.push_back(Generation { at: Instant::now(), batch, receipts: generation });
        }
        if !entries.is_empty() {
            let records = entries.iter().filter_map(|entry| entry.seen.as_ref());
            let kept = |key: &[u8]| self.keep_receipts || !(unneeded.contains(key) || carried_unneeded.contains(key));
            store.seen.insert(batch, records.filter(|(key, _)| kept(key)));
        }
        Ok(added)
    }

    /// The first batch recovery must index again if the node died now
    /// (its indexes written up to `next`, the batch after the last one):
    /// the oldest that may still have carried messages, or `next`.
    pub fn redo_from(&self, next: u64) -> u64 {
        self.generations.front().map_or(next, |generation| generation.batch.min(next))
    }

    /// Indexes every carried message (when the writer stops, and at the end
    /// of recovery). Returns how many it added to the outbox.
    pub fn finish(&mut self, store: &Store) -> StorageResult<i64> {
        self.before_flush(store, &[], true)
    }
}

/// One group commit: its sequence number and entries.
pub type Batch = (u64, Vec<JournalEntry>);

/// A key of the sled tree nodes before the segment files kept the journal
/// in: the batch's sequence number, then the part's, both big-endian.
/// (Nodes before parts wrote the 8 bytes alone: read as part 0.) Tests and
/// `bazaar limits` write such batches too.
pub(crate) fn part_key(seq: u64, part: usize) -> StorageResult<[u8; 10]> {
    let part = u16::try_from(part).map_err(|_| StorageError::Codec("a journal batch has over 65,535 parts".into()))?;
    let mut key = [0; 10];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key[8..].copy_from_slice(&part.to_be_bytes());
    Ok(key)
}

/// The batch sequence number of a key of the sled tree.
pub fn batch_of(key: &[u8]) -> StorageResult<u64> {
    match key.len() {
        8 | 10 => Ok(u64::from_be_bytes(key[..8].try_into().map_err(|_| bad_journal_key())?)),
        _ => Err(bad_journal_key()),
    }
}

fn bad_journal_key() -> StorageError {
    StorageError::Codec("journal key is neither 8 nor 10 bytes".into())
}

/// Reads the checkpoint and every batch from it on, in order, as whole
/// entries: first what a node before the segment files left in the sled
/// tree, then the segments (the tests' view of the tail; recovery reads
/// it with [`open_tail`]).
#[cfg(test)]
pub(crate) fn read_tail(store: &Store) -> StorageResult<(u64, Vec<Batch>)> {
    let tail = open_tail(store)?;
    let batches =
        tail.views()?.iter().map(|(seq, entries)| (*seq, entries.iter().map(EntryView::to_entry).collect())).collect();
    Ok((tail.checkpoint, batches))
}

/// The checkpoint and every batch from it on, for [`Tail::views`]: the
/// segments mapped, what a node before them left in sled decoded.
pub fn open_tail(store: &Store) -> StorageResult<Tail> {
    let checkpoint = read_checkpoint(store)?;
    let mut legacy: Vec<Batch> = Vec::new();
    if let Some((last, _)) = store.journal.last()? {
        // Parts read and decoded apart, then joined into their batches.
        for (seq, entries) in read_parts(store, checkpoint, batch_of(&last)?)? {
            match legacy.last_mut() {
                Some((previous, joined)) if *previous == seq => joined.extend(entries),
                _ => legacy.push((seq, entries)),
            }
        }
    }
    let from = legacy.last().map_or(checkpoint, |(seq, _)| seq + 1);
    let segments = wal::read_from(&store.journal_dir, from)?;
    Ok(Tail { checkpoint, legacy, segments })
}

/// The first batch not yet covered by snapshots (0: none is).
fn read_checkpoint(store: &Store) -> StorageResult<u64> {
    read_batch_number(store, CHECKPOINT_KEY).map(Option::unwrap_or_default)
}

/// The first batch of the tail recovery indexes again (see [`REDO_KEY`]).
/// A node before the segment files kept no such mark: it flushed a
/// batch's indexes with the next batch and carried messages for 32
/// commits, so its last 33 batches.
pub fn read_redo_from(store: &Store, last: u64) -> StorageResult<u64> {
    Ok(read_batch_number(store, REDO_KEY)?.unwrap_or((last + 1).saturating_sub(LEGACY_REDO_BATCHES)))
}

fn read_batch_number(store: &Store, key: &[u8]) -> StorageResult<Option<u64>> {
    store
        .meta
        .get(key)?
        .map(|bytes| {
            let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                StorageError::Codec(format!("{} in the meta tree is not 8 bytes", String::from_utf8_lossy(key)))
            })?;
            Ok(u64::from_be_bytes(bytes))
        })
        .transpose()
}

/// Reads and decodes the parts of the sled tree's batches `from..=last`
/// on every core, each thread its share of the batches.
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

    fn views(batches: &[Batch]) -> Vec<BatchView<'_>> {
        batches.iter().map(|(seq, entries)| (*seq, entries.iter().map(EntryView::of).collect())).collect()
    }

    /// A store in a temporary directory (gone when the first part is
    /// dropped) and a node's metrics.
    fn fresh_store() -> (tempfile::TempDir, Store, Arc<Metrics>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        (dir, store, Arc::new(Metrics::new().expect("metrics")))
    }

    fn entry(n: u64) -> JournalEntry {
        JournalEntry {
            entity: format!("t/customer/c-{n}").into(),
            entity_seq: n,
            change: vec![n as u8],
            seen: Some((format!("t/event/e-{n}").into_bytes().into(), vec![1].into())),
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
                entity: e.entity.to_string(),
                entity_seq: e.entity_seq,
                change: e.change.clone(),
                seen: e.seen.as_ref().map(|(key, value)| (key.to_vec(), value.to_vec())),
                outbox: e.outbox.clone(),
                audit: e.audit.clone(),
            })
            .collect();
        assert_eq!(encode(&entries), encode(&plain));
        let read: Vec<PlainEntry> = decode(&encode(&entries)).expect("decodes as the old form");
        assert_eq!(read, plain);
        let back: Vec<JournalEntry> = decode(&encode(&plain)).expect("decodes the old form");
        assert_eq!(encode(&back), encode(&entries));
        // Recovery's borrowed view reads the same bytes, old form or new,
        // and in the fixed-width format a build before the current one
        // wrote, and gives back the entry whole.
        let mut fixed_width = vec![crate::storage::FIXED_WIDTH_VERSION];
        fixed_width.extend(bincode::serialize(&entries).expect("serialises"));
        assert!(encode(&entries).len() < fixed_width.len());
        for bytes in [encode(&entries), encode(&plain), fixed_width] {
            let views: Vec<EntryView<'_>> = decode(&bytes).expect("decodes as a view");
            let whole: Vec<JournalEntry> = views.iter().map(EntryView::to_entry).collect();
            assert_eq!(encode(&whole), encode(&entries));
        }
        let of: Vec<JournalEntry> = entries.iter().map(|entry| EntryView::of(entry).to_entry()).collect();
        assert_eq!(encode(&of), encode(&entries));

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
        let receiver = |m: &OutboxMessage| JournalEntry {
            seen: Some((receipt(m).into(), vec![1].into())),
            outbox: vec![],
            ..entry(2)
        };
        let commit = |indexer: &mut Indexer, store: &Store, entries: &[JournalEntry]| {
            let added = indexer.before_flush(store, entries, false).expect("before");
            added + indexer.index_derived(store, 0, &mut entries.to_vec()).expect("after")
        };
        // Carried for ever, unless a test says otherwise: no test depends
        // on how fast the machine is.
        let fresh = || {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path()).expect("open");
            (dir, store, Indexer { carry_for: Duration::MAX, ..Indexer::default() })
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
        // Applied within the time they may wait: not indexed, however many
        // commits came between.
        let unrelated = JournalEntry { outbox: vec![], ..entry(3) };
        let (_dir, store, mut indexer) = fresh();
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&cause)), 0);
        for _ in 0..100 {
            assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&unrelated)), 0);
        }
        assert_eq!(commit(&mut indexer, &store, &[receiver(&score), receiver(&contribution)]), 0);
        assert_eq!(indexer.finish(&store).expect("finish"), 0);
        assert!(store.outbox.get(score.storage_key()).expect("read").is_none());
        // Not applied by then: both wait in the outbox, and the receivers'
        // records are kept when they come.
        let (_dir, store, mut indexer) = fresh();
        indexer.carry_for = Duration::ZERO;
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&cause)), 0);
        assert_eq!(commit(&mut indexer, &store, std::slice::from_ref(&unrelated)), 2);
        assert_eq!(commit(&mut indexer, &store, &[receiver(&score)]), 0);
        assert!(store.outbox.get(score.storage_key()).expect("read").is_some());
        assert!(store.seen.get(receipt(&score)).expect("read").is_some());
        // Recovery knows the whole tail: a message applied anywhere in it
        // replays with its effect and needs no redelivery.
        let (_dir, store, _) = fresh();
        let tail: Vec<Batch> =
            vec![(0, vec![cause.clone()]), (1, vec![unrelated.clone()]), (2, vec![receiver(&contribution)])];
        let mut recovering = Indexer::recovering(&views(&tail), 0).expect("recovering");
        let added: i64 = tail.iter().map(|(_, entries)| commit(&mut recovering, &store, entries)).sum();
        assert_eq!(added + recovering.finish(&store).expect("finish"), 1, "only the score waits");
        assert!(store.outbox.get(score.storage_key()).expect("read").is_some());
        assert!(store.seen.get(receipt(&contribution)).expect("read").is_some());
        assert!(crate::outbox::is_receipt(&receipt(&score)) && !crate::outbox::is_receipt(b"t/event/e-1"));
        // Recovery cannot know whether the writer indexed a carried score in
        // a commit without entries, so it keeps every receiver's record.
        let (_dir, store, _) = fresh();
        let tail: Vec<Batch> = vec![(0, vec![cause.clone()]), (1, vec![receiver(&score)])];
        let mut recovering = Indexer::recovering(&views(&tail), 0).expect("recovering");
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

    #[test]
    fn the_redo_mark_stays_at_the_oldest_batch_that_may_still_carry_messages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let mut indexer = Indexer { carry_for: Duration::MAX, ..Indexer::default() };
        let mut commit = |batch: u64, entries: &[JournalEntry]| {
            indexer.before_flush(&store, entries, false).expect("before");
            indexer.index_derived(&store, batch, &mut entries.to_vec()).expect("after");
            indexer.redo_from(batch + 1)
        };
        let unrelated = JournalEntry { outbox: vec![], ..entry(3) };
        assert_eq!(commit(5, std::slice::from_ref(&unrelated)), 6, "nothing carried");
        let cause = entry(1);
        assert_eq!(commit(6, std::slice::from_ref(&cause)), 6, "batch 6 carries its score");
        assert_eq!(commit(7, std::slice::from_ref(&unrelated)), 6);
        // Everything indexed (a checkpoint, a settle): nothing to redo.
        indexer.before_flush(&store, &[], true).expect("all");
        assert_eq!(indexer.redo_from(8), 8);
    }

    #[tokio::test]
    async fn a_record_is_found_from_its_submission_on_and_indexed_once_its_batch_is_durable() {
        let (_dir, store, metrics) = fresh_store();
        // Messages are carried for no time at all: a commit with entries
        // indexes what the commits before it left unapplied.
        let (journal, thread) = Journal::start_with(
            store.clone(),
            metrics.clone(),
            0,
            Duration::from_secs(60),
            wal::SEGMENT_BYTES,
            Duration::ZERO,
        )
        .expect("start");
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
        // Indexed and released once durable, in the commit's work on sled
        // (the writer answers a marker after that).
        journal.marker().await.expect("marker");
        assert!(store.seen.get(b"t/event/e-49").expect("read").is_some());
        assert_eq!(store.seen.stats().pending_records, 0);
        // No receiver applied the messages: carried until a commit with
        // entries after their own, then they wait in the outbox. (The
        // writer may have split the fifty over two commits; the last one
        // is still carried.)
        assert!(store.outbox.get(message(49).storage_key()).expect("read").is_none());
        let ticket = journal.submit(JournalEntry { outbox: vec![], ..entry(100) }).expect("open");
        journal.durable(ticket).await.expect("durable");
        // A commit's work on sled is done once a marker sent after it is
        // answered.
        journal.marker().await.expect("marker");
        assert!(store.outbox.get(message(49).storage_key()).expect("read").is_some());
        assert_eq!(metrics.outbox_backlog.get(), 50);
        assert!(store.outbox.get(message(3).storage_key()).expect("read").is_some());
        journal.outbox_ack(vec![message(3).storage_key()]).expect("open");
        let marker = journal.marker().await.expect("marker");
        assert_eq!(metrics.outbox_backlog.get(), 49);
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!(checkpoint, 0);
        let replayed: usize = batches.iter().map(|(_, entries)| entries.len()).sum();
        assert_eq!(replayed, 51);
        journal.checkpoint(marker, Pace::AtOnce).await.expect("checkpoint");
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!((checkpoint, batches.len()), (marker, 0));
        trimmed_then_stopped(journal.clone(), thread, &store, marker).await;
        assert!(journal.submit(entry(99)).is_err(), "closed journal refuses entries");
    }

    #[test]
    fn batches_a_node_before_the_segments_left_in_sled_are_read_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        // Batch 7 in parts, batch 8 under its 8-byte key alone (nodes
        // before parts), as earlier nodes wrote them.
        let batch: Vec<JournalEntry> = (0..50).map(entry).collect();
        for (part, entries) in batch.chunks(20).enumerate() {
            store.journal.insert(part_key(7, part).expect("key"), encode(entries)).expect("insert");
        }
        store.journal.insert(8u64.to_be_bytes(), encode(&vec![entry(1_000)])).expect("insert");
        // Then this node's segments, from batch 9 on.
        let mut appender = wal::Appender::open(&store.journal_dir, 9).expect("open");
        for seq in 9..11 {
            let mut record = Vec::new();
            wal::begin_record(&mut record);
            crate::storage::encode_into(&mut record, &vec![entry(seq)]);
            wal::seal_record(&mut record, seq).expect("sealed");
            appender.append(seq, &record).expect("append");
        }
        appender.sync().expect("sync");
        store.meta.insert(CHECKPOINT_KEY, &7u64.to_be_bytes()).expect("insert");
        let (checkpoint, batches) = read_tail(&store).expect("tail");
        assert_eq!(checkpoint, 7);
        let seqs: Vec<u64> = batches.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, vec![7, 8, 9, 10]);
        let first: Vec<u64> = batches[0].1.iter().map(|entry| entry.entity_seq).collect();
        assert_eq!(first, (0..50).collect::<Vec<_>>());
        assert_eq!(batches[3].1[0].entity_seq, 10);
    }

    #[test]
    fn snapshots_go_a_slice_per_commit_and_a_checkpoint_moves_once_those_before_it_are_written() {
        let (_dir, store, metrics) = fresh_store();
        let appender = wal::Appender::open(&store.journal_dir, 0).expect("open");
        let mut writer =
            Writer::new(store.clone(), appender, metrics, Shared::new(), 0, Duration::from_secs(60)).expect("writer");
        writer.commit_now(vec![(1, Op::Entry(JournalEntry { outbox: vec![], ..entry(0) }))]);
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
        ops.push((0, Op::Checkpoint { upto: 1, pace: Pace::AtOnce, done }));
        let (barrier_op, mut barrier_written) = barrier();
        ops.push(barrier_op);
        writer.commit_now(ops);
        assert_eq!(store.snapshots.len(), SNAPSHOT_SLICE, "one slice per commit");
        assert!(!checkpointed(&store) && checkpoint.try_recv().is_err());
        assert!(before.iter_mut().take(SNAPSHOT_SLICE).all(|w| w.try_recv().is_ok()));
        assert!(before[SNAPSHOT_SLICE].try_recv().is_err(), "not written, not told so");
        // Snapshots keep coming after the checkpoint: it does not wait for
        // them, only for the ten before it.
        let (ops, _after): (Vec<_>, Vec<_>) = (1_000..1_000 + SNAPSHOT_SLICE).map(snapshot).unzip();
        writer.commit_now(ops);
        assert_eq!(store.snapshots.len(), 2 * SNAPSHOT_SLICE);
        assert!(!writer.snapshots.is_empty());
        assert!(before.iter_mut().skip(SNAPSHOT_SLICE).all(|w| w.try_recv().is_ok()));
        // The checkpoint thread records it, then answers, once the
        // segments below it are gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        let heard = loop {
            match checkpoint.try_recv() {
                Ok(()) => break true,
                Err(_) if deadline < Instant::now() => break false,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert!(heard, "its waiter hears it moved");
        assert!(checkpointed(&store));
        assert_eq!(read_checkpoint(&store).expect("read"), 1);
        // The barrier fires in the commit that reaches it, and costs no
        // room in the slice.
        assert!(barrier_written.try_recv().is_ok());
        let (mut ops, _more): (Vec<_>, Vec<_>) = (2_000..2_000 + SNAPSHOT_SLICE).map(snapshot).unzip();
        let (barrier_op, mut last_barrier) = barrier();
        ops.push(barrier_op);
        writer.commit_now(ops);
        assert!(last_barrier.try_recv().is_err(), "behind ten snapshots still");
        writer.commit_now(Vec::new());
        assert!(last_barrier.try_recv().is_ok() && writer.snapshots.is_empty());
        assert_eq!(store.snapshots.len(), 3 * SNAPSHOT_SLICE + 10);
    }

    impl Writer {
        /// A commit and its work on sled at once (tests look at both).
        fn commit_now(&mut self, ops: Vec<(Ticket, Op)>) {
            let mut deferred = None;
            self.commit(ops, &mut deferred).expect("commit");
            self.apply(deferred.expect("a commit leaves its work on sled")).expect("apply");
        }
    }

    /// Waits (up to half a minute: the writer paces itself while entries
    /// came in recently) until the sled tree's old batches are gone on
    /// their own, checks that they are and that no segment below
    /// `checkpoint` is left, and stops the writer.
    async fn trimmed_then_stopped(
        journal: Journal,
        thread: std::thread::JoinHandle<()>,
        store: &Store,
        checkpoint: u64,
    ) {
        for _ in 0..3_000 {
            if store.journal.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(store.journal.is_empty());
        let segments = wal::segments(&store.journal_dir).expect("list");
        assert!(segments.windows(2).all(|pair| checkpoint < pair[1]), "{segments:?} below {checkpoint}");
        journal.close();
        thread.join().expect("writer exits cleanly");
    }

    #[tokio::test]
    async fn old_batches_go_once_a_checkpoint_covers_them_and_after_a_crash_too() {
        let (_dir, store, metrics) = fresh_store();
        // Segments of 160 bytes: a few batches each.
        let (journal, thread) =
            Journal::start_with(store.clone(), metrics.clone(), 0, Duration::from_secs(60), 160, CARRY_FOR)
                .expect("start");
        let batches = 40;
        for n in 0..batches {
            let ticket = journal.submit(JournalEntry { outbox: vec![], ..entry(n) }).expect("open");
            journal.durable(ticket).await.expect("durable");
        }
        assert!(10 < wal::segments(&store.journal_dir).expect("list").len());
        let marker = journal.marker().await.expect("marker");
        assert_eq!(marker, batches);
        journal.checkpoint(marker, Pace::AtOnce).await.expect("checkpoint");
        // Once the checkpoint has moved, and is durable, the segments below
        // it are gone.
        let segments = wal::segments(&store.journal_dir).expect("list");
        assert_eq!(segments.len(), 1, "{segments:?}");
        let (checkpoint, tail) = read_tail(&store).expect("tail");
        assert_eq!((checkpoint, tail.len()), (marker, 0));
        trimmed_then_stopped(journal, thread, &store, marker).await;
        // A crash after the checkpoint moved and before the batches a node
        // before the segments kept in sled went: the next writer deletes
        // them, a slice at most per commit, with or without entries.
        let legacy = TRIM_SLICE as u64 + 44;
        for seq in 0..legacy {
            store.journal.insert(seq.to_be_bytes(), encode(&Vec::<JournalEntry>::new())).expect("insert");
        }
        store.meta.insert(CHECKPOINT_KEY, &legacy.to_be_bytes()).expect("insert");
        let (journal, thread) = Journal::start(store.clone(), metrics, legacy, Duration::from_secs(60)).expect("start");
        trimmed_then_stopped(journal, thread, &store, legacy).await;
    }

    #[tokio::test]
    async fn a_writer_that_fails_answers_every_waiter_with_an_error() {
        let (_dir, store, metrics) = fresh_store();
        let (journal, thread) =
            Journal::start_with(store.clone(), metrics, 0, Duration::from_secs(60), 256, CARRY_FOR).expect("start");
        let ticket = journal.submit(JournalEntry { outbox: vec![], ..entry(0) }).expect("open");
        journal.durable(ticket).await.expect("durable");
        // The next segment cannot be created: the commit that needs one
        // fails, and the writer with it.
        std::fs::remove_dir_all(&store.journal_dir).expect("remove");
        let mut failed = None;
        for n in 1..100 {
            let Ok(ticket) = journal.submit(JournalEntry { outbox: vec![], ..entry(n) }) else { break };
            if let Err(error) = journal.durable(ticket).await {
                failed = Some(error.to_string());
                break;
            }
        }
        let failed = failed.expect("a commit failed");
        assert!(failed.contains("storage failed"), "{failed}");
        thread.join().expect("the writer's thread ends");
        // Whatever was queued or is asked now gets an error, not a wait.
        assert!(journal.failed());
        assert!(journal.submit(entry(200)).is_err());
        assert!(journal.marker().await.is_err());
        assert!(journal.settle().await.is_err());
        assert!(journal.snapshots_written().is_err());
    }

    #[test]
    fn a_writer_that_stops_other_than_cleanly_drops_what_was_queued() {
        let shared = Shared::new();
        let (reply, answer) = oneshot::channel();
        shared.queue.lock().ops.push((0, Op::Marker(reply)));
        // A panic in the writer unwinds through the same guard.
        drop(Stop { shared: shared.clone(), clean: false });
        assert!(answer.blocking_recv().is_err(), "the waiter is answered");
        assert!(shared.queue.lock().closed && shared.durable.borrow().failed);
        // A clean stop leaves both alone (the writer drained the queue).
        let shared = Shared::new();
        drop(Stop { shared: shared.clone(), clean: true });
        assert!(!shared.queue.lock().closed && !shared.durable.borrow().failed);
    }

    #[tokio::test]
    async fn queued_entries_wait_for_someone_to_await_them_then_go_in_one_commit() {
        let (_dir, store, metrics) = fresh_store();
        let (journal, thread) =
            Journal::start(store.clone(), metrics.clone(), 0, Duration::from_secs(60)).expect("start");
        let commits = || metrics.journal_batch_entries.get_sample_count();
        let tickets: Vec<Ticket> = (0..5).map(|n| journal.submit(entry(n)).expect("open")).collect();
        // Queued, not committed: nobody has asked (the writer had time to
        // take them, had they woken it).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((commits(), journal.durable_ticket()), (0, 0));
        // Awaiting the third asks for a commit; the one that comes carries
        // all five.
        journal.durable(tickets[2]).await.expect("durable");
        assert_eq!(journal.durable_ticket(), tickets[4]);
        // (The flusher publishes durability; the writer counts the commit
        // after it, and answers a marker after that.)
        journal.marker().await.expect("marker");
        assert_eq!((commits(), metrics.journal_batch_entries.get_sample_sum()), (1, 5.0));
        // Its record's bytes, framing included, are counted.
        let mut record = Vec::new();
        wal::begin_record(&mut record);
        crate::storage::encode_into(&mut record, &(0..5).map(entry).collect::<Vec<_>>());
        wal::seal_record(&mut record, 1).expect("sealed");
        assert_eq!(metrics.journal_bytes.get(), record.len() as u64);
        // An awaited ticket that is durable already asks for nothing.
        journal.durable(tickets[0]).await.expect("durable");
        let later = journal.submit(entry(5)).expect("open");
        // Any operation other than an entry asks at once, and takes the
        // queued entry along.
        journal.marker().await.expect("marker");
        assert_eq!(commits(), 2);
        journal.durable(later).await.expect("already durable");
        journal.close();
        thread.join().expect("the writer stops");
    }

    #[tokio::test]
    async fn a_commit_wakes_only_the_waiters_its_batch_covers() {
        use futures_util::FutureExt as _;
        let shared = Shared::new();
        let mut waiting: Vec<_> = (1..=4).map(|ticket| Box::pin(shared.durable_at(ticket))).collect();
        for waiter in &mut waiting {
            assert!(waiter.as_mut().now_or_never().is_none(), "nothing is durable yet");
        }
        shared.made_durable(2);
        let mut after: Vec<_> = waiting.iter_mut().map(|waiter| waiter.as_mut().now_or_never()).collect();
        assert!(matches!(after[0], Some(Ok(()))) && matches!(after[1], Some(Ok(()))), "{after:?}");
        assert!(after[2].is_none() && after[3].is_none(), "{after:?}");
        assert_eq!(shared.waiters.lock().len(), 2, "tickets 3 and 4 still wait, and only they");
        // A ticket already durable needs no wait; a failure answers the rest.
        assert!(shared.durable_at(2).now_or_never().is_some_and(|r| r.is_ok()));
        shared.fail();
        after = waiting.drain(2..).map(|mut waiter| waiter.as_mut().now_or_never()).collect();
        for answer in after {
            let error = answer.expect("answered at once").expect_err("the storage failed");
            assert!(error.to_string().contains("storage failed"), "{error}");
        }
        assert!(shared.waiters.lock().is_empty());
        assert!(shared.durable_at(5).now_or_never().is_some_and(|r| r.is_err()), "no wait once failed");
    }
}
