//! The service layer: every public operation, once, for every transport.
//!
//! A transport (HTTP now, gRPC next) authenticates nothing and decides
//! nothing: it parses a request, calls one method here with the presented
//! key, and renders the answer or the [`ServiceError`]. Here the key is
//! checked, the request validated, the entities called through their
//! registries, cross-entity messages delivered, and the answer released
//! only once every journal entry it depends on is durable.

use crate::actor::{now_millis, Call, Registry, Reply};
use crate::api::{self, parse_id};
use crate::entities::*;
use crate::error::{Code, ServiceError, ServiceResult};
use crate::journal::{Journal, Ticket};
use crate::live::{Live, PoolUpdate};
use crate::outbox::{OutboxMessage, Payload};
use crate::storage::{decode, Store};
use crate::tenancy::{DefKind, Principal, Role, Tenancy, Tenant, TenantEntry};
use crate::FastMap;
use bazaar_cluster::{EntityKey, EntityKind};
use bazaar_games::catalog::{Catalog, StoreDef};
use bazaar_games::event::EventKind;
use bazaar_games::jackpot::JackpotDef;
use bazaar_games::leaderboard::{LeaderboardDef, MAX_ENTRIES};
use bazaar_games::wheel::{WheelDef, WonPrize};
use bazaar_games::Id;
use bazaar_observability::Metrics;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What delivering one outbox message produced: the receiver's ticket, the
/// jackpot result for the event's answer, and what watchers learn once it
/// is durable.
#[derive(Default)]
struct Delivery {
    ticket: Option<Ticket>,
    jackpot: Option<api::JackpotResult>,
    /// The receiver's id is shared by a batch's deliveries to it.
    pool: Option<(Arc<Id>, PoolUpdate)>,
    /// Only for a first delivery: a retry's hit was published already.
    hit: Option<(Id, api::HitAnswer)>,
    leaderboard: Option<Arc<Id>>,
}

/// Serialises work per key (an event id): holders of the same key run one
/// after the other, different keys in parallel. A key is known by its
/// 64-bit hash (two ids that share one only wait for each other), and
/// lives only while held, in one of `KEYED_SHARDS` maps. A key nobody
/// waits for costs a map entry and nothing else; the first to wait for it
/// adds a [`tokio::sync::Notify`] that its holder wakes on leaving. (Keys
/// as strings, in one map, were a tenth of a batch's work on the gRPC
/// threads; a mutex allocated per key, another twentieth.)
#[derive(Default)]
pub struct KeyedLock {
    hasher: foldhash::fast::RandomState,
    shards: [parking_lot::Mutex<FastMap<u64, Option<Arc<tokio::sync::Notify>>>>; KEYED_SHARDS],
}

const KEYED_SHARDS: usize = 16;

/// Held while a key is in use; frees the key and wakes its waiters on drop.
pub struct KeyedGuard<'a> {
    owner: &'a KeyedLock,
    key: u64,
}

impl KeyedLock {
    /// The key of a request id (an event id, a spin's request id: the
    /// idempotency scope says which) in a tenant.
    pub fn key(&self, tenant: &Id, scope: &str, id: &Id) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, (tenant.as_str(), scope, id.as_str()))
    }

    fn shard(&self, key: u64) -> &parking_lot::Mutex<FastMap<u64, Option<Arc<tokio::sync::Notify>>>> {
        &self.shards[(key % KEYED_SHARDS as u64) as usize]
    }

    pub async fn acquire(&self, key: u64) -> KeyedGuard<'_> {
        loop {
            let notify;
            let released;
            {
                let mut held = self.shard(key).lock();
                match held.entry(key) {
                    std::collections::hash_map::Entry::Vacant(free) => {
                        free.insert(None);
                        return KeyedGuard { owner: self, key };
                    }
                    std::collections::hash_map::Entry::Occupied(mut taken) => {
                        notify = taken.get_mut().get_or_insert_with(Default::default).clone();
                        // Made under the shard's lock, so the holder's
                        // `notify_waiters` on leaving cannot come before it.
                        released = notify.notified();
                    }
                }
            }
            released.await;
        }
    }

    /// Acquires every key of `keys`, each once, in one global order (so
    /// that two holders of overlapping sets cannot deadlock).
    pub async fn acquire_all(&self, mut keys: Vec<u64>) -> Vec<KeyedGuard<'_>> {
        keys.sort_unstable();
        keys.dedup();
        let mut guards = Vec::with_capacity(keys.len());
        for key in keys {
            guards.push(self.acquire(key).await);
        }
        guards
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        let waiters = self.owner.shard(self.key).lock().remove(&self.key).flatten();
        if let Some(waiters) = waiters {
            waiters.notify_waiters();
        }
    }
}

/// Settings of the service layer.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// How old an event may be (tills that were offline send late).
    pub max_event_age: Duration,
    /// Whether unary events that arrive together are recorded as one
    /// batch ([`crate::coalesce`]).
    pub unary_batching: bool,
    /// How long a checkpoint taken while the node serves spreads its
    /// customers' snapshots over ([`crate::actor::Registry::snapshot_all`]).
    pub checkpoint_spread: Duration,
}

/// A unary event waiting in its tenant's [`crate::coalesce::Lane`], and
/// where its answer goes.
pub struct QueuedEvent {
    event: api::ValidEvent,
    reply: tokio::sync::oneshot::Sender<ServiceResult<api::EventAnswer>>,
}

pub struct Service {
    pub store: Store,
    pub journal: Journal,
    pub metrics: Arc<Metrics>,
    pub tenancy: Tenancy,
    pub customers: Arc<Registry<CustomerEntity>>,
    pub wheels: Arc<Registry<WheelEntity>>,
    pub jackpots: Arc<Registry<JackpotEntity>>,
    pub leaderboards: Arc<Registry<LeaderboardEntity>>,
    pub config: ServiceConfig,
    /// Live updates for watchers.
    pub live: Live,
    /// Event ids being recorded right now.
    pub in_flight: KeyedLock,
    /// False until recovery is done and while shutting down.
    pub ready: AtomicBool,
    /// [`SCORES_IN_FLIGHT`] permits: one for each score sent and not yet
    /// applied (see `Service::tell_scores`).
    pub scores_in_flight: Arc<tokio::sync::Semaphore>,
}

/// Scores sent to leaderboards and not yet applied, at most: beyond them,
/// answers wait for their leaderboards as they did when every answer
/// waited (the load slows to the boards' pace, their mailboxes stay
/// short). About a tenth of a second of a board's work at the speed
/// measured under load (1.5 µs a score), well within
/// [`crate::journal::CARRY_FOR`].
pub const SCORES_IN_FLIGHT: usize = 65_536;

/// Outbox messages redelivered together (see [`Service::redeliver`]).
pub const REDELIVERY_CHUNK: usize = 1_000;

/// Records of the `outbox` tree read for a chunk, per message of it, at
/// most (see `next_chunk`).
const REDELIVERY_READS_PER_MESSAGE: usize = 4;

/// A customer's reply to an event.
struct Applied {
    answer: EventAnswer,
    duplicate: bool,
    ticket: Option<Ticket>,
}

/// The next chunk [`Service::redeliver`] delivers, from `items` (the
/// `outbox` tree's records in key order, from where the last chunk ended):
/// one tenant's messages made by `cutoff`, at most `max` of them (a
/// record's key starts with its tenant, so a tenant's come together), and
/// the key of the last record read, after which the next chunk starts
/// (`None`: nothing was left to read). Records that do not decode are
/// passed over. It reads `REDELIVERY_READS_PER_MESSAGE` records per
/// message at most: a tenant's messages not due yet are read again at
/// every pass, and the reading is done on an async thread.
fn next_chunk<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    items: impl Iterator<Item = (K, V)>,
    cutoff: bazaar_games::UnixMillis,
    max: usize,
) -> (Vec<OutboxMessage>, Option<Vec<u8>>) {
    let mut chunk: Vec<OutboxMessage> = Vec::new();
    let mut last = None;
    for (key, bytes) in items.take(max.saturating_mul(REDELIVERY_READS_PER_MESSAGE)) {
        let Ok(message) = decode::<OutboxMessage>(bytes.as_ref()) else {
            last = Some(key.as_ref().to_vec());
            continue;
        };
        if chunk.first().is_some_and(|first| first.tenant != message.tenant) {
            break;
        }
        last = Some(key.as_ref().to_vec());
        if message.created_at <= cutoff {
            chunk.push(message);
            if max <= chunk.len() {
                break;
            }
        }
    }
    (chunk, last)
}

fn applied_event(reply: Reply<CustomerAnswer>) -> ServiceResult<Applied> {
    let Reply { answer: CustomerAnswer::Event(answer), duplicate, ticket } = reply else {
        return Err(ServiceError::internal("a customer answered an event with something else"));
    };
    Ok(Applied { answer, duplicate, ticket })
}

/// Where an outbox message goes (its receiver's id), and the command that
/// delivers it.
enum Route<'a> {
    /// Its receiver is no longer defined: nothing to deliver.
    Nowhere,
    Jackpot(&'a Id, JackpotCommand),
    Leaderboard(&'a Id, LeaderboardCommand),
    /// A draw: the wheel draws, then the customer settles.
    Wheel,
}

fn route<'a>(message: &'a OutboxMessage, catalog: &Catalog) -> Route<'a> {
    match &message.payload {
        Payload::Contribution { jackpot, .. } => match catalog.jackpots.get(jackpot) {
            Some(def) => {
                Route::Jackpot(jackpot, JackpotCommand::Contribute { message: message.clone(), def: def.clone() })
            }
            None => Route::Nowhere,
        },
        Payload::Score { leaderboard, .. } => match catalog.leaderboards.contains_key(leaderboard) {
            true => Route::Leaderboard(leaderboard, LeaderboardCommand::Score { message: message.clone() }),
            false => Route::Nowhere,
        },
        Payload::WheelDraw { .. } => Route::Wheel,
    }
}

/// The delivery of a contribution to `jackpot` of `tenant`, from its
/// reply.
fn contributed(tenant: &str, jackpot: &Arc<Id>, reply: Reply<JackpotAnswer>) -> ServiceResult<Delivery> {
    let JackpotAnswer::Contributed { outcome, cycle, contributed_minor, pool_minor } = reply.answer else {
        return Err(ServiceError::internal("a jackpot answered a contribution with something else"));
    };
    let hit = match &outcome.hit {
        Some(hit) if !reply.duplicate => {
            tracing::info!(tenant, jackpot = %jackpot, cycle = hit.cycle, customer = %hit.customer,
                amount_minor = hit.amount_minor, "jackpot hit");
            Some((Id::clone(jackpot), api::HitAnswer::from(hit)))
        }
        _ => None,
    };
    Ok(Delivery {
        ticket: reply.ticket,
        jackpot: Some(api::JackpotResult {
            jackpot: Id::clone(jackpot),
            contributed_minor: outcome.contributed_minor,
            won_minor: outcome.won_minor,
        }),
        pool: Some((jackpot.clone(), PoolUpdate { cycle, contributed_minor, pool_minor })),
        hit,
        leaderboard: None,
    })
}

/// A score for a leaderboard: sent, not awaited ([`Service::tell_scores`]).
fn is_score(message: &OutboxMessage) -> bool {
    matches!(message.payload, Payload::Score { .. })
}

/// Takes the scores out of a first application's deliveries. A retry's
/// (those of its scores [`Service::redeliverable`] left) are delivered and
/// acknowledged as the rest are: its check of the `outbox` tree put every
/// message still carried there, to be taken out by an acknowledgement.
fn take_scores(applied: &mut Applied) -> Vec<OutboxMessage> {
    if applied.duplicate {
        return Vec::new();
    }
    let (scores, rest) = std::mem::take(&mut applied.answer.deliveries).into_iter().partition(is_score);
    applied.answer.deliveries = rest;
    scores
}

/// The delivery of a score to `leaderboard`, from its reply.
fn scored(leaderboard: &Arc<Id>, reply: Reply<LeaderboardAnswer>) -> ServiceResult<Delivery> {
    Ok(Delivery { ticket: reply.ticket, leaderboard: Some(leaderboard.clone()), ..Delivery::default() })
}

/// A batch's receivers of one kind (a few: a mall-wide jackpot, a
/// leaderboard or two), found by a linear search of their ids: a
/// receiver's entity key and shared id are made once per batch, not per
/// message, and each receiver gets its commands as one actor message.
struct Receivers<C> {
    kind: EntityKind,
    /// Each receiver's tenant and id, by slot.
    ids: Vec<(String, Arc<Id>)>,
    /// Each receiver's commands, by slot.
    commands: Vec<Vec<C>>,
    /// Each command's index and its receiver's slot, in the order added.
    order: Vec<(usize, usize)>,
}

impl<C> Receivers<C> {
    fn new(kind: EntityKind) -> Self {
        Self { kind, ids: Vec::new(), commands: Vec::new(), order: Vec::new() }
    }

    /// The slot of receiver `id` of `tenant`, added if new.
    fn slot(&mut self, tenant: &str, id: &Id) -> usize {
        if let Some(slot) = self.ids.iter().position(|(known, known_id)| known == tenant && **known_id == *id) {
            return slot;
        }
        self.ids.push((tenant.to_owned(), Arc::new(id.clone())));
        self.commands.push(Vec::new());
        self.ids.len() - 1
    }

    fn add(&mut self, slot: usize, index: usize, command: C) {
        self.commands[slot].push(command);
        self.order.push((index, slot));
    }

    /// Each command's index and slot, the receivers' ids by slot, and the
    /// calls.
    #[allow(clippy::type_complexity)]
    fn split(self) -> (Vec<(usize, usize)>, Vec<(String, Arc<Id>)>, Vec<Call<C>>) {
        let kind = self.kind;
        let calls = self
            .ids
            .iter()
            .zip(self.commands)
            .map(|((tenant, id), commands)| (entity(tenant, kind, id), commands))
            .collect();
        (self.order, self.ids, calls)
    }
}

/// Puts the replies of batched calls into `results`: each command's
/// (`order`: its index and its entity's slot) in turn from its entity's
/// replies, which come in the order its commands were sent, completed by
/// `complete` with the entity's slot. A failed call fails each of its
/// commands.
fn spread<A, T>(
    results: &mut [Option<ServiceResult<T>>],
    order: &[(usize, usize)],
    replies: Vec<ServiceResult<Vec<ServiceResult<Reply<A>>>>>,
    mut complete: impl FnMut(usize, Reply<A>) -> ServiceResult<T>,
) {
    let mut replies: Vec<ServiceResult<std::vec::IntoIter<ServiceResult<Reply<A>>>>> =
        replies.into_iter().map(|replies| replies.map(Vec::into_iter)).collect();
    for &(index, slot) in order {
        results[index] = Some(match &mut replies[slot] {
            Ok(each) => match each.next() {
                Some(reply) => reply.and_then(|reply| complete(slot, reply)),
                None => Err(ServiceError::internal("an actor answered fewer requests than it was sent")),
            },
            Err(error) => Err(error.clone()),
        });
    }
}

/// The key of an entity of a tenant (an `Id`, or an outbox message's
/// tenant as written).
fn entity(tenant: impl AsRef<str>, kind: EntityKind, id: &Id) -> EntityKey {
    EntityKey::new(tenant.as_ref(), kind, id.as_str())
}

impl Service {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.journal.failed()
    }

    async fn durable(&self, ticket: Option<Ticket>) -> ServiceResult<()> {
        if let Some(ticket) = ticket {
            self.journal.durable(ticket).await?;
        }
        Ok(())
    }

    // ------------------------------------------------------ tenants, keys

    pub async fn create_tenant(
        &self,
        key: Option<&str>,
        request: api::CreateTenant,
    ) -> ServiceResult<api::TenantAnswer> {
        self.tenancy.authenticate(key)?.require_admin()?;
        let id = parse_id("id", &request.id)?;
        bazaar_games::campaign::Campaign::validate_name("name", &request.name)?;
        if request.currency.len() != 3 || !request.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(ServiceError::invalid(
                "currency",
                "must be an ISO 4217 code of three capital letters, such as EUR",
            ));
        }
        let tenant = self
            .tenancy
            .create_tenant(Tenant { id, name: request.name, currency: request.currency, created_at: now_millis() })
            .await?;
        tracing::info!(tenant = %tenant.id, "tenant created");
        Ok(tenant_answer(&tenant))
    }

    pub fn get_tenant(&self, key: Option<&str>, tenant: &str) -> ServiceResult<api::TenantAnswer> {
        // Name and currency only: screens and tills format money with them.
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator, Role::Pos, Role::Display])?;
        Ok(tenant_answer(&entry.tenant))
    }

    pub async fn create_key(
        &self,
        key: Option<&str>,
        tenant: &str,
        request: api::CreateKey,
    ) -> ServiceResult<api::KeyAnswer> {
        let (principal, entry) = self.authorise(key, tenant, &[Role::Operator])?;
        let role = Role::parse(&request.role)
            .ok_or_else(|| ServiceError::invalid("role", "must be one of admin, operator, pos, display"))?;
        if role == Role::Admin {
            principal.require_admin()?;
        }
        let tenant_id = (role != Role::Admin).then(|| entry.tenant.id.clone());
        let created = self.tenancy.create_key(role, tenant_id.clone()).await?;
        let key_id = created.split('_').nth(1).unwrap_or_default().to_owned();
        tracing::info!(tenant = %entry.tenant.id, role = role.as_str(), key_id, "API key created");
        Ok(api::KeyAnswer { key: created, key_id, role: role.as_str().into(), tenant: tenant_id.map(String::from) })
    }

    /// Authenticates `key` and checks it may act on `tenant` in one of
    /// `roles` (admins always may).
    fn authorise(
        &self,
        key: Option<&str>,
        tenant: &str,
        roles: &[Role],
    ) -> ServiceResult<(Principal, Arc<TenantEntry>)> {
        let principal = self.tenancy.authenticate(key)?;
        let tenant_id = Id::parse(tenant).map_err(|e| ServiceError::invalid("tenant", e.to_string()))?;
        principal.require(&tenant_id, roles)?;
        Ok((principal, self.tenancy.tenant(&tenant_id)?))
    }

    // ------------------------------------------------------- definitions

    /// Validates and stores one definition. `build` checks the body, its
    /// references against the current catalog, and returns the new catalog.
    async fn put_definition<T: Serialize + Clone>(
        &self,
        key: Option<&str>,
        tenant: &str,
        kind: DefKind,
        id: &str,
        body: &T,
        build: impl FnOnce(&Id, &Catalog) -> ServiceResult<Catalog>,
    ) -> ServiceResult<api::DefinitionAnswer<T>> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator])?;
        let id = parse_id(kind.as_str(), id)?;
        let _guard = entry.write_lock.lock().await;
        let catalog = build(&id, &entry.catalog())?;
        let version = self.tenancy.put_def(&entry, kind, &id, catalog).await?;
        tracing::info!(tenant = %entry.tenant.id, kind = kind.as_str(), id = %id, version, "definition stored");
        Ok(api::DefinitionAnswer { id: id.to_string(), version, definition: body.clone() })
    }

    pub async fn put_store(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: StoreDef,
    ) -> ServiceResult<api::DefinitionAnswer<StoreDef>> {
        self.put_definition(key, tenant, DefKind::Store, id, &body, |id, catalog| {
            body.validate()?;
            let mut next = catalog.clone();
            next.stores.insert(id.clone(), body.clone());
            Ok(next)
        })
        .await
    }

    pub async fn put_campaign(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: api::CampaignBody,
    ) -> ServiceResult<api::DefinitionAnswer<api::CampaignBody>> {
        self.put_definition(key, tenant, DefKind::Campaign, id, &body, |id, catalog| {
            let campaign = body.to_domain()?;
            if let Some(stores) = &campaign.stores {
                if let Some((index, unknown)) =
                    body.stores.iter().flatten().enumerate().find(|(_, s)| !catalog.stores.contains_key(*s))
                {
                    return Err(not_defined(&format!("stores[{index}]"), "store", unknown));
                }
                if stores.is_empty() {
                    return Err(ServiceError::invalid(
                        "stores",
                        "must list at least one store, or be null for all stores",
                    ));
                }
            }
            let mut next = catalog.clone();
            next.campaigns.insert(id.clone(), campaign);
            Ok(next)
        })
        .await
    }

    pub async fn put_wheel(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: WheelDef,
    ) -> ServiceResult<api::DefinitionAnswer<WheelDef>> {
        self.put_definition(key, tenant, DefKind::Wheel, id, &body, |id, catalog| {
            body.validate()?;
            require_campaign(catalog, &body.campaign)?;
            let mut next = catalog.clone();
            next.wheels.insert(id.clone(), body.clone());
            Ok(next)
        })
        .await
    }

    pub async fn put_jackpot(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: JackpotDef,
    ) -> ServiceResult<api::DefinitionAnswer<JackpotDef>> {
        let answer = self
            .put_definition(key, tenant, DefKind::Jackpot, id, &body, |id, catalog| {
                body.validate()?;
                require_campaign(catalog, &body.campaign)?;
                let mut next = catalog.clone();
                next.jackpots.insert(id.clone(), body.clone());
                Ok(next)
            })
            .await?;
        // Start the first cycle now, so its commitment is published before
        // the first contribution.
        let tenant_id = parse_id("tenant", tenant)?;
        let jackpot_id = parse_id("jackpot", id)?;
        let reply = self
            .jackpots
            .call(&entity(&tenant_id, EntityKind::Jackpot, &jackpot_id), JackpotCommand::Ensure { def: body })
            .await?;
        self.durable(reply.ticket).await?;
        Ok(answer)
    }

    pub async fn put_mission(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: api::MissionBody,
    ) -> ServiceResult<api::DefinitionAnswer<api::MissionBody>> {
        self.put_definition(key, tenant, DefKind::Mission, id, &body, |id, catalog| {
            let mission = body.to_domain()?;
            require_campaign(catalog, &mission.campaign)?;
            for (index, step) in mission.steps.iter().enumerate() {
                if let Some(store) = &step.store {
                    if !catalog.stores.contains_key(store) {
                        return Err(not_defined(&format!("steps[{index}].store"), "store", store));
                    }
                }
                if let Some(spins) = step.reward.as_ref().and_then(|r| r.spins.as_ref()) {
                    if !catalog.wheels.contains_key(&spins.wheel) {
                        return Err(not_defined(&format!("steps[{index}].reward.spins.wheel"), "wheel", &spins.wheel));
                    }
                }
            }
            if let Some(spins) = mission.reward.as_ref().and_then(|r| r.spins.as_ref()) {
                if !catalog.wheels.contains_key(&spins.wheel) {
                    return Err(not_defined("reward.spins.wheel", "wheel", &spins.wheel));
                }
            }
            let mut next = catalog.clone();
            next.missions.insert(id.clone(), mission);
            Ok(next)
        })
        .await
    }

    pub async fn put_leaderboard(
        &self,
        key: Option<&str>,
        tenant: &str,
        id: &str,
        body: LeaderboardDef,
    ) -> ServiceResult<api::DefinitionAnswer<LeaderboardDef>> {
        self.put_definition(key, tenant, DefKind::Leaderboard, id, &body, |id, catalog| {
            body.validate()?;
            require_campaign(catalog, &body.campaign)?;
            let mut next = catalog.clone();
            next.leaderboards.insert(id.clone(), body.clone());
            Ok(next)
        })
        .await
    }

    // ------------------------------------------------------------ events

    /// Records one event and answers what it earned, once durable. A
    /// valid event goes in its tenant's next batch of unary events
    /// ([`crate::coalesce`]) unless batching is off.
    pub async fn record_event(
        self: &Arc<Self>,
        key: Option<&str>,
        tenant: &str,
        request: api::EventRequest,
    ) -> ServiceResult<api::EventAnswer> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Pos])?;
        let catalog = entry.catalog();
        let event = self.admit(&catalog, request)?;
        if !self.config.unary_batching {
            return self.record_admitted(&entry, catalog, event).await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if entry.unary.push(QueuedEvent { event, reply }) {
            // A task of its own: a client that goes away cancels its own
            // request, never the batch that carries the others'.
            tokio::spawn(self.clone().record_gathered(entry));
        }
        answer.await.unwrap_or_else(|_| Err(ServiceError::internal("the event's batch ended without answering it")))
    }

    /// Gathers a tenant's unary events for one pass of the scheduler, then
    /// records them as one batch (or as batches of [`api::MAX_BATCH`]).
    async fn record_gathered(self: Arc<Self>, entry: Arc<TenantEntry>) {
        tokio::task::yield_now().await;
        let mut batch = entry.unary.take();
        self.metrics.unary_batch_events.observe(batch.len() as f64);
        let catalog = entry.catalog();
        if batch.len() == 1 {
            // Alone, an event's own path does less.
            if let Some(QueuedEvent { event, reply }) = batch.pop() {
                let _ = reply.send(self.record_admitted(&entry, catalog, event).await);
            }
            return;
        }
        let mut chunks = Vec::new();
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(api::MAX_BATCH));
            chunks.push(std::mem::replace(&mut batch, rest));
        }
        futures_util::future::join_all(chunks.into_iter().map(|chunk| async {
            let (events, replies): (Vec<_>, Vec<_>) =
                chunk.into_iter().map(|QueuedEvent { event, reply }| (Ok(event), reply)).unzip();
            for (reply, result) in replies.into_iter().zip(self.record_valid(&entry, catalog.clone(), events).await) {
                let _ = reply.send(result);
            }
        }))
        .await;
    }

    /// Records many events of one tenant (a stream's run), each with its own
    /// answer or error, in order.
    pub async fn record_events(
        &self,
        key: Option<&str>,
        tenant: &str,
        requests: Vec<api::EventRequest>,
    ) -> Vec<ServiceResult<api::EventAnswer>> {
        match self.authorise(key, tenant, &[Role::Pos]) {
            Ok((_, entry)) => self.record_many(&entry, requests.into_iter().map(Ok).collect()).await,
            Err(error) => requests.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    /// Validates one event against the clock and the tenant's catalog.
    fn admit(&self, catalog: &Catalog, request: api::EventRequest) -> ServiceResult<api::ValidEvent> {
        let max_age = i64::try_from(self.config.max_event_age.as_millis()).unwrap_or(i64::MAX);
        let valid = request.validate(now_millis(), max_age)?;
        if let Some(store) = &valid.event.store {
            if !catalog.stores.contains_key(store) {
                return Err(not_found_field("store", "store", store));
            }
        }
        Ok(valid)
    }

    /// Records one admitted event (of `catalog`, the tenant's).
    async fn record_admitted(
        &self,
        entry: &TenantEntry,
        catalog: Arc<Catalog>,
        api::ValidEvent { event, fingerprint }: api::ValidEvent,
    ) -> ServiceResult<api::EventAnswer> {
        let tenant = &entry.tenant.id;
        // One request per event id at a time: a second request with the
        // same id, even for another customer (another actor), waits and then
        // meets the first one's idempotency record.
        let _in_flight = self.in_flight.acquire(self.in_flight.key(tenant, EVENT_SCOPE, &event.event_id)).await;
        let customer_key = entity(tenant, EntityKind::Customer, &event.customer);
        let (event_id, kind) = (event.event_id.clone(), kind_label(&event.kind));
        let reply = self
            .customers
            .call(&customer_key, CustomerCommand::Event { event, fingerprint, catalog: catalog.clone() })
            .await?;
        let mut applied = applied_event(reply)?;
        self.redeliverable(tenant.as_str(), &event_id, &catalog, &mut applied).await?;
        let told = self.tell_scores(take_scores(&mut applied), &catalog).await;
        // Its other receivers (jackpots) apply their messages side by
        // side. A call puts its message in the receiver's mailbox when
        // first polled, and the calls are first polled in order: two
        // messages to one receiver still arrive in the customer's order.
        let deliveries = futures_util::future::try_join_all(
            applied.answer.deliveries.iter().map(|message| self.deliver(message, &catalog)),
        )
        .await?;
        let last_ticket = deliveries.iter().map(|delivery| delivery.ticket).fold(applied.ticket, Option::max);
        self.durable(last_ticket).await?;
        self.journal.outbox_ack(applied.answer.deliveries.iter().map(OutboxMessage::storage_key).collect())?;
        for delivery in &deliveries {
            self.publish(tenant.as_str(), delivery);
        }
        self.nudge(&told);
        let mut tally = Tally::default();
        let answer = answered(&mut tally, event_id, kind, applied, deliveries);
        self.count(tenant, tally);
        Ok(answer)
    }

    /// Records many events of one tenant and answers each, in order. Each
    /// customer gets its events as one actor message, each jackpot and
    /// leaderboard its deliveries as one, and the whole batch waits for one
    /// durable ticket; every event still has its own answer, idempotency
    /// record and error.
    pub async fn record_many(
        &self,
        entry: &TenantEntry,
        requests: Vec<ServiceResult<api::EventRequest>>,
    ) -> Vec<ServiceResult<api::EventAnswer>> {
        let catalog = entry.catalog();
        let events = requests.into_iter().map(|request| request.and_then(|r| self.admit(&catalog, r))).collect();
        self.record_valid(entry, catalog, events).await
    }

    /// [`Service::record_many`] after admission: `events` were admitted
    /// against the tenant's `catalog` or one before it (a store, once
    /// defined, stays defined).
    async fn record_valid(
        &self,
        entry: &TenantEntry,
        catalog: Arc<Catalog>,
        events: Vec<ServiceResult<api::ValidEvent>>,
    ) -> Vec<ServiceResult<api::EventAnswer>> {
        let tenant = &entry.tenant.id;
        let mut results: Vec<Option<ServiceResult<api::EventAnswer>>> = events.iter().map(|_| None).collect();
        // The events that go now, and those repeating an id of this batch:
        // they go afterwards, one by one, and meet its idempotency record.
        let mut admitted = Vec::with_capacity(events.len());
        let mut repeated = Vec::new();
        // By the event-id lock's key: the (vanishingly rare) collision of two
        // ids only sends the second one the way of a repeated id.
        let mut keys = crate::FastSet::with_capacity_and_hasher(events.len(), Default::default());
        for (index, event) in events.into_iter().enumerate() {
            match event {
                Err(error) => results[index] = Some(Err(error)),
                Ok(valid) if !keys.insert(self.in_flight.key(tenant, EVENT_SCOPE, &valid.event.event_id)) => {
                    repeated.push((index, valid))
                }
                Ok(api::ValidEvent { event, fingerprint }) => admitted.push((index, fingerprint, event)),
            }
        }
        let guards = self.in_flight.acquire_all(keys.into_iter().collect()).await;

        // The events go to their customers, each customer's as one actor
        // message; what their answers need stays. Grouped by the customer's
        // id, borrowed, first: an entity key is made once per customer.
        let mut order = Vec::with_capacity(admitted.len());
        let mut calls: Vec<Call<CustomerCommand>> = Vec::new();
        {
            let mut slots: FastMap<&str, usize> = FastMap::with_capacity_and_hasher(admitted.len(), Default::default());
            for (position, (_, _, event)) in admitted.iter().enumerate() {
                let next = calls.len();
                let slot = *slots.entry(event.customer.as_str()).or_insert(next);
                if slot == next {
                    calls.push((entity(tenant, EntityKind::Customer, &event.customer), Vec::new()));
                }
                order.push((position, slot));
            }
        }
        let admitted: Vec<(usize, Id, &'static str)> = admitted
            .into_iter()
            .zip(&order)
            .map(|((index, fingerprint, event), &(_, slot))| {
                let kept = (index, event.event_id.clone(), kind_label(&event.kind));
                calls[slot].1.push(CustomerCommand::Event { event, fingerprint, catalog: catalog.clone() });
                kept
            })
            .collect();
        let mut applied: Vec<Option<ServiceResult<Applied>>> = admitted.iter().map(|_| None).collect();
        spread(&mut applied, &order, self.customers.call_each(calls).await, |_, reply| applied_event(reply));
        let mut applied: Vec<ServiceResult<Applied>> = applied
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(ServiceError::internal("an event of the batch was not applied"))))
            .collect();
        for (slot, (_, event_id, _)) in applied.iter_mut().zip(&admitted) {
            let Ok(retried) = slot else { continue };
            if retried.duplicate {
                if let Err(error) = self.redeliverable(tenant.as_str(), event_id, &catalog, retried).await {
                    *slot = Err(error);
                }
            }
        }

        // The messages move out of the answers into their receivers'
        // commands; each event keeps their keys, to acknowledge them. The
        // scores go without the answers waiting (see `tell_scores`).
        let mut owners = Vec::new();
        let mut messages = Vec::new();
        let mut scores = Vec::new();
        let mut message_keys: Vec<Vec<Vec<u8>>> = Vec::with_capacity(applied.len());
        for (position, a) in applied.iter_mut().enumerate() {
            let deliveries = match a {
                Ok(a) => {
                    scores.extend(take_scores(a));
                    std::mem::take(&mut a.answer.deliveries)
                }
                Err(_) => Vec::new(),
            };
            message_keys.push(deliveries.iter().map(OutboxMessage::storage_key).collect());
            owners.extend(deliveries.iter().map(|_| position));
            messages.extend(deliveries);
        }
        let told = self.tell_scores(scores, &catalog).await;
        let mut delivered: Vec<ServiceResult<Vec<Delivery>>> = admitted.iter().map(|_| Ok(Vec::new())).collect();
        for (owner, delivery) in owners.into_iter().zip(self.deliver_many(messages, &catalog).await) {
            match (&mut delivered[owner], delivery) {
                (Ok(deliveries), Ok(delivery)) => deliveries.push(delivery),
                (slot @ Ok(_), Err(error)) => *slot = Err(error),
                (Err(_), _) => {}
            }
        }

        // One wait for the whole batch, then acknowledgements and watchers.
        let last_ticket = applied
            .iter()
            .zip(&delivered)
            .filter_map(|(a, d)| Some((a.as_ref().ok()?, d.as_ref().ok()?)))
            .flat_map(|(a, d)| std::iter::once(a.ticket).chain(d.iter().map(|d| d.ticket)))
            .max()
            .flatten();
        let durable = self.durable(last_ticket).await;
        if durable.is_ok() {
            self.nudge(&told);
        }
        let mut acknowledged = Vec::new();
        let mut tally = Tally::default();
        for ((((index, event_id, kind), applied), delivered), keys) in
            admitted.into_iter().zip(applied).zip(delivered).zip(message_keys)
        {
            results[index] = Some(match (applied, delivered, &durable) {
                (Err(error), _, _) | (_, Err(error), _) => Err(error),
                (_, _, Err(error)) => Err(error.clone()),
                (Ok(applied), Ok(deliveries), Ok(())) => {
                    acknowledged.extend(keys);
                    for delivery in &deliveries {
                        self.publish(tenant.as_str(), delivery);
                    }
                    Ok(answered(&mut tally, event_id, kind, applied, deliveries))
                }
            });
        }
        self.count(tenant, tally);
        if let Err(error) = self.journal.outbox_ack(acknowledged) {
            tracing::warn!(%error, "outbox acknowledgements not queued");
        }
        drop(guards);
        for (index, valid) in repeated {
            results[index] = Some(self.record_admitted(entry, catalog.clone(), valid).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ServiceError::internal("an event of the batch was lost"))))
            .collect()
    }

    /// A retry's deliveries: its contributions (their receipts answer it),
    /// and the scores of the event `event_id` still waiting in the
    /// `outbox` tree, so that a read of a board sent after the retry's
    /// answer sees them even if the first attempt never sent them (its
    /// client gone while it waited). A score applied within the time its
    /// cause's message may wait for (see [`crate::journal::CARRY_FOR`])
    /// leaves its receiver no record to recognise it by (see
    /// [`crate::journal::Indexer`]), and is not delivered again. The
    /// scores come from the tree, not the record: a record keeps none
    /// since `CustomerAnswer::Recorded` (an older one's are dropped here
    /// and found in the tree as well, if they wait there).
    async fn redeliverable(
        &self,
        tenant: &str,
        event_id: &Id,
        catalog: &Catalog,
        applied: &mut Applied,
    ) -> ServiceResult<()> {
        if !applied.duplicate {
            return Ok(());
        }
        applied.answer.deliveries.retain(OutboxMessage::needs_receipt);
        if catalog.leaderboards.is_empty() {
            return Ok(());
        }
        // Once the cause is durable and the writer has indexed what it
        // carries, the `outbox` tree says which wait.
        self.durable(applied.ticket).await?;
        self.journal.settle().await?;
        for item in self.store.outbox.scan_prefix(OutboxMessage::scores_prefix(tenant, event_id)) {
            let (_, bytes) = item.map_err(crate::storage::StorageError::from)?;
            applied.answer.deliveries.push(decode(&bytes)?);
        }
        Ok(())
    }

    /// Adds a request's recorded events to the counters, once per request
    /// (per event, looking the counters up was a twentieth of a batch's
    /// work on the gRPC threads).
    fn count(&self, tenant: &Id, tally: Tally) {
        for (kind, count) in tally.kinds {
            self.metrics.events_ingested.with_label_values(&[tenant.as_str(), kind]).inc_by(count);
        }
        if 0 < tally.duplicates {
            self.metrics.events_duplicate.with_label_values(&[tenant.as_str()]).inc_by(tally.duplicates);
        }
    }

    /// Records up to [`api::MAX_BATCH`] events; each gets its own answer or
    /// error, in order.
    pub async fn record_batch(
        &self,
        key: Option<&str>,
        tenant: &str,
        request: api::BatchRequest,
    ) -> ServiceResult<Vec<Result<api::EventAnswer, ServiceError>>> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Pos])?;
        if api::MAX_BATCH < request.events.len() {
            return Err(ServiceError::invalid("events", format!("must hold at most {} events", api::MAX_BATCH)));
        }
        let requests = request.events.into_iter().map(crate::http::from_json_value::<api::EventRequest>).collect();
        let results = self.record_many(&entry, requests).await;
        Ok(results
            .into_iter()
            .enumerate()
            .map(|(index, result)| {
                result.map_err(|mut e| {
                    e.field = Some(match e.field.take() {
                        Some(field) => format!("events[{index}].{field}"),
                        None => format!("events[{index}]"),
                    });
                    e
                })
            })
            .collect())
    }

    /// Sends scores to their leaderboards (one message each) without
    /// waiting for them: nothing in an event's answer comes from a
    /// leaderboard, and the event's outbox, durable with the event,
    /// delivers a score again if it is lost (ARCHITECTURE.md, "An event's
    /// path", step 4). Awaited, a score held its event's answer until its
    /// leaderboard had applied it and that was durable too, often one
    /// commit later, and a leaderboard busy with a checkpoint's snapshot
    /// of a large board held every answer (docs/performance.md).
    ///
    /// A score is applied a moment after it is sent, before any read of
    /// its leaderboard sent after the event's answer (reads go through the
    /// same actor's mailbox; a board that passivated as it was sent gets
    /// it in its next activation, see [`crate::actor::Told`]). It needs no
    /// acknowledgement: the journal drops a message whose receiver applied
    /// it within [`crate::journal::CARRY_FOR`], and one that waited longer
    /// is in the `outbox` tree, whose redelivery loop finds the board's
    /// record of it and takes it out. Returns the leaderboards told, whose
    /// watchers are nudged once the scores' causes are durable
    /// ([`Service::nudge`]).
    async fn tell_scores(&self, scores: Vec<OutboxMessage>, catalog: &Catalog) -> Vec<(String, Arc<Id>)> {
        if scores.is_empty() {
            return Vec::new();
        }
        // Waits only while boards are behind. A request takes an eighth of
        // the permits at most: one batch with more scores than that (a
        // thousand events, each feeding a dozen boards) would otherwise
        // wait until no score at all was in flight, and every answer behind
        // it (the semaphore serves in turn); its last messages go without.
        let wanted = u32::try_from(scores.len().min(SCORES_IN_FLIGHT / 8)).unwrap_or(u32::MAX);
        // The semaphore is never closed: always a permit.
        let permit = self.scores_in_flight.clone().acquire_many_owned(wanted).await.ok();
        let mut leaderboards: Receivers<LeaderboardCommand> = Receivers::new(EntityKind::Leaderboard);
        for message in scores {
            let Payload::Score { leaderboard, .. } = &message.payload else { continue };
            if catalog.leaderboards.contains_key(leaderboard) {
                let slot = leaderboards.slot(&message.tenant, leaderboard);
                leaderboards.add(slot, 0, LeaderboardCommand::Score { message });
            }
        }
        let (_, told, calls) = leaderboards.split();
        self.leaderboards.tell_each(calls, permit);
        told
    }

    /// Tells the watchers of `leaderboards` that their scores changed.
    fn nudge(&self, leaderboards: &[(String, Arc<Id>)]) {
        for (tenant, leaderboard) in leaderboards {
            self.live.publish_leaderboard(tenant, leaderboard.as_str());
        }
    }

    /// Delivers one outbox message to its receiver.
    async fn deliver(&self, message: &OutboxMessage, catalog: &Catalog) -> ServiceResult<Delivery> {
        match route(message, catalog) {
            Route::Nowhere => Ok(Delivery::default()),
            Route::Jackpot(id, command) => {
                let key = entity(&message.tenant, EntityKind::Jackpot, id);
                contributed(&message.tenant, &Arc::new(id.clone()), self.jackpots.call(&key, command).await?)
            }
            Route::Leaderboard(id, command) => {
                let key = entity(&message.tenant, EntityKind::Leaderboard, id);
                scored(&Arc::new(id.clone()), self.leaderboards.call(&key, command).await?)
            }
            Route::Wheel => {
                let (_, ticket) = self.settle_draw(message, catalog).await?;
                Ok(Delivery { ticket, ..Delivery::default() })
            }
        }
    }

    /// Delivers many outbox messages: one actor message per receiving
    /// jackpot or leaderboard, carrying its messages in their order (moved
    /// into its commands, not copied). Answers in the messages' order.
    async fn deliver_many(&self, messages: Vec<OutboxMessage>, catalog: &Catalog) -> Vec<ServiceResult<Delivery>> {
        let mut results: Vec<Option<ServiceResult<Delivery>>> = messages.iter().map(|_| None).collect();
        let mut jackpots: Receivers<JackpotCommand> = Receivers::new(EntityKind::Jackpot);
        let mut leaderboards: Receivers<LeaderboardCommand> = Receivers::new(EntityKind::Leaderboard);
        let mut draws = Vec::new();
        for (index, message) in messages.into_iter().enumerate() {
            match &message.payload {
                Payload::Contribution { jackpot, .. } => match catalog.jackpots.get(jackpot) {
                    Some(def) => {
                        let slot = jackpots.slot(&message.tenant, jackpot);
                        jackpots.add(slot, index, JackpotCommand::Contribute { message, def: def.clone() });
                    }
                    None => results[index] = Some(Ok(Delivery::default())),
                },
                Payload::Score { leaderboard, .. } => match catalog.leaderboards.contains_key(leaderboard) {
                    true => {
                        let slot = leaderboards.slot(&message.tenant, leaderboard);
                        leaderboards.add(slot, index, LeaderboardCommand::Score { message });
                    }
                    false => results[index] = Some(Ok(Delivery::default())),
                },
                Payload::WheelDraw { .. } => draws.push((index, message)),
            }
        }
        let (jackpot_at, jackpot_ids, jackpot_calls) = jackpots.split();
        let (leaderboard_at, leaderboard_ids, leaderboard_calls) = leaderboards.split();
        let (jackpot_replies, leaderboard_replies) = futures_util::future::join(
            self.jackpots.call_each(jackpot_calls),
            self.leaderboards.call_each(leaderboard_calls),
        )
        .await;
        spread(&mut results, &jackpot_at, jackpot_replies, |slot, reply| {
            let (tenant, jackpot) = &jackpot_ids[slot];
            contributed(tenant, jackpot, reply)
        });
        spread(&mut results, &leaderboard_at, leaderboard_replies, |slot, reply| {
            scored(&leaderboard_ids[slot].1, reply)
        });
        for (index, message) in draws {
            results[index] = Some(self.deliver(&message, catalog).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ServiceError::internal("an outbox message was not delivered"))))
            .collect()
    }

    /// Tells watchers what a durable delivery changed.
    fn publish(&self, tenant: &str, delivery: &Delivery) {
        if let Some((jackpot, update)) = &delivery.pool {
            self.live.publish_pool(tenant, jackpot.as_str(), update.clone());
        }
        if let Some((jackpot, hit)) = &delivery.hit {
            self.live.publish_hit(tenant, jackpot.as_str(), hit.clone());
        }
        if let Some(leaderboard) = &delivery.leaderboard {
            self.live.publish_leaderboard(tenant, leaderboard.as_str());
        }
    }

    /// Asks the wheel to draw for a reserved spin and settles the result
    /// back to the customer.
    async fn settle_draw(
        &self,
        message: &OutboxMessage,
        catalog: &Catalog,
    ) -> ServiceResult<(Reply<CustomerAnswer>, Option<Ticket>)> {
        let Payload::WheelDraw { wheel, customer, request_id, .. } = &message.payload else {
            return Err(ServiceError::internal("not a draw request"));
        };
        let tenant = parse_id("tenant", &message.tenant)?;
        let (draw, wheel_ticket) = match catalog.wheels.get(wheel) {
            Some(def) => {
                let reply = self
                    .wheels
                    .call(
                        &entity(&tenant, EntityKind::Wheel, wheel),
                        WheelCommand::Draw { message: message.clone(), def: def.clone() },
                    )
                    .await?;
                match reply.answer {
                    WheelAnswer::Drawn(draw) => (Some(draw), reply.ticket),
                    WheelAnswer::Exhausted => (None, reply.ticket),
                    WheelAnswer::State(_) => {
                        return Err(ServiceError::internal("a wheel answered a draw with its state"))
                    }
                }
            }
            None => (None, None),
        };
        let settled = self
            .customers
            .call(
                &entity(&tenant, EntityKind::Customer, customer),
                CustomerCommand::SettleSpin {
                    wheel: wheel.clone(),
                    request_id: request_id.clone(),
                    draw,
                    fingerprint: spin_fingerprint(customer, wheel),
                },
            )
            .await?;
        let ticket = settled.ticket.max(wheel_ticket);
        Ok((settled, ticket))
    }

    // ------------------------------------------------------------- spins

    pub async fn spin(
        &self,
        key: Option<&str>,
        tenant: &str,
        wheel: &str,
        request: api::SpinRequest,
    ) -> ServiceResult<api::SpinAnswer> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Pos])?;
        let wheel = parse_id("wheel", wheel)?;
        let customer = parse_id("customer", &request.customer)?;
        let request_id = parse_id("request_id", &request.request_id)?;
        let catalog = entry.catalog();
        let def = catalog.wheels.get(&wheel).ok_or_else(|| ServiceError::not_found("wheel", wheel.as_str()))?;
        let tenant_id = &entry.tenant.id;
        // One spin per request id at a time, as for event ids: the same id
        // sent at once for two customers reached two actors that each found
        // it unused, and both reserved a spin.
        let _in_flight = self.in_flight.acquire(self.in_flight.key(tenant_id, SPIN_SCOPE, &request_id)).await;
        let reserved = self
            .customers
            .call(
                &entity(tenant_id, EntityKind::Customer, &customer),
                CustomerCommand::ReserveSpin {
                    wheel: wheel.clone(),
                    def: def.clone(),
                    request_id: request_id.clone(),
                    fingerprint: spin_fingerprint(&customer, &wheel),
                },
            )
            .await?;
        let (settled, duplicate, ticket) = match reserved.answer {
            CustomerAnswer::Spin(settled) => (settled, true, reserved.ticket),
            CustomerAnswer::Reserved(message) => {
                let (reply, ticket) = self.settle_draw(&message, &catalog).await?;
                let CustomerAnswer::Spin(settled) = reply.answer else {
                    return Err(ServiceError::internal("a customer answered a settlement with something else"));
                };
                self.durable(ticket.max(reserved.ticket)).await?;
                self.journal.outbox_ack(vec![message.storage_key()])?;
                (settled, reply.duplicate, ticket)
            }
            _ => return Err(ServiceError::internal("a customer answered a spin with something else")),
        };
        self.durable(ticket).await?;
        let Some(draw) = settled.draw else {
            return Err(ServiceError::refused(
                "out_of_stock",
                "every prize of this wheel is out of stock; the spin's cost was refunded",
            ));
        };
        if !duplicate {
            self.metrics.spins.with_label_values(&[tenant_id.as_str(), wheel.as_str(), prize_kind(&draw.prize)]).inc();
        }
        Ok(api::SpinAnswer {
            request_id,
            duplicate,
            wheel,
            segment: draw.label,
            prize: draw.prize,
            draw_id: draw.draw_id,
            points_balance: settled.points_balance,
        })
    }

    // -------------------------------------------------------- read views

    pub async fn customer(
        &self,
        key: Option<&str>,
        tenant: &str,
        customer: &str,
    ) -> ServiceResult<api::CustomerAnswer> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator, Role::Pos])?;
        let customer = parse_id("customer", customer)?;
        let reply = self
            .customers
            .call(&entity(&entry.tenant.id, EntityKind::Customer, &customer), CustomerCommand::View)
            .await?;
        let CustomerAnswer::View(state) = reply.answer else {
            return Err(ServiceError::internal("a customer answered a view with something else"));
        };
        if state.stats.events == 0 && state.pending_spins.is_empty() && state.spins.is_empty() {
            return Err(ServiceError::not_found("customer", customer.as_str()));
        }
        Ok(api::CustomerAnswer::new(customer, &state, &entry.catalog().missions))
    }

    pub async fn jackpot(&self, key: Option<&str>, tenant: &str, jackpot: &str) -> ServiceResult<api::JackpotAnswer> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator, Role::Pos, Role::Display])?;
        let jackpot = parse_id("jackpot", jackpot)?;
        let def = entry
            .catalog()
            .jackpots
            .get(&jackpot)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("jackpot", jackpot.as_str()))?;
        let reply = self
            .jackpots
            .call(&entity(&entry.tenant.id, EntityKind::Jackpot, &jackpot), JackpotCommand::Ensure { def })
            .await?;
        self.durable(reply.ticket).await?;
        match reply.answer {
            JackpotAnswer::State(Some(state)) => Ok(api::JackpotAnswer::new(jackpot, &state)),
            _ => Err(ServiceError::internal("a jackpot answered a view without its state")),
        }
    }

    fn leaderboard_entry(
        &self,
        key: Option<&str>,
        tenant: &str,
        leaderboard: &str,
    ) -> ServiceResult<(Arc<TenantEntry>, Id, LeaderboardDef)> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator, Role::Pos, Role::Display])?;
        let id = parse_id("leaderboard", leaderboard)?;
        let def = entry
            .catalog()
            .leaderboards
            .get(&id)
            .cloned()
            .ok_or_else(|| ServiceError::not_found("leaderboard", id.as_str()))?;
        Ok((entry, id, def))
    }

    pub async fn leaderboard(
        &self,
        key: Option<&str>,
        tenant: &str,
        leaderboard: &str,
        top: Option<u32>,
    ) -> ServiceResult<api::LeaderboardAnswer> {
        let (entry, id, def) = self.leaderboard_entry(key, tenant, leaderboard)?;
        let count = top.unwrap_or(def.top_size);
        if count == 0 || MAX_ENTRIES < count {
            return Err(ServiceError::invalid("top", "must be between 1 and 1000"));
        }
        let reply = self
            .leaderboards
            .call(
                &entity(&entry.tenant.id, EntityKind::Leaderboard, &id),
                LeaderboardCommand::Top { count: count as usize },
            )
            .await?;
        match reply.answer {
            LeaderboardAnswer::Top { entries, members } => {
                Ok(api::LeaderboardAnswer { leaderboard: id, metric: def.metric, members, entries })
            }
            _ => Err(ServiceError::internal("a leaderboard answered top-N with something else")),
        }
    }

    pub async fn leaderboard_around(
        &self,
        key: Option<&str>,
        tenant: &str,
        leaderboard: &str,
        customer: &str,
        around: Option<u32>,
    ) -> ServiceResult<api::AroundAnswer> {
        let (entry, id, _) = self.leaderboard_entry(key, tenant, leaderboard)?;
        let customer = parse_id("customer", customer)?;
        let count = around.unwrap_or(2);
        if 100 < count {
            return Err(ServiceError::invalid("around", "must be between 0 and 100"));
        }
        let reply = self
            .leaderboards
            .call(
                &entity(&entry.tenant.id, EntityKind::Leaderboard, &id),
                LeaderboardCommand::Around { customer: customer.clone(), count: count as usize },
            )
            .await?;
        match reply.answer {
            LeaderboardAnswer::Around { me, around } => Ok(api::AroundAnswer {
                leaderboard: id,
                customer,
                rank: me.as_ref().map(|e| e.rank),
                score: me.map_or(0, |e| e.score),
                around,
            }),
            _ => Err(ServiceError::internal("a leaderboard answered around-me with something else")),
        }
    }

    /// The audit records of one wheel's draws or one jackpot's hits, in
    /// order, from `after` (a draw number or cycle) on: everything needed to
    /// re-check each one.
    pub async fn audit(
        &self,
        key: Option<&str>,
        tenant: &str,
        kind: &str,
        game: &str,
        after: Option<u32>,
        limit: Option<u32>,
    ) -> ServiceResult<api::AuditAnswer> {
        let (_, entry) = self.authorise(key, tenant, &[Role::Operator])?;
        let kind = match kind {
            "wheels" => "wheel",
            "jackpots" => "jackpot",
            _ => return Err(ServiceError::not_found("audit kind", kind)),
        };
        let game = parse_id(kind, game)?;
        let limit = limit.unwrap_or(100);
        if limit == 0 || 1_000 < limit {
            return Err(ServiceError::invalid("limit", "must be between 1 and 1000"));
        }
        // Every draw and hit answered so far is in the tree once the writer
        // has indexed what is durable.
        self.journal.indexed().await?;
        let records =
            self.audit_records(entry.tenant.id.as_str(), kind, game.as_str(), after.unwrap_or(0), limit as usize)?;
        Ok(api::AuditAnswer { records })
    }

    /// Up to `limit` audit records of one game after draw or cycle `after`.
    fn audit_records(
        &self,
        tenant: &str,
        kind: &str,
        game: &str,
        after: u32,
        limit: usize,
    ) -> ServiceResult<Vec<serde_json::Value>> {
        let prefix = crate::storage::key(&[tenant, kind, game, ""]);
        let start = crate::storage::key(&[tenant, kind, game, &format!("{:012}", u64::from(after) + 1)]);
        let mut records = Vec::new();
        for item in self.store.audit.range(start..) {
            let (storage_key, value) = item.map_err(crate::storage::StorageError::from)?;
            if !storage_key.starts_with(&prefix) || records.len() == limit {
                break;
            }
            records.push(serde_json::from_slice(&value).map_err(ServiceError::internal)?);
        }
        Ok(records)
    }

    // ------------------------------------------------------- live streams

    /// A jackpot's live updates: its current pool first, then the hits a
    /// reconnecting watcher missed (from `last_event_id`), then every pool
    /// change (at most ten a second, always the latest) and every hit.
    /// The stream ends when the receiver is dropped.
    pub async fn watch_jackpot(
        self: &Arc<Self>,
        key: Option<&str>,
        tenant: &str,
        jackpot: &str,
        last_event_id: Option<&str>,
    ) -> ServiceResult<tokio::sync::mpsc::Receiver<JackpotEvent>> {
        let current = self.jackpot(key, tenant, jackpot).await?;
        let tenant = current_tenant(tenant)?;
        let jackpot = current.jackpot.clone();
        let live_pool = PoolUpdate {
            cycle: current.cycle,
            contributed_minor: current.books.contributed_minor,
            pool_minor: current.pool_minor,
        };
        self.live.publish_pool(&tenant, jackpot.as_str(), live_pool);
        let mut pool = self.live.watch_pool(&tenant, jackpot.as_str());
        let mut hits = self.live.watch_hits(&tenant, jackpot.as_str());
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let first = pool.borrow_and_update().clone();
        let _ = sender.send(JackpotEvent::pool(&first)).await;
        if let Some(seen_cycle) = last_event_id.and_then(cycle_seen) {
            for hit in self.missed_hits(&tenant, jackpot.as_str(), seen_cycle, current.cycle) {
                let _ = sender.send(JackpotEvent::Hit(hit)).await;
            }
        }
        let service = self.clone();
        let stopped = self.live.stopped();
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut last_hit_cycle = current.cycle.saturating_sub(1);
            loop {
                tokio::select! {
                    () = sender.closed() => return,
                    () = &mut stopped => return,
                    hit = hits.recv() => match hit {
                        Ok(hit) => {
                            last_hit_cycle = last_hit_cycle.max(hit.cycle);
                            if sender.send(JackpotEvent::Hit(hit)).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Fell behind: catch up on hits from the audit.
                            let now = pool.borrow().cycle;
                            for hit in service.missed_hits(&tenant, jackpot.as_str(), last_hit_cycle + 1, now) {
                                last_hit_cycle = hit.cycle;
                                if sender.send(JackpotEvent::Hit(hit)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    changed = pool.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let update = pool.borrow_and_update().clone();
                        if sender.send(JackpotEvent::pool(&update)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(COALESCE).await;
                    }
                }
            }
        });
        Ok(receiver)
    }

    /// Hits of cycles `from..until`, from the audit.
    fn missed_hits(&self, tenant: &str, jackpot: &str, from: u64, until: u64) -> Vec<api::HitAnswer> {
        let after = u32::try_from(from.saturating_sub(1)).unwrap_or(u32::MAX);
        let records = self.audit_records(tenant, "jackpot", jackpot, after, 1_000).unwrap_or_default();
        records
            .into_iter()
            .filter_map(|record| serde_json::from_value::<bazaar_games::jackpot::Hit>(record["hit"].clone()).ok())
            .filter(|hit| hit.cycle < until)
            .map(|hit| api::HitAnswer::from(&hit))
            .collect()
    }

    /// A leaderboard's top entries now, then whenever they change (checked
    /// at most ten times a second).
    pub async fn watch_leaderboard(
        self: &Arc<Self>,
        key: Option<&str>,
        tenant: &str,
        leaderboard: &str,
        top: Option<u32>,
    ) -> ServiceResult<tokio::sync::mpsc::Receiver<api::LeaderboardAnswer>> {
        let first = self.leaderboard(key, tenant, leaderboard, top).await?;
        let tenant_id = current_tenant(tenant)?;
        let mut changes = self.live.watch_leaderboard(&tenant_id, first.leaderboard.as_str());
        changes.borrow_and_update();
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let _ = sender.send(first.clone()).await;
        let service = self.clone();
        let (key, tenant, leaderboard) = (key.map(str::to_owned), tenant.to_owned(), leaderboard.to_owned());
        let stopped = self.live.stopped();
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut last = first;
            loop {
                tokio::select! {
                    () = sender.closed() => return,
                    () = &mut stopped => return,
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        tokio::time::sleep(COALESCE).await;
                        changes.borrow_and_update();
                        let Ok(now) = service.leaderboard(key.as_deref(), &tenant, &leaderboard, top).await else {
                            return;
                        };
                        if now.entries != last.entries {
                            if sender.send(now.clone()).await.is_err() {
                                return;
                            }
                            last = now;
                        }
                    }
                }
            }
        });
        Ok(receiver)
    }

    // ---------------------------------------------------- housekeeping

    /// Delivers every outbox message older than `min_age` (all of them at
    /// start-up): the retry path for deliveries a crash or an error cut
    /// short. Returns how many were delivered.
    ///
    /// A [`REDELIVERY_CHUNK`] of a tenant's messages at a time, in the
    /// tree's order, as a batch's are delivered: one actor message per
    /// receiver, one wait for durability, one acknowledgement. One message
    /// at a time, each waiting for its own commit, went about 5,000 a
    /// second (a node restarted after `kill -9` under batched load spent
    /// a second on its boards' 5,000-odd scores before it listened; now a
    /// tenth of that), and a board behind by the [`SCORES_IN_FLIGHT`]
    /// scores it may be would have cost a restart over ten seconds.
    pub async fn redeliver(&self, min_age: Duration) -> usize {
        let cutoff = now_millis() - i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
        let mut delivered = 0;
        let mut after: Option<Vec<u8>> = None;
        // A chunk read at a time: no iterator of the tree held across a wait.
        loop {
            let from = match after.take() {
                Some(key) => std::ops::Bound::Excluded(key),
                None => std::ops::Bound::Unbounded,
            };
            let items = self.store.outbox.range((from, std::ops::Bound::Unbounded)).filter_map(Result::ok);
            let (chunk, last) = next_chunk(items, cutoff, REDELIVERY_CHUNK);
            if chunk.is_empty() {
                // Records not due yet: other tasks go first.
                tokio::task::yield_now().await;
            } else {
                delivered += self.redeliver_chunk(chunk).await;
            }
            match last {
                Some(last) => after = Some(last),
                None => return delivered,
            }
        }
    }

    /// Delivers one tenant's `messages`, waits for what they changed to be
    /// durable and acknowledges those delivered. Returns how many were.
    async fn redeliver_chunk(&self, messages: Vec<OutboxMessage>) -> usize {
        let Some(entry) = Id::parse(&messages[0].tenant).ok().and_then(|tenant| self.tenancy.tenant(&tenant).ok())
        else {
            return 0;
        };
        let tenant = messages[0].tenant.clone();
        let keys: Vec<Vec<u8>> = messages.iter().map(OutboxMessage::storage_key).collect();
        let deliveries = self.deliver_many(messages, &entry.catalog()).await;
        let last_ticket = deliveries.iter().filter_map(|delivery| delivery.as_ref().ok()?.ticket).max();
        if let Err(error) = self.durable(last_ticket).await {
            tracing::warn!(%error, "outbox redelivery not durable; will retry");
            return 0;
        }
        let mut acknowledged = Vec::with_capacity(keys.len());
        let mut published = Vec::with_capacity(keys.len());
        for (key, delivery) in keys.into_iter().zip(deliveries) {
            match delivery {
                Ok(delivery) => {
                    acknowledged.push(key);
                    published.push(delivery);
                }
                Err(error) => tracing::warn!(
                    %error,
                    message = %String::from_utf8_lossy(&key),
                    "outbox delivery failed; will retry"
                ),
            }
        }
        if acknowledged.is_empty() || self.journal.outbox_ack(acknowledged).is_err() {
            return 0;
        }
        for delivery in &published {
            self.publish(&tenant, delivery);
        }
        published.len()
    }

    /// Recomputes the engagement gauges of every tenant from the customers'
    /// snapshots (blocking: run it off the async threads). Customers active
    /// in memory count as of their last snapshot, at most a checkpoint
    /// interval old.
    ///
    /// It reads and decodes every customer's snapshot: 300,000 of them
    /// took 0.4-0.6 s of a core in one go, one of the two the answers
    /// needed. So it paces itself: after each `ENGAGEMENT_SLICE`
    /// customers it rests `ENGAGEMENT_REST` times as long as the slice
    /// took (1.6-2.3 s in all for those 300,000). A node that stops
    /// meanwhile leaves the gauges as they were. It logs its figures at
    /// debug level.
    pub fn refresh_engagement(&self) -> ServiceResult<()> {
        use bazaar_games::engagement::{Tally, KINDS, WINDOWS};
        let now = now_millis();
        let mut slice = (0, std::time::Instant::now());
        let (started, mut customers, mut busy) = (std::time::Instant::now(), 0, Duration::ZERO);
        for tenant in self.tenancy.tenant_ids() {
            let mut tallies = [Tally::default(); WINDOWS.len()];
            let prefix = crate::storage::key(&[tenant.as_str(), EntityKind::Customer.as_str(), ""]);
            for item in self.store.snapshots.scan_prefix(prefix) {
                slice.0 += 1;
                customers += 1;
                if ENGAGEMENT_SLICE <= slice.0 {
                    busy += slice.1.elapsed();
                    std::thread::sleep(slice.1.elapsed() * ENGAGEMENT_REST);
                    if !self.is_ready() {
                        return Ok(());
                    }
                    slice = (0, std::time::Instant::now());
                }
                let (_, value) = item.map_err(crate::storage::StorageError::from)?;
                let snapshot: crate::journal::Snapshot = decode(&value)?;
                let customer: bazaar_games::customer::Customer = decode(&snapshot.state)?;
                for (tally, (_, length)) in tallies.iter_mut().zip(WINDOWS) {
                    tally.add(&customer, now, length);
                }
            }
            for (tally, (window, _)) in tallies.iter().zip(WINDOWS) {
                let labels = |kind: &'static str| [tenant.as_str(), window, kind];
                self.metrics.engagement_customers.with_label_values(&labels("active")).set(tally.active as i64);
                for kind in KINDS {
                    self.metrics.engagement_ratio.with_label_values(&labels(kind)).set(tally.ratio(kind));
                    self.metrics.engagement_customers.with_label_values(&labels(kind)).set(tally.count(kind) as i64);
                }
            }
        }
        self.metrics.engagement_refreshes.inc();
        busy += slice.1.elapsed();
        tracing::debug!(
            customers,
            busy_ms = busy.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engagement gauges refreshed"
        );
        Ok(())
    }

    /// Snapshots every active actor and drops the journal they cover, at
    /// `pace`: spread while serving (the customers' snapshots over
    /// [`ServiceConfig::checkpoint_spread`], unless the node stops
    /// meanwhile; the disk space a slice at a time), at once for a stop.
    pub async fn checkpoint(&self, pace: crate::storage::Pace) -> ServiceResult<()> {
        // Snapshots recovery left in memory cover part of the journal too.
        self.write_recovered().await?;
        let started = std::time::Instant::now();
        let marker = self.journal.marker().await?;
        // Spread over part of the interval while the node serves (the
        // customers are nearly all of them); at once for a stop's.
        let spread = match pace {
            crate::storage::Pace::Spread => self.config.checkpoint_spread,
            crate::storage::Pace::AtOnce => Duration::ZERO,
        };
        tracing::debug!(upto = marker, spread_ms = spread.as_millis() as u64, "checkpoint begins");
        let snapshots = self.customers.snapshot_all(spread, self.live.stopped()).await
            + self.wheels.snapshot_all(Duration::ZERO, std::future::pending()).await
            + self.jackpots.snapshot_all(Duration::ZERO, std::future::pending()).await
            + self.leaderboards.snapshot_all(Duration::ZERO, std::future::pending()).await;
        self.journal.checkpoint(marker, pace).await?;
        tracing::info!(snapshots, elapsed_ms = started.elapsed().as_millis() as u64, "checkpoint written");
        Ok(())
    }

    /// Writes the snapshots recovery left in memory, a slice at a time,
    /// off the async threads.
    pub async fn write_recovered(&self) -> ServiceResult<()> {
        let node = self.customers.node().clone();
        if node.recovered.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        loop {
            let node = node.clone();
            let (written, left) =
                tokio::task::spawn_blocking(move || node.recovered.write_some(&node.store, RECOVERED_SLICE))
                    .await
                    .map_err(ServiceError::internal)??;
            if left == 0 {
                // The background writer and a checkpoint may both be at it:
                // whoever wrote the last slice says so.
                if 0 < written {
                    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "recovered snapshots written");
                }
                return Ok(());
            }
        }
    }
}

/// Snapshots written per slice of [`Service::write_recovered`]; activations
/// wait for at most one slice.
const RECOVERED_SLICE: usize = 256;

/// Customers an engagement refresh reads before it rests.
const ENGAGEMENT_SLICE: usize = 1_000;

/// How many times as long as a slice took an engagement refresh rests
/// after it: a quarter of a core at most, while answers need the rest.
const ENGAGEMENT_REST: u32 = 3;

/// The most updates a watcher may have waiting before the stream stops
/// producing (it then skips to the latest pool value).
const WATCH_BUFFER: usize = 16;

/// The shortest time between two pool updates or leaderboard checks sent to
/// one watcher: at most ten a second.
const COALESCE: Duration = Duration::from_millis(100);

/// One update of a jackpot stream, with its event id: `<cycle>.<contributed
/// minor>` for pools, `hit-<cycle>` for hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JackpotEvent {
    Pool { id: String, pool_minor: i64, cycle: u64 },
    Hit(api::HitAnswer),
}

impl JackpotEvent {
    fn pool(update: &PoolUpdate) -> Self {
        Self::Pool {
            id: format!("{}.{}", update.cycle, update.contributed_minor),
            pool_minor: update.pool_minor,
            cycle: update.cycle,
        }
    }

    pub fn id(&self) -> String {
        match self {
            Self::Pool { id, .. } => id.clone(),
            Self::Hit(hit) => format!("hit-{}", hit.cycle),
        }
    }
}

/// The first cycle whose hit a watcher has not seen, from its last event
/// id: after a pool event of cycle c, the hits of cycles c and later; after
/// hit-c, those after c.
fn cycle_seen(last_event_id: &str) -> Option<u64> {
    if let Some(cycle) = last_event_id.strip_prefix("hit-") {
        return cycle.parse::<u64>().ok().map(|c| c + 1);
    }
    last_event_id.split('.').next()?.parse().ok()
}

fn current_tenant(tenant: &str) -> ServiceResult<String> {
    Ok(parse_id("tenant", tenant)?.to_string())
}

fn tenant_answer(tenant: &Tenant) -> api::TenantAnswer {
    api::TenantAnswer {
        id: tenant.id.to_string(),
        name: tenant.name.clone(),
        currency: tenant.currency.clone(),
        created_at: api::format_time(tenant.created_at),
    }
}

fn require_campaign(catalog: &Catalog, campaign: &Id) -> ServiceResult<()> {
    if catalog.campaigns.contains_key(campaign) {
        Ok(())
    } else {
        Err(not_defined("campaign", "campaign", campaign))
    }
}

/// A definition refers to something not defined: 400 naming the field.
fn not_defined(field: &str, what: &str, id: &Id) -> ServiceError {
    ServiceError::invalid(
        field,
        format!("names {what} {:?}, which is not defined in this tenant; define it first", id.as_str()),
    )
}

/// A request names an entity that does not exist: 404 naming the field.
fn not_found_field(field: &str, what: &str, id: &Id) -> ServiceError {
    ServiceError::new(Code::NotFound, format!("{what} {:?} does not exist in this tenant", id.as_str()))
        .with_field(field)
}

fn spin_fingerprint(customer: &Id, wheel: &Id) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{customer}/{wheel}").as_bytes())
}

/// The `kind` label of an event's counter. Custom kinds share one label
/// value, so operators' names cannot grow the metric's label set without
/// bound.
fn kind_label(kind: &EventKind) -> &'static str {
    kind.builtin_name().unwrap_or("custom")
}

/// The events a request recorded, by counter label, and the retries it
/// answered.
#[derive(Default)]
struct Tally {
    kinds: Vec<(&'static str, u64)>,
    duplicates: u64,
}

/// Tallies a recorded event and builds its public answer.
fn answered(
    tally: &mut Tally,
    event_id: Id,
    kind: &'static str,
    applied: Applied,
    deliveries: Vec<Delivery>,
) -> api::EventAnswer {
    if applied.duplicate {
        tally.duplicates += 1;
    } else {
        match tally.kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => tally.kinds.push((kind, 1)),
        }
    }
    let answer = applied.answer.summary;
    api::EventAnswer {
        event_id,
        duplicate: applied.duplicate,
        points_earned: answer.points_earned,
        points_balance: answer.points_balance,
        tier: answer.tier,
        spins_granted: answer.spins_granted,
        missions: answer.missions,
        coupons: answer.coupons,
        jackpots: deliveries.into_iter().filter_map(|d| d.jackpot).collect(),
    }
}

fn prize_kind(prize: &WonPrize) -> &'static str {
    match prize {
        WonPrize::Points(_) => "points",
        WonPrize::Spins(_) => "spins",
        WonPrize::Coupon(_) => "coupon",
        WonPrize::CashbackMinor(_) => "cashback",
        WonPrize::Item(_) => "item",
        WonPrize::Nothing => "nothing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn redelivery_takes_one_tenants_due_messages_a_chunk_at_a_time_and_reads_every_record_once() {
        let id = |text: &str| Id::parse(text).expect("an id");
        // (tenant, messages, made at): the tree's records, in key order.
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (tenant, count, at) in [("a", 2_500, 10), ("b", 3, 99), ("b", 2, 10), ("c", 1, 10)] {
            for n in 0..count {
                let message =
                    OutboxMessage::score(tenant, &id(&format!("e-{at}-{n:05}")), &id("top"), &id("c-1"), 1, at);
                records.push(message.record());
            }
        }
        records.insert(1_200, (b"a/garbled".to_vec(), b"not a message".to_vec()));
        records.sort();
        let mut chunks = Vec::new();
        let mut from = 0;
        loop {
            let (chunk, last) = next_chunk(records[from..].iter().cloned(), 50, 1_000);
            let tenants: std::collections::BTreeSet<String> = chunk.iter().map(|m| m.tenant.clone()).collect();
            assert!(tenants.len() <= 1, "one tenant a chunk: {tenants:?}");
            chunks.push((tenants.into_iter().next(), chunk.len()));
            let Some(last) = last else { break };
            from = records.iter().position(|(key, _)| *key == last).expect("a key read") + 1;
        }
        let a = Some("a".to_owned());
        let expected = vec![
            (a.clone(), 1_000),
            (a.clone(), 1_000),
            (a, 500),
            (Some("b".into()), 2),
            (Some("c".into()), 1),
            (None, 0),
        ];
        assert_eq!(chunks, expected, "b's three messages too new to deliver yet, the garbled record passed over");

        // Not due yet, all of them: read a bounded slice at a time, to the end.
        let (chunk, last) = next_chunk(records.iter().cloned(), 5, 100);
        assert!(chunk.is_empty());
        assert_eq!(last.as_deref(), Some(&records[399].0[..]), "400 records read, no more");
    }

    #[tokio::test]
    async fn a_key_has_one_holder_at_a_time_and_is_forgotten_when_free() {
        let locks = KeyedLock::default();
        let first = locks.acquire(7).await;
        let mut second = std::pin::pin!(locks.acquire(7));
        let mut third = std::pin::pin!(locks.acquire(7));
        assert!(second.as_mut().now_or_never().is_none(), "the key is held");
        assert!(third.as_mut().now_or_never().is_none(), "the key is held");
        // Another key (in the same shard) is free meanwhile.
        drop(locks.acquire(7 + KEYED_SHARDS as u64).now_or_never().expect("another key is free"));

        drop(first);
        // Both waiters are woken; the first polled takes the key, the
        // other waits for it again.
        let second = second.await;
        assert!(third.as_mut().now_or_never().is_none(), "the second holder has it");
        drop(second);
        drop(third.await);
        assert!(locks.shards.iter().all(|shard| shard.lock().is_empty()), "no key stays behind");
    }

    #[tokio::test]
    async fn a_set_of_keys_is_taken_whole_in_one_order() {
        let locks = KeyedLock::default();
        let guards = locks.acquire_all(vec![3, 1, 3, 2]).await;
        assert_eq!(guards.iter().map(|guard| guard.key).collect::<Vec<_>>(), [1, 2, 3], "sorted, each once");
        let mut overlapping = std::pin::pin!(locks.acquire_all(vec![4, 2]));
        assert!(overlapping.as_mut().now_or_never().is_none(), "2 is held");
        drop(guards);
        assert_eq!(overlapping.await.len(), 2);
        assert!(locks.shards.iter().all(|shard| shard.lock().is_empty()), "no key stays behind");
    }
}
