//! Virtual actors: one actix actor per entity, activated on its first
//! message, passivated after an idle time.
//!
//! [`EntityActor`] is the thin shell the architecture asks for, generic over
//! an [`Entity`] (customer, wheel, jackpot, leaderboard): it loads the
//! entity's snapshot, answers retries from the idempotency record, calls the
//! entity's pure handler, hands the journal entry to the writer and replies
//! with a [`Ticket`]. It never waits for the flush, or for another actor,
//! while holding its turn: the caller (the service layer) waits for the
//! ticket before it answers the client.
//!
//! [`Registry`] finds or activates the actor of a key. An actor that has
//! been idle long enough writes its snapshot, waits until the writer has it,
//! removes itself from the registry and stops; a message that raced with
//! that finds a closed mailbox and the registry retries it on a fresh
//! activation, which loads the snapshot just written.

use crate::error::{Code, ServiceError, ServiceResult};
use crate::journal::{Journal, JournalEntry, KeyValue, Snapshot, Ticket};
use crate::storage::{decode, encode, SharedBytes, StorageResult, Store};
use crate::FastMap;
use actix::prelude::*;
use bazaar_cluster::{EntityKey, EntityKind};
use bazaar_games::UnixMillis;
use bazaar_observability::Metrics;
use parking_lot::Mutex;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// What every actor of a node shares.
pub struct NodeShared {
    pub store: Store,
    pub journal: Journal,
    pub metrics: Arc<Metrics>,
    /// An actor idle this long is passivated.
    pub idle_timeout: Duration,
    /// An active actor writes a snapshot after this many entries.
    pub snapshot_every: u32,
    /// Snapshots recovery has not written yet.
    pub recovered: crate::recovery::Recovered,
}

/// The idempotency key of a command: retries with the same scope and id get
/// the first answer; a different fingerprint under the same id is a
/// conflict.
#[derive(Clone, Debug)]
pub struct Dedupe<'a> {
    pub scope: &'static str,
    pub id: &'a str,
    pub fingerprint: u64,
}

/// What the entity's handler decided.
pub struct Handled<A> {
    pub answer: A,
    /// Whether the state changed (and the journal must record it).
    pub changed: bool,
    /// Whether the answer is the idempotency record of the command.
    pub remember: bool,
    /// The journal's record of the change when it is not the whole state.
    pub op: Option<Vec<u8>>,
    pub outbox: Vec<KeyValue>,
    pub audit: Vec<KeyValue>,
}

impl<A> Handled<A> {
    /// An answer that changed nothing.
    pub fn read(answer: A) -> Self {
        Self { answer, changed: false, remember: false, op: None, outbox: Vec::new(), audit: Vec::new() }
    }

    /// An answer to a change.
    pub fn changed(answer: A) -> Self {
        Self { answer, changed: true, remember: true, op: None, outbox: Vec::new(), audit: Vec::new() }
    }
}

/// What a handler may use besides the state.
pub struct Env<'a> {
    pub key: &'a EntityKey,
    rng: &'a mut Option<Box<ChaCha20Rng>>,
    pub now: UnixMillis,
    pub metrics: &'a Metrics,
}

impl<'a> Env<'a> {
    /// The environment of one command of the entity `key`, whose generator
    /// (none until first used) is `rng`.
    pub fn new(
        key: &'a EntityKey,
        rng: &'a mut Option<Box<ChaCha20Rng>>,
        now: UnixMillis,
        metrics: &'a Metrics,
    ) -> Self {
        Self { key, rng, now, metrics }
    }

    /// The entity's own CSPRNG, seeded from the OS on first use: customers
    /// never draw, and a million of them need not carry a generator each.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        self.rng.get_or_insert_with(|| Box::new(ChaCha20Rng::from_entropy()))
    }
}

/// An entity kind, as the actor shell sees it.
pub trait Entity: Sized + Unpin + 'static {
    const KIND: EntityKind;
    type State: Serialize + DeserializeOwned + Default + Send + Unpin + 'static;
    type Command: Send + 'static;
    type Answer: Serialize + DeserializeOwned + Clone + Send + 'static;

    /// The command's idempotency key, if it has one.
    fn dedupe(command: &Self::Command) -> Option<Dedupe<'_>>;

    /// Applies a command. On `Err` the state must be unchanged: handlers
    /// check everything before they change anything.
    fn handle(
        state: &mut Self::State,
        env: &mut Env<'_>,
        command: Self::Command,
    ) -> ServiceResult<Handled<Self::Answer>>;

    /// How many changes an active entity applies between snapshots, given
    /// the configured number. Entities whose journal entries are operations
    /// on a large state (leaderboards) override it: their snapshots are
    /// costly, and checkpoints and passivation take them anyway.
    fn snapshot_every(configured: u32) -> u32 {
        configured
    }

    /// Whether a journaled change is the whole new state, encoded as a
    /// snapshot's state is (recovery then keeps only the last one).
    /// Entities that journal operations say no and implement `replay`.
    const JOURNALS_STATE: bool = true;

    /// Applies journaled changes, in order, during recovery. By default a
    /// change is the whole new state, so the last one is.
    fn replay(state: &mut Self::State, changes: &[&[u8]]) -> StorageResult<()> {
        if let Some(last) = changes.last() {
            *state = decode(last)?;
        }
        Ok(())
    }

    /// Writes what the idempotency record keeps of `answer` into `buffer`,
    /// as [`crate::storage::encode_into`] does: by default the answer
    /// itself. An entity whose answers carry what their record can leave
    /// out (or make again from its key) writes less, and
    /// [`Entity::recalled`] makes the answer again from it.
    fn encode_record(buffer: &mut Vec<u8>, answer: &Self::Answer) {
        crate::storage::encode_into(buffer, answer);
    }

    /// The answer a retry of the command `dedupe`, to the entity `key`,
    /// gets from what [`Entity::encode_record`] kept of the first one.
    fn recalled(answer: Self::Answer, _key: &EntityKey, _dedupe: &Dedupe<'_>) -> ServiceResult<Self::Answer> {
        Ok(answer)
    }
}

/// What a message carries, taken by the actor that handles it. A send that
/// meets an actor that has just stopped finds it still there and hands it
/// to the next activation, so no send copies its commands.
pub type Parcel<T> = Arc<Mutex<Option<T>>>;

/// A request to an entity.
pub struct Request<E: Entity>(pub Parcel<E::Command>);

/// The actor's reply: the answer, whether it is a retry's, and the ticket
/// to wait for before the answer may leave the node.
pub struct Reply<A> {
    pub answer: A,
    pub duplicate: bool,
    pub ticket: Option<Ticket>,
}

impl<E: Entity> Message for Request<E> {
    type Result = Result<Reply<E::Answer>, ServiceError>;
}

/// Several requests to one entity, applied in order in one turn of its
/// actor; each gets its own reply. Batched ingestion sends a customer's
/// events, and a jackpot's or a leaderboard's deliveries, this way: one
/// mailbox message instead of one per event.
pub struct Requests<E: Entity>(pub Parcel<Vec<E::Command>>);

impl<E: Entity> Message for Requests<E> {
    type Result = Vec<Result<Reply<E::Answer>, ServiceError>>;
}

/// Commands sent with [`Registry::tell_each`]: applied in order, as
/// [`Requests`] are, with no reply. The permit (one per command) goes back
/// to its semaphore once they are applied: it bounds how many told
/// commands wait in mailboxes.
///
/// A message dropped before its actor took the commands (a send to an
/// actor that stopped as it was sent, the mailbox of an actor that
/// passivated dropped with it) sends them again to a fresh activation,
/// as [`Registry::call_each`] does with a request: a score must not wait
/// for the outbox's redelivery, seconds later, when a read of its board
/// sent after the event's answer should see it.
pub struct Told<E: Entity> {
    entity: EntityKey,
    commands: Vec<E::Command>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    registry: Weak<Registry<E>>,
    /// Activations it met stopped.
    attempts: usize,
}

impl<E: Entity> Told<E> {
    /// Commands for `entity`, counted in `registry`'s
    /// [`Registry::told_pending`] until an actor takes them or they are
    /// given up.
    fn new(
        registry: &Registry<E>,
        entity: EntityKey,
        commands: Vec<E::Command>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        attempts: usize,
    ) -> Self {
        registry.told.fetch_add(commands.len(), Ordering::Relaxed);
        Self { entity, commands, permit, registry: registry.this.clone(), attempts }
    }

    /// The commands, no longer pending: taken by the actor, or given up.
    fn take(&mut self) -> Vec<E::Command> {
        let commands = std::mem::take(&mut self.commands);
        if let Some(registry) = self.registry.upgrade() {
            registry.told.fetch_sub(commands.len(), Ordering::Relaxed);
        }
        commands
    }
}

impl<E: Entity> Drop for Told<E> {
    fn drop(&mut self) {
        // The handler takes the commands: applied, or refused.
        if self.commands.is_empty() {
            return;
        }
        let commands = self.take();
        let Some(registry) = self.registry.upgrade() else { return };
        // Stopping (its journal closed, its actors' threads ending) or
        // failed: no activation could apply them; the outbox has them.
        let journal = &registry.node.journal;
        if ACTIVATION_ATTEMPTS <= self.attempts || journal.closed() || journal.failed() {
            tracing::debug!(entity = %self.entity, attempts = self.attempts, "told commands not applied");
            return;
        }
        registry.forget_stopped(&self.entity);
        let again = Told::new(&registry, self.entity.clone(), commands, self.permit.take(), self.attempts + 1);
        registry.tell(again);
    }
}

impl<E: Entity> Message for Told<E> {
    type Result = ();
}

/// An entity and the commands sent to it as one [`Requests`] message.
pub type Call<C> = (EntityKey, Vec<C>);

/// Write a snapshot now; the receiver fires once it is written.
pub struct SnapshotNow;

impl Message for SnapshotNow {
    type Result = Option<tokio::sync::oneshot::Receiver<()>>;
}

/// The stored idempotency record.
#[derive(Serialize, Deserialize)]
struct SeenValue {
    fingerprint: u64,
    #[serde(with = "serde_bytes")]
    answer: Vec<u8>,
}

/// A `SeenValue { fingerprint, answer }` in the fixed-width format
/// (`storage::FIXED_WIDTH_VERSION`), `answer` being what `encode_answer`
/// writes (as `storage::encode_into` does: [`Entity::encode_record`]),
/// built in a buffer the thread keeps and copied once into the shared
/// record: the answer is encoded in place, its length written in the slot
/// left for it, instead of into a buffer of its own that is then copied
/// (twice per event). `decode` reads it as any other value; the answer
/// inside is in the current format.
fn seen_value(fingerprint: u64, encode_answer: impl FnOnce(&mut Vec<u8>)) -> SharedBytes {
    // Version, fingerprint, the answer's length, then the answer as
    // `encode` writes it (its own version byte, then bincode).
    const ANSWER_AT: usize = 1 + 8 + 8;
    crate::storage::with_buffer(|bytes| {
        bytes.push(crate::storage::FIXED_WIDTH_VERSION);
        bytes.extend_from_slice(&fingerprint.to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        encode_answer(bytes);
        let length = (bytes.len() - ANSWER_AT) as u64;
        bytes[ANSWER_AT - 8..ANSWER_AT].copy_from_slice(&length.to_le_bytes());
        SharedBytes::from(&bytes[..])
    })
}

pub struct EntityActor<E: Entity> {
    key: EntityKey,
    /// `tenant/kind/id`, the key of its snapshot and its journal entries.
    storage_key: Arc<str>,
    state: E::State,
    /// Entries applied since the entity was created.
    entity_seq: u64,
    entries_since_snapshot: u32,
    node: Arc<NodeShared>,
    registry: Weak<Registry<E>>,
    /// The entity's own CSPRNG, seeded from the OS when first needed.
    rng: Option<Box<ChaCha20Rng>>,
    last_active: Instant,
    passivating: bool,
    /// Set when a journal submission failed: the state holds a change the
    /// journal does not, so nothing more may be applied to it.
    stopping: bool,
}

impl<E: Entity> Actor for EntityActor<E> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.watch_idle(ctx, self.node.idle_timeout);
    }
}

impl<E: Entity> EntityActor<E> {
    /// The idempotency record's key, `tenant/scope/id`, built in place.
    fn seen_key(&self, dedupe: &Dedupe<'_>) -> SharedBytes {
        crate::storage::shared_key(&[&self.key.tenant, dedupe.scope, dedupe.id])
    }

    /// Looks after `after` whether the actor has been idle for the idle
    /// timeout, and passivates it then. One timer at a time per actor, set
    /// for when it could be idle at the earliest: a tick every few seconds
    /// in each of a hundred thousand live actors woke them twenty thousand
    /// times a second.
    fn watch_idle(&self, ctx: &mut Context<Self>, after: Duration) {
        ctx.run_later(after, |actor, ctx| {
            let (idle, timeout) = (actor.last_active.elapsed(), actor.node.idle_timeout);
            if idle < timeout {
                actor.watch_idle(ctx, timeout - idle);
            } else if actor.node.journal.snapshots_waiting() {
                // Not while a checkpoint's snapshots are being written: its
                // own would wait behind them, and its mailbox with it.
                actor.watch_idle(ctx, (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)));
            } else {
                actor.passivate(ctx);
            }
        });
    }

    fn duplicate(&self, dedupe: &Dedupe<'_>, seen_key: &[u8]) -> ServiceResult<Option<Reply<E::Answer>>> {
        // A pending record comes with the ticket its answer waits for.
        let Some((bytes, ticket)) = self.node.store.seen.lookup(seen_key)? else {
            return Ok(None);
        };
        let SeenValue { fingerprint, answer } = decode(&bytes)?;
        if fingerprint != dedupe.fingerprint {
            return Err(ServiceError {
                code: Code::IdempotencyConflict,
                field: None,
                message: format!(
                    "{} {:?} was already used with a different request; use a new id for a new request",
                    dedupe.scope, dedupe.id
                ),
                reason: None,
            });
        }
        Ok(Some(Reply { answer: E::recalled(decode(&answer)?, &self.key, dedupe)?, duplicate: true, ticket }))
    }

    fn snapshot(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.entries_since_snapshot = 0;
        let snapshot = Snapshot { entity_seq: self.entity_seq, state: encode(&self.state) };
        self.node.journal.snapshot(self.storage_key.as_bytes().to_vec(), &snapshot).ok()
    }

    /// Snapshot, wait until it is written, leave the registry, stop.
    fn passivate(&mut self, ctx: &mut Context<Self>) {
        if self.passivating {
            return;
        }
        self.passivating = true;
        // Unchanged since its last snapshot (or since activation from one):
        // nothing to write (a million customers going idle together wrote a
        // million unchanged snapshots before this), but the last one may
        // still wait in the writer's queue, and the next activation reads
        // what is written.
        let written = match self.entries_since_snapshot {
            0 => self.node.journal.snapshots_written().ok(),
            _ => self.snapshot(),
        };
        let leave = fut::wrap_future::<_, Self>(async move {
            if let Some(written) = written {
                let _ = written.await;
            }
        })
        .map(|(), actor, ctx| {
            if let Some(registry) = actor.registry.upgrade() {
                registry.remove(&actor.key, &ctx.address());
            }
            ctx.stop();
        });
        ctx.wait(leave);
    }
}

impl<E: Entity> Handler<Request<E>> for EntityActor<E> {
    type Result = Result<Reply<E::Answer>, ServiceError>;

    fn handle(&mut self, Request(parcel): Request<E>, ctx: &mut Self::Context) -> Self::Result {
        let Some(command) = parcel.lock().take() else {
            return Err(ServiceError::internal("a request reached its entity twice"));
        };
        self.last_active = Instant::now();
        self.apply(command, ctx)
    }
}

impl<E: Entity> Handler<Requests<E>> for EntityActor<E> {
    type Result = Vec<Result<Reply<E::Answer>, ServiceError>>;

    fn handle(&mut self, Requests(parcel): Requests<E>, ctx: &mut Self::Context) -> Self::Result {
        // Taken twice is impossible; the caller would answer each command
        // with an error for a missing reply.
        let commands = parcel.lock().take().unwrap_or_default();
        self.last_active = Instant::now();
        commands.into_iter().map(|command| self.apply(command, ctx)).collect()
    }
}

impl<E: Entity> Handler<Told<E>> for EntityActor<E> {
    type Result = ();

    fn handle(&mut self, mut told: Told<E>, ctx: &mut Self::Context) {
        self.last_active = Instant::now();
        // Taken, so that dropping the message (and its permit, once they
        // are applied) does not send them again.
        for command in told.take() {
            if let Err(error) = self.apply(command, ctx) {
                tracing::debug!(entity = %self.key, %error, "a command sent without a reply was refused");
            }
        }
    }
}

impl<E: Entity> EntityActor<E> {
    /// Applies one command: answers a retry from the idempotency record,
    /// or runs the handler and hands the change to the journal writer.
    fn apply(&mut self, command: E::Command, ctx: &mut Context<Self>) -> Result<Reply<E::Answer>, ServiceError> {
        if self.stopping {
            return Err(ServiceError::unavailable(format!("{} is restarting; retry", self.key)));
        }
        // Its state may hold changes whose commit failed, and one activated
        // since from its snapshot lacks the entries only the journal holds
        // until a restart replays them: once storage has failed, nothing
        // answers, reads included.
        if self.node.journal.failed() {
            return Err(crate::journal::storage_failed().into());
        }
        // The idempotency record's key and the request's fingerprint.
        let dedupe = match E::dedupe(&command) {
            Some(dedupe) => {
                let seen_key = self.seen_key(&dedupe);
                if let Some(reply) = self.duplicate(&dedupe, &seen_key)? {
                    return Ok(reply);
                }
                Some((seen_key, dedupe.fingerprint))
            }
            None => None,
        };
        let mut env = Env::new(&self.key, &mut self.rng, now_millis(), &self.node.metrics);
        let handled = E::handle(&mut self.state, &mut env, command)?;
        if !handled.changed {
            return Ok(Reply { answer: handled.answer, duplicate: false, ticket: None });
        }
        self.entity_seq += 1;
        let seen = match dedupe {
            Some((seen_key, fingerprint)) if handled.remember => {
                Some((seen_key, seen_value(fingerprint, |bytes| E::encode_record(bytes, &handled.answer))))
            }
            _ => None,
        };
        let entry = JournalEntry {
            entity: self.storage_key.clone(),
            entity_seq: self.entity_seq,
            change: handled.op.unwrap_or_else(|| encode(&self.state)),
            seen,
            outbox: handled.outbox,
            audit: handled.audit,
        };
        let ticket = match self.node.journal.submit(entry) {
            Ok(ticket) => ticket,
            Err(error) => {
                // The change is in memory only: drop this activation so the
                // next one starts from what storage holds, and refuse the
                // rest of its mailbox (and of its batch).
                if let Some(registry) = self.registry.upgrade() {
                    registry.remove(&self.key, &ctx.address());
                }
                self.stopping = true;
                ctx.stop();
                return Err(error.into());
            }
        };
        self.entries_since_snapshot += 1;
        if E::snapshot_every(self.node.snapshot_every) <= self.entries_since_snapshot {
            self.snapshot();
        }
        Ok(Reply { answer: handled.answer, duplicate: false, ticket: Some(ticket) })
    }
}

impl<E: Entity> Handler<SnapshotNow> for EntityActor<E> {
    type Result = Option<tokio::sync::oneshot::Receiver<()>>;

    fn handle(&mut self, _: SnapshotNow, _: &mut Self::Context) -> Self::Result {
        // Unchanged since its last snapshot (or since activation from one):
        // the stored snapshot already covers every entry of this entity.
        if self.entries_since_snapshot == 0 {
            return None;
        }
        self.snapshot()
    }
}

/// The address of an active actor, shared by every sender.
type Shared<E> = Arc<Addr<EntityActor<E>>>;

/// The actors of one kind known to one shard of a registry.
type Actors<E> = FastMap<EntityKey, Shared<E>>;

/// The actors of one entity kind on this node.
pub struct Registry<E: Entity> {
    /// Shared, not cloned: see [`Registry::send_now`]. In
    /// [`REGISTRY_SHARDS`] maps, each under its own lock, by the key's
    /// hash: a map grows by rehashing every entry, under its lock, and one
    /// map of 57,000 customers took 26 ms to, while every request for a
    /// customer waited (and a new customer's snapshot is read from sled
    /// under it).
    actors: Box<[Mutex<Actors<E>>]>,
    /// Picks an entity's shard (fixed, so that it is the same every time).
    sharding: foldhash::fast::FixedState,
    node: Arc<NodeShared>,
    /// The threads actors run on; an entity always lands on the same one.
    arbiters: Vec<ArbiterHandle>,
    this: Weak<Registry<E>>,
    /// Told commands no actor has taken yet (see [`Told`]).
    told: AtomicUsize,
}

/// Shards of a registry's map (a power of two).
const REGISTRY_SHARDS: usize = 64;

/// Actors a checkpoint asks for their snapshot at once: asked one by one,
/// each waited its turn behind the requests in its mailbox, and a hundred
/// thousand changed customers took ten seconds.
const SNAPSHOT_ASKS: usize = 256;

/// A send's outcome, as [`Registry::answered`] reads it.
enum Sent<A> {
    Answered(A),
    /// The actor had stopped without taking the parcel.
    Again,
}

/// How often a request is retried when it meets an actor that just stopped.
const ACTIVATION_ATTEMPTS: usize = 8;

impl<E: Entity> Registry<E> {
    pub fn new(node: Arc<NodeShared>, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        assert!(!arbiters.is_empty(), "a node runs actors on at least one arbiter");
        Arc::new_cyclic(|this| Self {
            actors: (0..REGISTRY_SHARDS).map(|_| Mutex::new(FastMap::default())).collect(),
            sharding: foldhash::fast::FixedState::default(),
            node,
            arbiters,
            this: this.clone(),
            told: AtomicUsize::new(0),
        })
    }

    /// The shard of the registry's map that holds `entity`.
    fn shard_of(&self, entity: &EntityKey) -> usize {
        std::hash::BuildHasher::hash_one(&self.sharding, entity) as usize % REGISTRY_SHARDS
    }

    fn shard(&self, entity: &EntityKey) -> &Mutex<Actors<E>> {
        &self.actors[self.shard_of(entity)]
    }

    /// Sends `command` to the entity's actor, activating it if needed.
    pub async fn call(&self, entity: &EntityKey, command: E::Command) -> ServiceResult<Reply<E::Answer>> {
        self.send(entity, Arc::new(Mutex::new(Some(command))), Request::<E>).await?
    }

    /// Sends each entity its commands as one message, all of them before
    /// waiting for any answer; the answers are in the entities' order, each
    /// entity's replies in its commands' order.
    ///
    /// The answers are awaited one after the other while every actor works
    /// on its message: a batch's hundred customers as a hundred futures
    /// polled together (`join_all`) spent a tenth of the gRPC threads' time
    /// allocating, moving and waking them.
    pub async fn call_each(
        &self,
        calls: Vec<Call<E::Command>>,
    ) -> Vec<ServiceResult<Vec<ServiceResult<Reply<E::Answer>>>>> {
        let addrs = self.addresses(&calls);
        let sent: Vec<_> = calls
            .into_iter()
            .zip(addrs)
            .map(|((entity, commands), addr)| {
                let parcel = Arc::new(Mutex::new(Some(commands)));
                let request = addr.map(|addr| addr.send(Requests::<E>(parcel.clone())));
                (entity, parcel, request)
            })
            .collect();
        let mut answers = Vec::with_capacity(sent.len());
        for (entity, parcel, request) in sent {
            answers.push(match request {
                Err(error) => Err(error),
                Ok(request) => match self.answered(&entity, &parcel, request.await) {
                    Sent::Answered(answer) => answer,
                    Sent::Again => self.send(&entity, parcel, Requests::<E>).await,
                },
            });
        }
        answers
    }

    /// Sends each entity its commands as one message, and no answer comes
    /// back: for commands whose effect matters and whose reply does not,
    /// and which are sent again if they are lost (scores, which their
    /// outbox delivers again). A message that meets an actor that has just
    /// stopped goes to a fresh activation (see [`Told`]); a command an
    /// actor refuses is dropped (where [`Registry::call_each`] answers the
    /// error). `permit` holds a permit per command: each message takes its
    /// commands' share (none once the permit is spent), given back once
    /// they are applied.
    pub fn tell_each(&self, calls: Vec<Call<E::Command>>, mut permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        let addrs = self.addresses(&calls);
        for ((entity, commands), addr) in calls.into_iter().zip(addrs) {
            let share = permit.as_mut().and_then(|permit| permit.split(commands.len()));
            Self::send_told(Told::new(self, entity, commands, share, 0), addr);
        }
    }

    /// Sends `told` to its entity's actor, activating it if needed.
    fn tell(&self, told: Told<E>) {
        // Not under the lock: a send wakes the actor's thread.
        let addr = self.activated(&mut self.shard(&told.entity).lock(), &told.entity);
        Self::send_told(told, addr);
    }

    /// Sends `told` to `addr`, its entity's actor; gives its commands up if
    /// the actor could not be activated (not sent again: the activation
    /// failed, and the outbox has them).
    fn send_told(mut told: Told<E>, addr: ServiceResult<Shared<E>>) {
        match addr {
            Ok(addr) => addr.do_send(told),
            Err(error) => {
                tracing::debug!(entity = %told.entity, %error, "told commands not sent");
                told.take();
            }
        }
    }

    /// The entities' actors, activated if needed, in the calls' order.
    fn addresses(&self, calls: &[Call<E::Command>]) -> Vec<ServiceResult<Shared<E>>> {
        // Every address with each shard's lock taken once (taken per
        // entity, the lock and the map's probes were a tenth of a batch's
        // work on the gRPC threads), every send after: a send wakes the
        // actor's thread.
        let shards: Vec<usize> = calls.iter().map(|(entity, _)| self.shard_of(entity)).collect();
        let mut order: Vec<usize> = (0..calls.len()).collect();
        order.sort_unstable_by_key(|at| shards[*at]);
        let mut found: Vec<Option<ServiceResult<Shared<E>>>> = calls.iter().map(|_| None).collect();
        for run in order.chunk_by(|a, b| shards[*a] == shards[*b]) {
            let mut actors = self.actors[shards[run[0]]].lock();
            for at in run {
                found[*at] = Some(self.activated(&mut actors, &calls[*at].0));
            }
        }
        found
            .into_iter()
            .map(|addr| addr.unwrap_or_else(|| Err(ServiceError::internal("an entity of a batch was not looked up"))))
            .collect()
    }

    /// Sends `parcel`, in the message `wrap` makes of it, to the entity's
    /// actor, activating it if needed, and again to a fresh activation if
    /// the actor had just stopped without taking it.
    async fn send<T, M>(
        &self,
        entity: &EntityKey,
        parcel: Parcel<T>,
        wrap: impl Fn(Parcel<T>) -> M,
    ) -> ServiceResult<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        EntityActor<E>: Handler<M>,
        <EntityActor<E> as Actor>::Context: actix::dev::ToEnvelope<EntityActor<E>, M>,
    {
        for _ in 0..ACTIVATION_ATTEMPTS {
            let outcome = self.send_now(entity, wrap(parcel.clone()))?.await;
            if let Sent::Answered(answer) = self.answered(entity, &parcel, outcome) {
                return answer;
            }
        }
        Err(ServiceError::unavailable(format!("{entity} is restarting; retry")))
    }

    /// Sends `message` to the entity's actor, activating it if needed.
    ///
    /// The send goes through the registry's own address, shared: a clone
    /// of an actix address is a sender of its own, which cost two
    /// allocations and two shared counters per message. (Actors' mailboxes
    /// are unbounded, see `activated`, so this sender does not wait.)
    fn send_now<M>(&self, entity: &EntityKey, message: M) -> ServiceResult<actix::dev::Request<EntityActor<E>, M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        EntityActor<E>: Handler<M>,
        <EntityActor<E> as Actor>::Context: actix::dev::ToEnvelope<EntityActor<E>, M>,
    {
        // Not under the lock: a send wakes the actor's thread.
        let addr = self.activated(&mut self.shard(entity).lock(), entity)?;
        Ok(addr.send(message))
    }

    /// What the outcome of a send means: an answer (or an error to answer
    /// with), or a closed mailbox that never took the parcel, to send again
    /// to a fresh activation.
    fn answered<T, R>(
        &self,
        entity: &EntityKey,
        parcel: &Parcel<T>,
        outcome: Result<R, MailboxError>,
    ) -> Sent<ServiceResult<R>> {
        match outcome {
            Ok(result) => Sent::Answered(Ok(result)),
            Err(MailboxError::Closed) if parcel.lock().is_none() => {
                // Taken, then no answer: the actor stopped while handling
                // it. Retrying the request is safe (idempotent); sending it
                // again here is impossible.
                self.forget_stopped(entity);
                Sent::Answered(Err(ServiceError::unavailable(format!(
                    "{entity} stopped while handling the request; retry"
                ))))
            }
            Err(MailboxError::Closed) => {
                self.forget_stopped(entity);
                Sent::Again
            }
            Err(MailboxError::Timeout) => {
                Sent::Answered(Err(ServiceError::unavailable("the entity did not answer in time")))
            }
        }
    }

    /// The address of the entity's actor in `actors` (the registry's map,
    /// locked), activating it if it has none or its actor has stopped.
    fn activated(&self, actors: &mut Actors<E>, entity: &EntityKey) -> ServiceResult<Shared<E>> {
        if let Some(addr) = actors.get(entity) {
            if addr.connected() {
                return Ok(addr.clone());
            }
        }
        let storage_key = entity.to_string();
        let restore = |snapshot: &Snapshot| Ok((decode::<E::State>(&snapshot.state)?, snapshot.entity_seq));
        // A snapshot recovery has not written yet is written by this actor
        // at the next checkpoint.
        let (state, entity_seq, unwritten) = match self.node.recovered.take_with(&storage_key, restore)? {
            Some((state, entity_seq)) => (state, entity_seq, 1),
            None => {
                match self
                    .node
                    .store
                    .snapshots
                    .get(storage_key.as_bytes())
                    .map_err(crate::storage::StorageError::from)?
                {
                    Some(bytes) => {
                        let (state, entity_seq) = restore(&decode(&bytes)?)?;
                        (state, entity_seq, 0)
                    }
                    None => (E::State::default(), 0, 0),
                }
            }
        };
        let actor = EntityActor::<E> {
            key: entity.clone(),
            storage_key: storage_key.into(),
            state,
            entity_seq,
            entries_since_snapshot: unwritten,
            node: self.node.clone(),
            registry: self.this.clone(),
            rng: None,
            last_active: Instant::now(),
            passivating: false,
            stopping: false,
        };
        let arbiter = &self.arbiters[arbiter_of(entity, self.arbiters.len())];
        // As `Actor::start_in_arbiter` does, but with an unbounded mailbox
        // from its first message: mailboxes in effect were unbounded when
        // every send used a fresh address (a sender may always add one
        // message), and with one shared sender a bound would park it for
        // every caller.
        let (sender, mailbox) = actix::dev::channel::channel(0);
        arbiter.spawn_fn(move || {
            let context = Context::with_receiver(mailbox);
            actix_rt::spawn(context.into_future(actor));
        });
        let addr = Addr::new(sender);
        let kind = E::KIND.as_str();
        self.node.metrics.activations.with_label_values(&[kind]).inc();
        let addr = Arc::new(addr);
        if actors.insert(entity.clone(), addr.clone()).is_none() {
            self.node.metrics.active_actors.with_label_values(&[kind]).inc();
        } else {
            // It replaced a stopped actor nobody had removed yet.
            self.node.metrics.passivations.with_label_values(&[kind]).inc();
        }
        Ok(addr)
    }

    /// Forgets `addr` as the actor of `entity` (if it still is).
    fn remove(&self, entity: &EntityKey, addr: &Addr<EntityActor<E>>) {
        let mut actors = self.shard(entity).lock();
        if actors.get(entity).is_some_and(|known| **known == *addr) {
            self.forgotten(&mut actors, entity);
        }
    }

    /// Forgets the actor of `entity` if it has stopped (a send met its
    /// closed mailbox).
    fn forget_stopped(&self, entity: &EntityKey) {
        let mut actors = self.shard(entity).lock();
        if actors.get(entity).is_some_and(|addr| !addr.connected()) {
            self.forgotten(&mut actors, entity);
        }
    }

    fn forgotten(&self, actors: &mut Actors<E>, entity: &EntityKey) {
        actors.remove(entity);
        let kind = E::KIND.as_str();
        self.node.metrics.passivations.with_label_values(&[kind]).inc();
        self.node.metrics.active_actors.with_label_values(&[kind]).dec();
    }

    /// What the actors of this node share.
    pub fn node(&self) -> &Arc<NodeShared> {
        &self.node
    }

    /// Commands sent with [`Registry::tell_each`] that no actor has taken
    /// yet: waiting in mailboxes, or on their way to a fresh activation.
    pub fn told_pending(&self) -> usize {
        self.told.load(Ordering::Relaxed)
    }

    /// How many actors are in memory.
    pub fn active(&self) -> usize {
        self.actors.iter().map(|shard| shard.lock().len()).sum()
    }

    /// Has every active actor that changed since its last snapshot write
    /// one; returns how many did, once they are written.
    ///
    /// Actors are asked `SNAPSHOT_ASKS` at a time, and the next group is
    /// asked once the group before last is written: the writer group-commits
    /// them instead of flushing once per actor (a million active customers
    /// made the one-by-one version outlast the checkpoint interval), and
    /// the asking goes at the pace the writer allows snapshots under load
    /// instead of queueing every changed customer's state at once.
    ///
    /// The asking is also spread over `spread`: group `k` of `n` is asked
    /// no sooner than `k / n` of it after the first, until `hurry`
    /// resolves. At the writer's pace alone, a checkpoint's hundred
    /// thousand snapshots took its tenth of the writer's time and the
    /// actors' for five seconds in thirty, and those were the slowest
    /// seconds of an open loop near the node's limit (docs/performance.md).
    pub async fn snapshot_all(&self, spread: Duration, hurry: impl std::future::Future<Output = ()>) -> usize {
        let mut addrs = Vec::new();
        for shard in self.actors.iter() {
            addrs.extend(shard.lock().values().cloned());
        }
        let mut count = 0;
        let mut writing = Vec::new();
        let began = tokio::time::Instant::now();
        let mut spread = Some(spread).filter(|spread| !spread.is_zero());
        let groups = addrs.len().div_ceil(SNAPSHOT_ASKS);
        tokio::pin!(hurry);
        for (index, group) in addrs.chunks(SNAPSHOT_ASKS).enumerate() {
            if let Some(over) = spread {
                let due = began + over.mul_f64(index as f64 / groups as f64);
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = &mut hurry => spread = None,
                }
            }
            let asked: Vec<_> = futures_util::future::join_all(group.iter().map(|addr| addr.send(SnapshotNow)))
                .await
                .into_iter()
                .filter_map(|answer| answer.ok().flatten())
                .collect();
            count += asked.len();
            for written in std::mem::replace(&mut writing, asked) {
                let _ = written.await;
            }
        }
        for written in writing {
            let _ = written.await;
        }
        count
    }
}

fn arbiter_of(entity: &EntityKey, arbiters: usize) -> usize {
    let hash = xxhash_rust::xxh3::xxh3_64(entity.to_string().as_bytes());
    usize::try_from(hash % arbiters as u64).expect("below the arbiter count")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> UnixMillis {
    let since_epoch =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64 for 292 million years")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_storage_has_failed_no_entity_answers_from_memory_or_from_an_older_snapshot() {
        use crate::entities::{JackpotCommand, JackpotEntity};
        use bazaar_games::jackpot::JackpotDef;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        // Segments of 256 bytes: a commit soon needs a new one.
        let (journal, writer) = Journal::start_with(
            store.clone(),
            metrics.clone(),
            0,
            Duration::from_secs(60),
            256,
            crate::journal::CARRY_FOR,
        )
        .expect("start");
        let node = Arc::new(NodeShared {
            store: store.clone(),
            journal: journal.clone(),
            metrics,
            idle_timeout: Duration::from_secs(600),
            snapshot_every: 1_000,
            recovered: crate::recovery::Recovered::none(),
        });
        let def = JackpotDef {
            campaign: bazaar_games::Id::parse("mall").expect("an id"),
            seed_minor: 1_000,
            cap_minor: 5_000,
            contribution_bps: 1_000,
            reserve_bps: 2_000,
            min_purchase_minor: 0,
        };
        actix_rt::System::new().block_on(async move {
            let jackpots = Registry::<JackpotEntity>::new(node, vec![actix_rt::Arbiter::current()]);
            let key = |id: &str| EntityKey::new("t", EntityKind::Jackpot, id);
            let started = jackpots.call(&key("j-1"), JackpotCommand::Ensure { def }).await.expect("started");
            journal.durable(started.ticket.expect("journaled")).await.expect("durable");
            assert!(jackpots.call(&key("j-1"), JackpotCommand::View).await.is_ok());
            // The journal's directory goes: the next segment cannot be
            // made, and the commit that needs one fails the writer.
            std::fs::remove_dir_all(&store.journal_dir).expect("remove");
            for n in 0..1_000 {
                let entry = JournalEntry {
                    entity: Arc::from("t/jackpot/other"),
                    entity_seq: n,
                    change: vec![0; 64],
                    seen: None,
                    outbox: Vec::new(),
                    audit: Vec::new(),
                };
                let Ok(ticket) = journal.submit(entry) else { break };
                if journal.durable(ticket).await.is_err() {
                    break;
                }
            }
            assert!(journal.failed(), "the writer failed");
            // j-1 is active (its state in memory), j-2 would be activated
            // from storage: neither answers.
            for id in ["j-1", "j-2"] {
                let refused = jackpots.call(&key(id), JackpotCommand::View).await.err().expect("refused");
                assert_eq!(refused.code, Code::Unavailable, "{id}: {}", refused.message);
                assert!(refused.message.contains("storage failed"), "{id}: {}", refused.message);
            }
        });
        writer.join().expect("the writer's thread ends");
    }

    #[test]
    fn told_commands_no_actor_took_go_to_a_fresh_activation_with_their_permits() {
        use crate::entities::{LeaderboardAnswer, LeaderboardCommand, LeaderboardEntity};
        use crate::outbox::OutboxMessage;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (journal, writer) =
            Journal::start(store.clone(), metrics.clone(), 0, Duration::from_secs(60)).expect("start");
        let node = Arc::new(NodeShared {
            store,
            journal: journal.clone(),
            metrics,
            idle_timeout: Duration::from_secs(600),
            snapshot_every: 1_000,
            recovered: crate::recovery::Recovered::none(),
        });
        let id = |text: &str| bazaar_games::Id::parse(text).expect("an id");
        let score = |event: &str, delta: i64| LeaderboardCommand::Score {
            message: OutboxMessage::score("t", &id(event), &id("top"), &id("c-1"), delta, 1_000),
        };
        actix_rt::System::new().block_on(async move {
            let boards = Registry::<LeaderboardEntity>::new(node, vec![actix_rt::Arbiter::current()]);
            let key = EntityKey::new("t", EntityKind::Leaderboard, "top");
            let permits = Arc::new(tokio::sync::Semaphore::new(10));
            let permit = |n| permits.clone().try_acquire_many_owned(n).ok();
            boards.tell_each(vec![(key.clone(), vec![score("e-1", 5)])], permit(1));
            // Dropped before an actor took it: what a stopped actor's
            // mailbox does with its messages, or a send that met it closed.
            let lost = Told::new(&boards, key.clone(), vec![score("e-2", 7), score("e-3", 11)], permit(2), 0);
            assert_eq!(permits.available_permits(), 7);
            drop(lost);
            // A read goes through the same mailbox, after both.
            let read = boards.call(&key, LeaderboardCommand::Top { count: 10 }).await.expect("read");
            let LeaderboardAnswer::Top { entries, .. } = read.answer else { panic!("the top entries") };
            assert_eq!(entries.iter().map(|entry| entry.score).collect::<Vec<_>>(), vec![23]);
            assert_eq!(permits.available_permits(), 10, "every permit back once applied");
            assert_eq!(boards.told_pending(), 0, "none pending once taken");

            // Once the node is stopping, nothing is activated for them.
            journal.close();
            let before = boards.active();
            boards.forget_stopped(&key);
            let other = EntityKey::new("t", EntityKind::Leaderboard, "other");
            let given_up = Told::new(&boards, other, vec![score("e-4", 1)], permit(1), 0);
            assert_eq!(boards.told_pending(), 1);
            drop(given_up);
            assert_eq!(boards.active(), before, "no activation while stopping");
            assert_eq!(permits.available_permits(), 10);
            assert_eq!(boards.told_pending(), 0, "given up, no longer pending");
        });
        writer.join().expect("the writer's thread ends");
    }

    #[test]
    fn an_idempotency_record_is_a_fixed_width_seen_value_holding_its_answer() {
        let answers: Vec<Vec<(String, i64)>> =
            vec![Vec::new(), vec![("c-42".into(), 7)], (0..500).map(|n| (format!("c-{n}"), -n)).collect()];
        for (fingerprint, answer) in [0, 42, u64::MAX].into_iter().zip(answers) {
            let record = seen_value(fingerprint, |bytes| crate::storage::encode_into(bytes, &answer));
            // What the fixed-width format makes of the value (the layout
            // every build before the variable-width one wrote), its answer
            // in the current format.
            let mut expected = vec![crate::storage::FIXED_WIDTH_VERSION];
            expected
                .extend(bincode::serialize(&SeenValue { fingerprint, answer: encode(&answer) }).expect("serialises"));
            assert_eq!(record[..], expected[..]);
            assert_eq!(encode(&answer)[0], crate::storage::FORMAT_VERSION);
            let SeenValue { fingerprint: read, answer: bytes } = decode(&record).expect("reads back");
            assert_eq!(
                (read, decode::<Vec<(String, i64)>>(&bytes).expect("the answer reads back")),
                (fingerprint, answer)
            );
        }
    }
}
