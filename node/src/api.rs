//! The public API's request and answer shapes, shared by every transport.
//!
//! Requests are parsed by the transport (JSON here; protobuf with the gRPC
//! layer) into these types and then validated into domain values by the
//! functions below, which name the offending field and the rule in every
//! error. Answers are plain serialisable structs: the JSON of API.md.

use crate::error::{ServiceError, ServiceResult};
use bazaar_games::campaign::{Campaign, EarningRules, TierDef};
use bazaar_games::customer::{Coupon, Customer, ItemWon, MissionStatus};
use bazaar_games::event::{Event, EventKind};
use bazaar_games::ids::Id;
use bazaar_games::jackpot::{Books, Hit, JackpotState};
use bazaar_games::leaderboard::Entry;
use bazaar_games::mission::{MissionDef, Reward, Step};
use bazaar_games::wheel::WonPrize;
use bazaar_games::{UnixMillis, MAX_AMOUNT_MINOR};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Parses an id field, naming it in the error.
pub fn parse_id(field: &str, text: &str) -> ServiceResult<Id> {
    Id::parse(text).map_err(|error| ServiceError::invalid(field, error.to_string()))
}

/// [`parse_id`] of a string the id may keep.
pub fn take_id(field: &str, text: String) -> ServiceResult<Id> {
    Id::try_from(text).map_err(|error| ServiceError::invalid(field, error.to_string()))
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_time(field: &str, text: &str) -> ServiceResult<UnixMillis> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| ServiceError::invalid(field, "must be an RFC 3339 time such as 2026-11-22T10:00:00Z"))
}

/// Formats Unix milliseconds as RFC 3339 in UTC.
pub fn format_time(millis: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| millis.to_string())
}

// ------------------------------------------------------------ tenants, keys

#[derive(utoipa::ToSchema, Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub id: String,
    pub name: String,
    pub currency: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize)]
pub struct TenantAnswer {
    pub id: String,
    pub name: String,
    pub currency: String,
    pub created_at: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub role: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize)]
pub struct KeyAnswer {
    pub key: String,
    pub key_id: String,
    pub role: String,
    pub tenant: Option<String>,
}

// ------------------------------------------------------------- definitions

/// `PUT .../campaigns/{c}`: the campaign with times as RFC 3339.
#[derive(utoipa::ToSchema, Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignBody {
    pub name: String,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(default)]
    pub stores: Option<Vec<Id>>,
    pub earning: EarningRules,
    #[serde(default)]
    pub tiers: Vec<TierDef>,
}

impl CampaignBody {
    pub fn to_domain(&self) -> ServiceResult<Campaign> {
        let campaign = Campaign {
            name: self.name.clone(),
            starts_at: parse_time("starts_at", &self.starts_at)?,
            ends_at: parse_time("ends_at", &self.ends_at)?,
            stores: self.stores.as_ref().map(|s| s.iter().cloned().collect()),
            earning: self.earning.clone(),
            tiers: self.tiers.clone(),
        };
        campaign.validate()?;
        Ok(campaign)
    }
}

/// `PUT .../missions/{m}`.
#[derive(utoipa::ToSchema, Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MissionBody {
    pub campaign: Id,
    pub name: String,
    #[serde(default)]
    pub repeatable: bool,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub reward: Option<Reward>,
    #[serde(default)]
    pub starts_at: Option<String>,
    #[serde(default)]
    pub ends_at: Option<String>,
}

impl MissionBody {
    pub fn to_domain(&self) -> ServiceResult<MissionDef> {
        let mission = MissionDef {
            campaign: self.campaign.clone(),
            name: self.name.clone(),
            repeatable: self.repeatable,
            steps: self.steps.clone(),
            reward: self.reward.clone(),
            starts_at: self.starts_at.as_deref().map(|t| parse_time("starts_at", t)).transpose()?,
            ends_at: self.ends_at.as_deref().map(|t| parse_time("ends_at", t)).transpose()?,
        };
        mission.validate()?;
        Ok(mission)
    }
}

/// A definition as answered: its id, its version, and the definition as
/// stored. The definition is nested, not merged with id and version, so the
/// answer's schema stays exact (definitions refuse unknown fields).
#[derive(utoipa::ToSchema, Clone, Debug, Serialize)]
pub struct DefinitionAnswer<T: Serialize> {
    pub id: String,
    pub version: u64,
    pub definition: T,
}

// ------------------------------------------------------------------ events

/// One event as a till sends it.
#[derive(utoipa::ToSchema, Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    pub event_id: String,
    pub customer: String,
    #[serde(default)]
    pub store: Option<String>,
    pub kind: String,
    #[serde(default)]
    pub amount_minor: Option<i64>,
    /// RFC 3339; the server's time when absent.
    #[serde(default)]
    pub at: Option<String>,
}

/// How far ahead of the server's clock an event may be dated.
pub const MAX_FUTURE_MILLIS: i64 = 5 * 60 * 1000;

impl EventRequest {
    /// Validates every field into an [`Event`]; `max_age_millis` is how old
    /// an event may be (tills that were offline send late).
    ///
    /// The request's strings become the event's ids without a copy.
    pub fn validate(self, now: UnixMillis, max_age_millis: i64) -> ServiceResult<ValidEvent> {
        let dated = self.at.is_some();
        let event_id = take_id("event_id", self.event_id)?;
        let customer = take_id("customer", self.customer)?;
        let store = self.store.map(|s| take_id("store", s)).transpose()?;
        let kind = EventKind::parse(&self.kind).map_err(|e| ServiceError::invalid("kind", e.to_string()))?;
        let amount_minor = match (self.amount_minor, &kind) {
            (None, EventKind::Purchase) => {
                return Err(ServiceError::invalid("amount_minor", "is required for purchases"))
            }
            (None, _) => 0,
            (Some(amount), _) if !(0..=MAX_AMOUNT_MINOR).contains(&amount) => {
                return Err(ServiceError::invalid("amount_minor", "must be between 0 and 10^12"))
            }
            (Some(amount), _) => amount,
        };
        if store.is_none() && matches!(kind, EventKind::Purchase | EventKind::Visit) {
            return Err(ServiceError::invalid("store", "is required for purchase and visit events"));
        }
        let at = match &self.at {
            None => now,
            Some(text) => parse_time("at", text)?,
        };
        if now + MAX_FUTURE_MILLIS < at {
            return Err(ServiceError::invalid("at", "must not be more than 5 minutes ahead of the server's clock"));
        }
        if at < now - max_age_millis {
            return Err(ServiceError::invalid(
                "at",
                format!(
                    "must not be older than the accepted window of {} hours (the node's --max-event-age)",
                    max_age_millis / 3_600_000
                ),
            ));
        }
        let event = Event { event_id, customer, store, kind, amount_minor, at };
        Ok(ValidEvent { fingerprint: fingerprint(&event, dated), event })
    }
}

/// A valid event, and the fingerprint of the request it came from.
#[derive(Clone, Debug)]
pub struct ValidEvent {
    pub event: Event,
    pub fingerprint: u64,
}

/// What makes two requests with the same event id the same request: the
/// body as sent (a missing `at` stays missing, so a retry of an undated
/// event is still the same event).
fn fingerprint(event: &Event, dated: bool) -> u64 {
    let at_as_sent = dated.then_some(event.at);
    crate::storage::hash_encoded(&(&event.customer, &event.store, &event.kind, event.amount_minor, at_as_sent))
}

#[derive(utoipa::ToSchema, Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1,000 events; each is checked on its own.
    #[schema(value_type = Vec<EventRequest>)]
    pub events: Vec<serde_json::Value>,
}

/// The most events one batch may carry.
pub const MAX_BATCH: usize = 1_000;

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JackpotResult {
    pub jackpot: Id,
    pub contributed_minor: i64,
    pub won_minor: i64,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventAnswer {
    pub event_id: Id,
    pub duplicate: bool,
    pub points_earned: i64,
    pub points_balance: i64,
    pub tier: Option<String>,
    pub spins_granted: BTreeMap<Id, u32>,
    pub missions: Vec<MissionStatus>,
    pub coupons: Vec<String>,
    pub jackpots: Vec<JackpotResult>,
}

// ------------------------------------------------------------------- spins

#[derive(utoipa::ToSchema, Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpinRequest {
    pub customer: String,
    pub request_id: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpinAnswer {
    pub request_id: Id,
    pub duplicate: bool,
    pub wheel: Id,
    pub segment: String,
    pub prize: WonPrize,
    pub draw_id: String,
    pub points_balance: i64,
}

// --------------------------------------------------------------- read views

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HitAnswer {
    pub cycle: u64,
    pub customer: Id,
    pub amount_minor: i64,
    pub at: String,
    pub trigger_minor: i64,
    pub salt: String,
    pub commitment: String,
}

impl From<&Hit> for HitAnswer {
    fn from(hit: &Hit) -> Self {
        Self {
            cycle: hit.cycle,
            customer: hit.customer.clone(),
            amount_minor: hit.amount_minor,
            at: format_time(hit.at),
            trigger_minor: hit.trigger_minor,
            salt: hit.salt.clone(),
            commitment: hit.commitment.clone(),
        }
    }
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BooksAnswer {
    pub seeded_minor: i64,
    pub contributed_minor: i64,
    pub paid_minor: i64,
}

impl From<Books> for BooksAnswer {
    fn from(books: Books) -> Self {
        Self {
            seeded_minor: books.seeded_minor,
            contributed_minor: books.contributed_minor,
            paid_minor: books.paid_minor,
        }
    }
}

/// A jackpot as the public sees it: never the running cycle's trigger or
/// salt, only their commitment.
#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JackpotAnswer {
    pub jackpot: Id,
    pub pool_minor: i64,
    pub reserve_minor: i64,
    pub seed_minor: i64,
    pub cap_minor: i64,
    pub cycle: u64,
    pub commitment: String,
    pub books: BooksAnswer,
    pub last_hit: Option<HitAnswer>,
}

impl JackpotAnswer {
    pub fn new(jackpot: Id, state: &JackpotState) -> Self {
        Self {
            jackpot,
            pool_minor: state.pool_minor,
            reserve_minor: state.reserve_minor,
            seed_minor: state.cycle_seed_minor,
            cap_minor: state.cycle_cap_minor,
            cycle: state.cycle,
            commitment: state.commitment.clone(),
            books: state.books.into(),
            last_hit: state.last_hit.as_ref().map(HitAnswer::from),
        }
    }
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderboardAnswer {
    pub leaderboard: Id,
    /// What the scores count (spend scores are minor units).
    pub metric: bazaar_games::leaderboard::Metric,
    pub members: u64,
    pub entries: Vec<Entry>,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AroundAnswer {
    pub leaderboard: Id,
    pub customer: Id,
    /// `None` while the customer has no score on this board.
    pub rank: Option<u64>,
    pub score: i64,
    pub around: Vec<Entry>,
}

/// Audit records, oldest first: wheel draws (with the available weights
/// and the roll) or jackpot hits (with the revealed trigger and salt).
#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditAnswer {
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsAnswer {
    pub first_purchase_at: Option<String>,
    pub last_purchase_at: Option<String>,
    pub purchases: u64,
    pub spend_minor: i64,
    pub visits: u64,
    pub events: u64,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CouponAnswer {
    pub code: String,
    pub source: Id,
    pub at: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemAnswer {
    pub item: String,
    pub wheel: Id,
    pub draw_id: String,
    pub at: String,
}

#[derive(utoipa::ToSchema, Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CustomerAnswer {
    pub customer: Id,
    pub points_balance: i64,
    pub points_earned: i64,
    pub points_spent: i64,
    pub tier: Option<String>,
    pub wallet_minor: i64,
    pub spins: BTreeMap<Id, u32>,
    pub coupons: Vec<CouponAnswer>,
    pub items: Vec<ItemAnswer>,
    pub missions: Vec<MissionStatus>,
    pub stats: StatsAnswer,
}

impl CustomerAnswer {
    pub fn new(id: Id, customer: &Customer, missions: &BTreeMap<Id, MissionDef>) -> Self {
        let coupon =
            |c: &Coupon| CouponAnswer { code: c.code.clone(), source: c.source.clone(), at: format_time(c.at) };
        let item = |i: &ItemWon| ItemAnswer {
            item: i.item.clone(),
            wheel: i.wheel.clone(),
            draw_id: i.draw_id.clone(),
            at: format_time(i.at),
        };
        Self {
            customer: id,
            points_balance: customer.points_balance,
            points_earned: customer.points_earned,
            points_spent: customer.points_spent,
            tier: customer.tier.clone(),
            wallet_minor: customer.wallet_minor,
            spins: customer.spins.iter().filter(|(_, n)| 0 < **n).map(|(w, n)| (w.clone(), *n)).collect(),
            coupons: customer.coupons.iter().map(coupon).collect(),
            items: customer.items.iter().map(item).collect(),
            missions: customer
                .missions
                .iter()
                .map(|(mission, progress)| MissionStatus {
                    mission: mission.clone(),
                    step: progress.step,
                    completed: 0 < progress.completions && missions.get(mission).is_none_or(|def| !def.repeatable),
                })
                .collect(),
            stats: StatsAnswer {
                first_purchase_at: customer.stats.first_purchase_at.map(format_time),
                last_purchase_at: customer.stats.last_purchase_at.map(format_time),
                purchases: customer.stats.purchases,
                spend_minor: customer.stats.spend_minor,
                visits: customer.stats.visits,
                events: customer.stats.events,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;
    const WEEK: i64 = 7 * 24 * 3_600_000;

    fn request() -> EventRequest {
        EventRequest {
            event_id: "till-7-000123".into(),
            customer: "c-42".into(),
            store: Some("s-3".into()),
            kind: "purchase".into(),
            amount_minor: Some(125_000),
            at: None,
        }
    }

    fn check(edit: fn(&mut EventRequest), field: &str) {
        let mut r = request();
        edit(&mut r);
        let error = r.validate(NOW, WEEK).expect_err("invalid");
        assert_eq!(error.field.as_deref(), Some(field), "{error}");
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(request().validate(NOW, WEEK).is_ok());
        check(|r| r.event_id.clear(), "event_id");
        check(|r| r.event_id = "x".repeat(129), "event_id");
        check(|r| r.customer = "c 42".into(), "customer");
        check(|r| r.store = Some("s/3".into()), "store");
        check(|r| r.store = None, "store");
        check(|r| r.kind = "refund".into(), "kind");
        check(|r| r.amount_minor = Some(-1), "amount_minor");
        check(|r| r.amount_minor = Some(MAX_AMOUNT_MINOR + 1), "amount_minor");
        check(|r| r.amount_minor = None, "amount_minor");
        check(|r| r.at = Some("yesterday".into()), "at");
        check(|r| r.at = Some(format_time(NOW + MAX_FUTURE_MILLIS + 1_000)), "at");
        check(|r| r.at = Some(format_time(NOW - WEEK - 1_000)), "at");
    }

    #[test]
    fn fingerprint_keeps_a_missing_time_missing() {
        let first = request().validate(NOW, WEEK).expect("valid");
        let retry = request().validate(NOW + 60_000, WEEK).expect("valid");
        assert_ne!(first.event.at, retry.event.at, "undated events take the server's time");
        assert_eq!(first.fingerprint, retry.fingerprint);
        let mut other = request();
        other.amount_minor = Some(1);
        assert_ne!(first.fingerprint, other.validate(NOW, WEEK).expect("valid").fingerprint);
        let mut dated = request();
        dated.at = Some(format_time(first.event.at));
        assert_ne!(first.fingerprint, dated.validate(NOW, WEEK).expect("valid").fingerprint, "a time sent counts");
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_time("at", "2026-11-22T10:00:00Z").map(format_time), Ok("2026-11-22T10:00:00.000Z".into()));
        assert_eq!(parse_time("at", "2026-11-22T11:00:00+01:00"), parse_time("at", "2026-11-22T10:00:00Z"));
    }
}
