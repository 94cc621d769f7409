//! The four entity kinds as actors see them: how each command maps onto the
//! pure state machines of `bazaar-games`, what is journaled and audited.
//!
//! Customers and wheels journal their whole new state (a post-image of a
//! few hundred bytes): replay then needs neither the definitions nor the
//! random draws of the time. Leaderboards can hold millions of members, so
//! they journal the score change instead and replay it. Jackpots journal
//! their whole state when a cycle starts or ends (a hit draws the next
//! cycle's secret) and, for every other contribution, the three amounts it
//! changed: a mall's jackpot takes a contribution with most purchases, and
//! its whole state was a sixth of the journal's bytes under batched load
//! (1,135 bytes an event, 949 since).

use crate::actor::{Dedupe, Entity, Env, Handled};
use crate::error::{ServiceError, ServiceResult};
use crate::outbox::{OutboxMessage, Payload};
use crate::storage::{decode, encode, key, StorageError, StorageResult, FIXED_WIDTH_VERSION};
use bazaar_cluster::{EntityKey, EntityKind};
use bazaar_games::catalog::Catalog;
use bazaar_games::customer::{Customer, MissionStatus, SpinRefusal};
use bazaar_games::event::Event;
use bazaar_games::jackpot::{ContributionOutcome, JackpotDef, JackpotState};
use bazaar_games::leaderboard::{Entry, Leaderboard};
use bazaar_games::wheel::{Draw, WheelDef, WheelState};
use bazaar_games::{Id, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

// ---------------------------------------------------------------- customer

pub struct CustomerEntity;

#[derive(Clone)]
pub enum CustomerCommand {
    Event {
        event: Event,
        fingerprint: u64,
        catalog: Arc<Catalog>,
    },
    /// Take a spin's cost; answers with the draw request to deliver.
    ReserveSpin {
        wheel: Id,
        def: WheelDef,
        request_id: Id,
        fingerprint: u64,
    },
    /// Credit the drawn prize (or refund when the wheel ran dry).
    SettleSpin {
        wheel: Id,
        request_id: Id,
        draw: Option<Draw>,
        fingerprint: u64,
    },
    View,
}

/// The customer's part of an event's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventAnswer {
    pub summary: EventSummary,
    /// Messages to jackpots and leaderboards this event caused.
    pub deliveries: Vec<OutboxMessage>,
}

/// What an event did for its customer, as its answer says (bincode writes
/// a struct's fields in place, so an `EventAnswer` is encoded as it was
/// when these were its own fields: idempotency records written then read
/// the same).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSummary {
    pub points_earned: i64,
    pub points_balance: i64,
    pub tier: Option<String>,
    pub spins_granted: BTreeMap<Id, u32>,
    pub missions: Vec<MissionStatus>,
    pub coupons: Vec<String>,
}

/// A settled spin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpinAnswer {
    pub wheel: Id,
    /// `None`: every prize was out of stock and the cost was refunded.
    pub draw: Option<Draw>,
    pub points_balance: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum CustomerAnswer {
    Event(EventAnswer),
    Reserved(OutboxMessage),
    Spin(SpinAnswer),
    View(Box<Customer>),
    /// An event's answer as its idempotency record keeps it; only ever
    /// read from a record, and made an `Event` again at once
    /// (`CustomerEntity::recalled`). Records written before it hold the
    /// `Event` itself, and are still read as such.
    Recorded(RecordedEvent),
}

/// `CustomerAnswer::Recorded`'s index among its variants (bincode writes
/// an enum's variant as its index).
const RECORDED_VARIANT: u32 = 4;

/// What an event's idempotency record keeps of its answer: the answer but
/// for its messages, of which only the contributions to jackpots, and of
/// those only what their key and the record's do not say.
///
/// A retry answers with what each jackpot's record of its contribution
/// says, so the contributions are delivered again: they are made again
/// from this, the tenant and customer of the record's actor and the
/// event's id. The scores are left out: no answer shows one, and a score
/// not applied yet waits in the outbox, which delivers it (a retry
/// delivers those waiting in the `outbox` tree at once, found by their
/// keys: `Service::redeliverable`). Each message whole (tenant, its id,
/// the customer, again and again) was two thirds of an event's record
/// with a mall's jackpot and a leaderboard: bytes of the journal, and of
/// the idempotency index for ever.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub summary: EventSummary,
    pub contributions: Vec<RecordedContribution>,
}

/// A contribution as [`RecordedEvent`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedContribution {
    pub jackpot: Id,
    pub amount_minor: i64,
    pub at: UnixMillis,
    /// The message's `created_at`.
    pub created_at: UnixMillis,
}

/// An event's answer encoded as `CustomerAnswer::Recorded` would be,
/// straight from the answer (a [`RecordedEvent`] built first would copy its
/// strings and maps, for every event).
struct AsRecorded<'a>(&'a EventAnswer);

impl Serialize for AsRecorded<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_variant("CustomerAnswer", RECORDED_VARIANT, "Recorded", &RecordedFields(self.0))
    }
}

/// [`RecordedEvent`]'s fields, in its order, from the answer.
struct RecordedFields<'a>(&'a EventAnswer);

impl Serialize for RecordedFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let answer = self.0;
        let mut event = serializer.serialize_struct("RecordedEvent", 2)?;
        event.serialize_field("summary", &answer.summary)?;
        event.serialize_field("contributions", &RecordedContributions(&answer.deliveries))?;
        event.end()
    }
}

/// The contributions among an answer's messages, each as a
/// [`RecordedContribution`].
struct RecordedContributions<'a>(&'a [OutboxMessage]);

impl Serialize for RecordedContributions<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let contributions = self.0.iter().filter_map(|message| match &message.payload {
            Payload::Contribution { jackpot, amount_minor, at, .. } => {
                Some((jackpot, amount_minor, at, message.created_at))
            }
            _ => None,
        });
        // bincode writes a sequence's length first.
        let mut sequence = serializer.serialize_seq(Some(contributions.clone().count()))?;
        for contribution in contributions {
            sequence.serialize_element(&contribution)?;
        }
        sequence.end()
    }
}

/// The idempotency scope of events' ids (part of their records' keys).
pub const EVENT_SCOPE: &str = "event";
/// The idempotency scope of spins' request ids.
pub const SPIN_SCOPE: &str = "spin";

impl Entity for CustomerEntity {
    const KIND: EntityKind = EntityKind::Customer;
    type State = Customer;
    type Command = CustomerCommand;
    type Answer = CustomerAnswer;

    fn dedupe(command: &CustomerCommand) -> Option<Dedupe<'_>> {
        match command {
            CustomerCommand::Event { event, fingerprint, .. } => {
                Some(Dedupe { scope: EVENT_SCOPE, id: event.event_id.as_str(), fingerprint: *fingerprint })
            }
            CustomerCommand::ReserveSpin { request_id, fingerprint, .. }
            | CustomerCommand::SettleSpin { request_id, fingerprint, .. } => {
                Some(Dedupe { scope: SPIN_SCOPE, id: request_id.as_str(), fingerprint: *fingerprint })
            }
            CustomerCommand::View => None,
        }
    }

    fn handle(
        customer: &mut Customer,
        env: &mut Env<'_>,
        command: CustomerCommand,
    ) -> ServiceResult<Handled<CustomerAnswer>> {
        let tenant = env.key.tenant.as_str();
        match command {
            CustomerCommand::Event { event, catalog, .. } => {
                let outcome = customer.apply_event(&event, &catalog);
                let mut deliveries = Vec::new();
                for jackpot in &outcome.jackpots {
                    deliveries.push(OutboxMessage::contribution(
                        tenant,
                        &event.event_id,
                        jackpot,
                        &event.customer,
                        event.amount_minor,
                        event.at,
                        env.now,
                    ));
                }
                for (leaderboard, delta) in &outcome.leaderboard_deltas {
                    deliveries.push(OutboxMessage::score(
                        tenant,
                        &event.event_id,
                        leaderboard,
                        &event.customer,
                        *delta,
                        env.now,
                    ));
                }
                for mission in &outcome.steps_completed {
                    env.metrics.mission_steps.with_label_values(&[tenant, mission.as_str()]).inc();
                }
                for status in &outcome.missions {
                    if status.completed {
                        env.metrics.mission_completions.with_label_values(&[tenant, status.mission.as_str()]).inc();
                    }
                }
                let outbox = deliveries.iter().map(OutboxMessage::record).collect();
                let mut handled = Handled::changed(CustomerAnswer::Event(EventAnswer {
                    summary: EventSummary {
                        points_earned: outcome.points_earned,
                        points_balance: customer.points_balance,
                        tier: customer.tier.clone(),
                        spins_granted: outcome.spins_granted,
                        missions: outcome.missions,
                        coupons: outcome.coupons_won,
                    },
                    deliveries,
                }));
                handled.outbox = outbox;
                Ok(handled)
            }
            CustomerCommand::ReserveSpin { wheel, def, request_id, .. } => {
                let customer_id = Id::parse(&env.key.id).map_err(ServiceError::internal)?;
                let draw = OutboxMessage::wheel_draw(tenant, &wheel, &customer_id, &request_id, env.now);
                if customer.pending_spins.contains_key(&request_id) {
                    // A retry of a spin whose draw is not settled yet.
                    return Ok(Handled::read(CustomerAnswer::Reserved(draw)));
                }
                customer.reserve_spin(&wheel, &def, &request_id, env.now).map_err(|refusal| {
                    let reason = match refusal {
                        SpinRefusal::NoEntitlement { .. } => "no_entitlement",
                        SpinRefusal::NotEnoughPoints { .. } => "not_enough_points",
                        SpinRefusal::DailyLimit { .. } => "daily_limit",
                    };
                    ServiceError::refused(reason, refusal.to_string())
                })?;
                let mut handled = Handled::changed(CustomerAnswer::Reserved(draw.clone()));
                // The final answer, written when the spin settles, is the
                // idempotency record; the reservation is not.
                handled.remember = false;
                handled.outbox = vec![draw.record()];
                Ok(handled)
            }
            CustomerCommand::SettleSpin { wheel, request_id, draw, .. } => {
                let prize = draw.as_ref().map(|d| (&d.prize, d.draw_id.as_str()));
                if !customer.settle_spin(&request_id, prize, env.now) {
                    return Err(ServiceError::internal(format!("spin {request_id} is not pending")));
                }
                Ok(Handled::changed(CustomerAnswer::Spin(SpinAnswer {
                    wheel,
                    draw,
                    points_balance: customer.points_balance,
                })))
            }
            CustomerCommand::View => Ok(Handled::read(CustomerAnswer::View(Box::new(customer.clone())))),
        }
    }

    /// An event's answer as a [`RecordedEvent`], unless a message of it is
    /// one the record cannot make again (events send contributions and
    /// scores only; anything else keeps the whole answer).
    fn encode_record(buffer: &mut Vec<u8>, answer: &CustomerAnswer) {
        match answer {
            CustomerAnswer::Event(event)
                if event
                    .deliveries
                    .iter()
                    .all(|message| matches!(message.payload, Payload::Contribution { .. } | Payload::Score { .. })) =>
            {
                crate::storage::encode_into(buffer, &AsRecorded(event))
            }
            other => crate::storage::encode_into(buffer, other),
        }
    }

    /// A [`RecordedEvent`] made the event's answer again, its contributions
    /// as the handler made them (`key` is the customer's, `dedupe` the
    /// event's).
    fn recalled(answer: CustomerAnswer, key: &EntityKey, dedupe: &Dedupe<'_>) -> ServiceResult<CustomerAnswer> {
        let CustomerAnswer::Recorded(recorded) = answer else {
            return Ok(answer);
        };
        let event_id = Id::parse(dedupe.id).map_err(ServiceError::internal)?;
        let customer = Id::parse(&key.id).map_err(ServiceError::internal)?;
        let deliveries = recorded
            .contributions
            .iter()
            .map(|contribution| {
                OutboxMessage::contribution(
                    &key.tenant,
                    &event_id,
                    &contribution.jackpot,
                    &customer,
                    contribution.amount_minor,
                    contribution.at,
                    contribution.created_at,
                )
            })
            .collect();
        Ok(CustomerAnswer::Event(EventAnswer { summary: recorded.summary, deliveries }))
    }
}

// ------------------------------------------------------------------- wheel

pub struct WheelEntity;

// A command is built, sent and dropped once per call; boxing the draw would
// only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum WheelCommand {
    Draw { message: OutboxMessage, def: WheelDef },
    View,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WheelAnswer {
    Drawn(Draw),
    Exhausted,
    State(WheelState),
}

/// An audit record of one draw: everything needed to re-check it.
#[derive(Serialize)]
struct DrawAudit<'a> {
    kind: &'static str,
    wheel: &'a str,
    customer: &'a Id,
    request_id: &'a Id,
    at: UnixMillis,
    draw: &'a Draw,
}

impl Entity for WheelEntity {
    const KIND: EntityKind = EntityKind::Wheel;
    type State = WheelState;
    type Command = WheelCommand;
    type Answer = WheelAnswer;

    fn dedupe(command: &WheelCommand) -> Option<Dedupe<'_>> {
        match command {
            WheelCommand::Draw { message, .. } => Some(message.dedupe()),
            WheelCommand::View => None,
        }
    }

    fn handle(state: &mut WheelState, env: &mut Env<'_>, command: WheelCommand) -> ServiceResult<Handled<WheelAnswer>> {
        match command {
            WheelCommand::Draw { message, def } => {
                let crate::outbox::Payload::WheelDraw { customer, request_id, at, .. } = &message.payload else {
                    return Err(ServiceError::internal("a wheel received a message that is not a draw"));
                };
                let wheel = Id::parse(&env.key.id).map_err(ServiceError::internal)?;
                let Ok(draw) = state.draw(&wheel, &def, env.rng()) else {
                    return Ok(Handled::read(WheelAnswer::Exhausted));
                };
                let audit =
                    DrawAudit { kind: "wheel_draw", wheel: &env.key.id, customer, request_id, at: *at, draw: &draw };
                let audit_key = key(&[&env.key.tenant, "wheel", &env.key.id, &format!("{:012}", state.draws)]);
                let mut handled = Handled::changed(WheelAnswer::Drawn(draw.clone()));
                handled.audit = vec![(audit_key, serde_json::to_vec(&audit).map_err(ServiceError::internal)?)];
                Ok(handled)
            }
            WheelCommand::View => Ok(Handled::read(WheelAnswer::State(state.clone()))),
        }
    }
}

// ----------------------------------------------------------------- jackpot

pub struct JackpotEntity;

#[derive(Clone)]
pub enum JackpotCommand {
    /// Start the first cycle if the jackpot has none yet.
    Ensure {
        def: JackpotDef,
    },
    Contribute {
        message: OutboxMessage,
        def: JackpotDef,
    },
    View,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JackpotAnswer {
    State(Option<JackpotState>),
    /// A contribution's outcome and the pool after it, with its position
    /// in the jackpot's history (for live watchers).
    Contributed {
        outcome: ContributionOutcome,
        cycle: u64,
        contributed_minor: i64,
        pool_minor: i64,
    },
}

/// A jackpot's journaled change.
///
/// Its first two variants are encoded as `Option<JackpotState>` is (in
/// format version 2 bincode writes an option's tag and an enum's variant
/// index as the same byte), and a whole state is journaled as the actor
/// encodes its state, an `Option<JackpotState>`: so every entry of a
/// jackpot reads as one of these, those of nodes that journaled the whole
/// state with each contribution included (format version 1's are read as
/// the option they are, [`JackpotEntity::replay`]).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum JackpotChange {
    /// No jackpot (never journaled, kept for the encoding's sake).
    Absent,
    /// The whole state: the first contribution (which starts cycle 1), a
    /// hit (which starts the next cycle), `Ensure`.
    Whole(JackpotState),
    /// A contribution that neither started nor ended a cycle: the amounts
    /// it changed, as they are after it, in cycle `cycle`.
    Contributed { cycle: u64, pool_minor: i64, reserve_minor: i64, contributed_minor: i64 },
}

/// The audit record of a hit.
#[derive(Serialize)]
struct HitAudit<'a> {
    kind: &'static str,
    jackpot: &'a str,
    message: &'a str,
    pool_before_minor: i64,
    contributed_minor: i64,
    hit: &'a bazaar_games::jackpot::Hit,
}

impl Entity for JackpotEntity {
    const KIND: EntityKind = EntityKind::Jackpot;
    type State = Option<JackpotState>;
    type Command = JackpotCommand;
    type Answer = JackpotAnswer;

    fn dedupe(command: &JackpotCommand) -> Option<Dedupe<'_>> {
        match command {
            JackpotCommand::Contribute { message, .. } => Some(message.dedupe()),
            JackpotCommand::Ensure { .. } | JackpotCommand::View => None,
        }
    }

    fn handle(
        state: &mut Option<JackpotState>,
        env: &mut Env<'_>,
        command: JackpotCommand,
    ) -> ServiceResult<Handled<JackpotAnswer>> {
        let labels = [env.key.tenant.as_str(), env.key.id.as_str()];
        match command {
            JackpotCommand::Ensure { def } => {
                if state.is_some() {
                    return Ok(Handled::read(JackpotAnswer::State(state.clone())));
                }
                let started = JackpotState::start(&def, env.rng());
                env.metrics.jackpot_pool.with_label_values(&labels).set(started.pool_minor);
                *state = Some(started);
                let mut handled = Handled::changed(JackpotAnswer::State(state.clone()));
                handled.remember = false;
                Ok(handled)
            }
            JackpotCommand::Contribute { message, def } => {
                let crate::outbox::Payload::Contribution { customer, amount_minor, at, .. } = &message.payload else {
                    return Err(ServiceError::internal("a jackpot received a message that is not a contribution"));
                };
                let started = state.is_none();
                let jackpot = state.get_or_insert_with(|| JackpotState::start(&def, env.rng()));
                let pool_before = jackpot.pool_minor;
                let outcome = jackpot.contribute(&def, customer, *amount_minor, *at, env.rng());
                env.metrics.jackpot_pool.with_label_values(&labels).set(jackpot.pool_minor);
                env.metrics
                    .jackpot_contributed
                    .with_label_values(&labels)
                    .inc_by(outcome.contributed_minor.unsigned_abs());
                let mut audit = Vec::new();
                if let Some(hit) = &outcome.hit {
                    env.metrics.jackpot_hits.with_label_values(&labels).inc();
                    let record = HitAudit {
                        kind: "jackpot_hit",
                        jackpot: &env.key.id,
                        message: &message.id,
                        pool_before_minor: pool_before,
                        contributed_minor: outcome.contributed_minor,
                        hit,
                    };
                    let audit_key = key(&[&env.key.tenant, "jackpot", &env.key.id, &format!("{:012}", hit.cycle)]);
                    audit.push((audit_key, serde_json::to_vec(&record).map_err(ServiceError::internal)?));
                }
                // Within a cycle only three amounts move: they are the change
                // (a start or a hit journals the whole state, the default).
                let op = (!started && outcome.hit.is_none()).then(|| {
                    encode(&JackpotChange::Contributed {
                        cycle: jackpot.cycle,
                        pool_minor: jackpot.pool_minor,
                        reserve_minor: jackpot.reserve_minor,
                        contributed_minor: jackpot.books.contributed_minor,
                    })
                });
                let mut handled = Handled::changed(JackpotAnswer::Contributed {
                    outcome,
                    cycle: jackpot.cycle,
                    contributed_minor: jackpot.books.contributed_minor,
                    pool_minor: jackpot.pool_minor,
                });
                handled.op = op;
                handled.audit = audit;
                Ok(handled)
            }
            JackpotCommand::View => Ok(Handled::read(JackpotAnswer::State(state.clone()))),
        }
    }

    const JOURNALS_STATE: bool = false;

    fn replay(state: &mut Option<JackpotState>, changes: &[&[u8]]) -> StorageResult<()> {
        for change in changes {
            // Format version 1 predates the operations: a whole state.
            if change.first() == Some(&FIXED_WIDTH_VERSION) {
                *state = decode(change)?;
                continue;
            }
            match decode(change)? {
                JackpotChange::Absent => *state = None,
                JackpotChange::Whole(whole) => *state = Some(whole),
                JackpotChange::Contributed { cycle, pool_minor, reserve_minor, contributed_minor } => {
                    let jackpot = state.as_mut().filter(|jackpot| jackpot.cycle == cycle).ok_or_else(|| {
                        StorageError::Codec(format!(
                            "a jackpot's contribution in cycle {cycle} follows no state of that cycle"
                        ))
                    })?;
                    jackpot.pool_minor = pool_minor;
                    jackpot.reserve_minor = reserve_minor;
                    jackpot.books.contributed_minor = contributed_minor;
                }
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------- leaderboard

pub struct LeaderboardEntity;

#[derive(Clone)]
pub enum LeaderboardCommand {
    Score { message: OutboxMessage },
    Top { count: usize },
    Around { customer: Id, count: usize },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderboardAnswer {
    Scored(i64),
    Top { entries: Vec<Entry>, members: u64 },
    Around { me: Option<Entry>, around: Vec<Entry> },
}

impl Entity for LeaderboardEntity {
    const KIND: EntityKind = EntityKind::Leaderboard;
    type State = Leaderboard;
    type Command = LeaderboardCommand;
    type Answer = LeaderboardAnswer;

    fn dedupe(command: &LeaderboardCommand) -> Option<Dedupe<'_>> {
        match command {
            LeaderboardCommand::Score { message } => Some(message.dedupe()),
            _ => None,
        }
    }

    fn handle(
        board: &mut Leaderboard,
        _env: &mut Env<'_>,
        command: LeaderboardCommand,
    ) -> ServiceResult<Handled<LeaderboardAnswer>> {
        match command {
            LeaderboardCommand::Score { message } => {
                let crate::outbox::Payload::Score { customer, delta, .. } = &message.payload else {
                    return Err(ServiceError::internal("a leaderboard received a message that is not a score"));
                };
                let score = board.add(customer, *delta);
                let mut handled = Handled::changed(LeaderboardAnswer::Scored(score));
                handled.op = Some(encode(&(customer, *delta)));
                Ok(handled)
            }
            LeaderboardCommand::Top { count } => {
                Ok(Handled::read(LeaderboardAnswer::Top { entries: board.top(count), members: board.len() as u64 }))
            }
            LeaderboardCommand::Around { customer, count } => Ok(Handled::read(LeaderboardAnswer::Around {
                me: board.rank(&customer),
                around: board.around(&customer, count),
            })),
        }
    }

    const JOURNALS_STATE: bool = false;

    fn snapshot_every(_configured: u32) -> u32 {
        u32::MAX
    }

    fn replay(board: &mut Leaderboard, changes: &[&[u8]]) -> StorageResult<()> {
        let changes: Vec<(Id, i64)> = changes.iter().map(|change| decode(change)).collect::<StorageResult<_>>()?;
        board.add_all(changes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazaar_cluster::EntityKey;
    use bazaar_observability::Metrics;

    fn id(text: &str) -> Id {
        Id::parse(text).expect("an id")
    }

    #[test]
    fn an_events_record_keeps_its_contributions_and_a_retry_gets_the_first_answer_again() {
        use bazaar_games::campaign::{Campaign, EarningRules, TierDef};
        use bazaar_games::event::EventKind;
        use bazaar_games::leaderboard::{LeaderboardDef, Metric};
        let mut catalog = Catalog::default();
        catalog.campaigns.insert(
            id("mall"),
            Campaign {
                name: "Mall".into(),
                starts_at: 0,
                ends_at: UnixMillis::MAX,
                stores: None,
                earning: EarningRules {
                    points_per_unit_minor: 100,
                    tier_multipliers_pct: BTreeMap::new(),
                    store_multipliers_pct: BTreeMap::new(),
                    event_bonus: BTreeMap::new(),
                },
                tiers: vec![TierDef { name: "silver".into(), min_points: 100 }],
            },
        );
        for jackpot in ["j-mall", "j-food-court"] {
            let def = JackpotDef {
                campaign: id("mall"),
                seed_minor: 1_000,
                cap_minor: 500_000,
                contribution_bps: 100,
                reserve_bps: 0,
                min_purchase_minor: 0,
            };
            catalog.jackpots.insert(id(jackpot), def);
        }
        for (board, metric) in [("top-spenders", Metric::Spend), ("top-points", Metric::Points)] {
            catalog.leaderboards.insert(id(board), LeaderboardDef { campaign: id("mall"), metric, top_size: 10 });
        }
        let key = EntityKey::new("mall-42", EntityKind::Customer, "c-7");
        let metrics = Metrics::new().expect("metrics");
        let mut rng = None;
        let mut env = Env::new(&key, &mut rng, 1_700_000_000_123, &metrics);
        let event = Event {
            event_id: id("till-3-000042"),
            customer: id("c-7"),
            store: None,
            kind: EventKind::Purchase,
            amount_minor: 12_345,
            at: 1_700_000_000_000,
        };
        let command = CustomerCommand::Event { event, fingerprint: 9, catalog: Arc::new(catalog) };
        let dedupe = CustomerEntity::dedupe(&command).expect("an event has an idempotency key").id.to_owned();
        // Points held from before: the answer's balance is not its earnings.
        let mut customer = Customer { points_balance: 1_000, ..Customer::default() };
        let handled = CustomerEntity::handle(&mut customer, &mut env, command).expect("applied");
        let CustomerAnswer::Event(first) = &handled.answer else { panic!("an event's answer") };
        let is_contribution = |message: &&OutboxMessage| matches!(message.payload, Payload::Contribution { .. });
        let contributions: Vec<OutboxMessage> = first.deliveries.iter().filter(is_contribution).cloned().collect();
        assert_eq!((contributions.len(), first.deliveries.len()), (2, 4), "two contributions and two scores");
        assert_eq!(first.summary.tier.as_deref(), Some("silver"), "the answer has something besides its messages");
        assert_ne!(first.summary.points_earned, first.summary.points_balance);

        let mut record = Vec::new();
        CustomerEntity::encode_record(&mut record, &handled.answer);
        let whole = encode(&handled.answer);
        assert!(record.len() * 3 < whole.len(), "{} bytes kept of {}", record.len(), whole.len());
        // Byte for byte what the derived form of the same record is (the
        // hand-written one writes from the answer without copying it).
        let derived = RecordedEvent {
            summary: first.summary.clone(),
            contributions: contributions
                .iter()
                .map(|message| {
                    let Payload::Contribution { jackpot, amount_minor, at, .. } = &message.payload else {
                        unreachable!("contributions only")
                    };
                    RecordedContribution {
                        jackpot: jackpot.clone(),
                        amount_minor: *amount_minor,
                        at: *at,
                        created_at: message.created_at,
                    }
                })
                .collect(),
        };
        assert_eq!(record, encode(&CustomerAnswer::Recorded(derived.clone())));
        let read: CustomerAnswer = decode(&record).expect("the record reads back");
        assert!(matches!(&read, CustomerAnswer::Recorded(recorded) if *recorded == derived), "{read:?}");
        let dedupe = Dedupe { scope: EVENT_SCOPE, id: &dedupe, fingerprint: 9 };
        let CustomerAnswer::Event(again) = CustomerEntity::recalled(read, &key, &dedupe).expect("recalled") else {
            panic!("recalled as an event's answer")
        };
        assert_eq!(again.deliveries, contributions, "the contributions as the handler made them, the scores left out");
        assert_eq!(again.summary, first.summary, "the rest of the answer");

        // A record written before: the whole answer, read as it was, in the
        // layout of the builds before `EventSummary` (its fields in place).
        #[derive(Serialize)]
        enum Before<'a> {
            Event {
                points_earned: i64,
                points_balance: i64,
                tier: &'a Option<String>,
                spins_granted: &'a BTreeMap<Id, u32>,
                missions: &'a [MissionStatus],
                coupons: &'a [String],
                deliveries: &'a [OutboxMessage],
            },
        }
        let summary = &first.summary;
        let flat = encode(&Before::Event {
            points_earned: summary.points_earned,
            points_balance: summary.points_balance,
            tier: &summary.tier,
            spins_granted: &summary.spins_granted,
            missions: &summary.missions,
            coupons: &summary.coupons,
            deliveries: &first.deliveries,
        });
        assert_eq!(flat, whole, "an answer is encoded as before");
        let before: CustomerAnswer = decode(&whole).expect("the whole answer reads back");
        let CustomerAnswer::Event(before) = CustomerEntity::recalled(before, &key, &dedupe).expect("recalled") else {
            panic!("an event's answer")
        };
        assert_eq!(before.deliveries, first.deliveries);

        // A message the record could not make again: the whole answer kept.
        let mut unusual = first.clone();
        unusual.deliveries.push(OutboxMessage::wheel_draw("mall-42", &id("w"), &id("c-7"), &id("r-1"), 5));
        let mut record = Vec::new();
        CustomerEntity::encode_record(&mut record, &CustomerAnswer::Event(unusual.clone()));
        let read = CustomerEntity::recalled(decode(&record).expect("reads back"), &key, &dedupe).expect("recalled");
        let CustomerAnswer::Event(read) = read else { panic!("an event's answer") };
        assert_eq!(read.deliveries, unusual.deliveries);
    }

    /// A jackpot fed `amounts` one by one as the actor would: the state
    /// after each, and each change the actor would journal.
    fn contributions(amounts: &[i64]) -> (Vec<Option<JackpotState>>, Vec<Vec<u8>>) {
        let def = JackpotDef {
            campaign: id("mall"),
            seed_minor: 1_000,
            cap_minor: 5_000,
            contribution_bps: 1_000,
            reserve_bps: 2_000,
            min_purchase_minor: 0,
        };
        let key = EntityKey::new("t", EntityKind::Jackpot, "big");
        let metrics = Metrics::new().expect("metrics");
        // Seeded: the same secrets, so the same hits, in every run.
        let mut rng = Some(Box::new(<rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(7)));
        let mut state = None;
        let mut states = Vec::new();
        let mut changes = Vec::new();
        for (n, amount) in amounts.iter().enumerate() {
            let message =
                OutboxMessage::contribution("t", &id(&format!("e-{n}")), &id("big"), &id("c-1"), *amount, 1_000, 1_000);
            let mut env = Env::new(&key, &mut rng, 1_000, &metrics);
            let handled =
                JackpotEntity::handle(&mut state, &mut env, JackpotCommand::Contribute { message, def: def.clone() })
                    .expect("contributes");
            changes.push(handled.op.unwrap_or_else(|| encode(&state)));
            states.push(state.clone());
        }
        (states, changes)
    }

    #[test]
    fn a_jackpot_journals_its_whole_state_only_when_a_cycle_starts_and_replays_to_the_same_state() {
        // 10 % of each purchase, a trigger between 1,000 and 5,000: over a
        // few hundred purchases, several hits.
        let amounts: Vec<i64> = (0..400).map(|n| 1_000 + (n * 7_919) % 20_000).collect();
        let (states, changes) = contributions(&amounts);
        let state = states.last().cloned().flatten().expect("a jackpot");
        assert!(3 <= state.cycle, "cycle {}", state.cycle);
        let whole = encode(&Some(state.clone())).len();
        let small = changes.iter().filter(|change| change.len() < 32).count();
        // The first contribution starts cycle 1, each hit the next one.
        assert_eq!(changes.len() - small, state.cycle as usize, "whole states");
        assert!(100 < whole, "a whole state is {whole} bytes");

        let mut replayed = None;
        let borrowed: Vec<&[u8]> = changes.iter().map(Vec::as_slice).collect();
        JackpotEntity::replay(&mut replayed, &borrowed).expect("replays");
        assert_eq!(replayed, Some(state.clone()));
        assert!(state.books_balance());

        // From any point: a snapshot, then the changes after it.
        for from in [1, 57, 200, 399] {
            let mut replayed = states[from - 1].clone();
            JackpotEntity::replay(&mut replayed, &borrowed[from..]).expect("replays");
            assert_eq!(replayed, Some(state.clone()), "from {from}");
        }
    }

    #[test]
    fn a_jackpots_whole_state_of_either_format_reads_as_a_change() {
        let state = contributions(&[5_000, 7_000]).0.pop().flatten();
        // Format 2: an option's tag is the change's variant.
        assert_eq!(encode(&state), encode(&JackpotChange::Whole(state.clone().expect("a jackpot"))));
        assert_eq!(encode(&None::<JackpotState>), encode(&JackpotChange::Absent));
        // Format 1 (nodes before format 2): read as the whole state.
        let mut fixed_width = vec![FIXED_WIDTH_VERSION];
        fixed_width.extend(bincode::serialize(&state).expect("serialises"));
        let mut replayed = None;
        JackpotEntity::replay(&mut replayed, &[&fixed_width]).expect("replays");
        assert_eq!(replayed, state);
    }

    #[test]
    fn a_contribution_without_the_state_of_its_cycle_is_refused_at_replay() {
        // Contributions of 1 to a pool of 1,000 that hits above 1,000.
        let (_, changes) = contributions(&[10, 10]);
        let error = JackpotEntity::replay(&mut None, &[&changes[1]]).expect_err("no state before it");
        assert!(error.to_string().contains("cycle 1"), "{error}");
        let mut later = contributions(&[5_000; 200]).0.pop().flatten();
        assert!(1 < later.as_ref().expect("a jackpot").cycle);
        JackpotEntity::replay(&mut later, &[&changes[1]]).expect_err("another cycle");
    }
}
