//! A customer's state and what events and spins do to it.
//!
//! The customer owns its points ledger (never negative), tier, wallet,
//! purchase statistics for RFM, spin entitlements, mission progress and the
//! coupons and items it won. [`Customer::apply_event`] is the whole earning
//! logic for one event; it also says what the event causes elsewhere (jackpot
//! contributions, leaderboard score changes), which the node delivers.
//!
//! A spin touches two entities, the customer (cost, daily limit, prize) and
//! the wheel (stock), so it is two steps here: [`Customer::reserve_spin`]
//! takes the cost and counts the spin against the daily limit, and
//! [`Customer::settle_spin`] credits the prize, or refunds the cost when the
//! wheel had nothing left. Both are keyed by the spin's request id, so
//! redelivery is harmless.

use crate::catalog::Catalog;
use crate::event::Event;
use crate::ids::Id;
use crate::leaderboard::Metric;
use crate::mission::{self, Reward};
use crate::wheel::{SpinCost, WheelDef, WonPrize};
use crate::{UnixMillis, DAY_MILLIS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Purchase statistics, the raw material of RFM segments and CLV.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseStats {
    pub first_purchase_at: Option<UnixMillis>,
    pub last_purchase_at: Option<UnixMillis>,
    pub purchases: u64,
    pub spend_minor: i64,
    pub visits: u64,
    pub events: u64,
    pub last_event_at: Option<UnixMillis>,
}

/// A coupon the customer won.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coupon {
    pub code: String,
    /// The wheel or mission it came from.
    pub source: Id,
    pub at: UnixMillis,
}

/// A physical prize the customer won.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemWon {
    pub item: String,
    pub wheel: Id,
    pub draw_id: String,
    pub at: UnixMillis,
}

/// A spin whose cost is taken and whose draw is not yet settled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSpin {
    pub wheel: Id,
    pub cost: SpinCost,
    pub day: i64,
}

/// Spins made on one wheel on one UTC day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyCount {
    pub day: i64,
    pub count: u32,
}

/// When the customer last did each kind of engaged thing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engagement {
    pub last_played_at: Option<UnixMillis>,
    pub last_mission_progress_at: Option<UnixMillis>,
    pub last_reward_at: Option<UnixMillis>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub points_balance: i64,
    /// Lifetime points credited; tiers follow it.
    pub points_earned: i64,
    pub points_spent: i64,
    pub tier: Option<String>,
    pub wallet_minor: i64,
    pub stats: PurchaseStats,
    /// Spin entitlements per wheel.
    pub spins: BTreeMap<Id, u32>,
    pub spins_today: BTreeMap<Id, DailyCount>,
    pub missions: BTreeMap<Id, mission::MissionProgress>,
    pub coupons: Vec<Coupon>,
    pub items: Vec<ItemWon>,
    pub pending_spins: BTreeMap<Id, PendingSpin>,
    /// Points earned per campaign, for "points" leaderboards.
    pub campaign_points: BTreeMap<Id, i64>,
    pub engagement: Engagement,
}

/// A mission's state after an event, as the event's answer reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MissionStatus {
    pub mission: Id,
    pub step: usize,
    pub completed: bool,
}

/// What one event did to the customer, and what it causes elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOutcome {
    pub points_earned: i64,
    pub spins_granted: BTreeMap<Id, u32>,
    pub missions: Vec<MissionStatus>,
    pub coupons_won: Vec<String>,
    /// Missions in which this event completed a step (once per step).
    pub steps_completed: Vec<Id>,
    /// Jackpots this purchase is eligible to feed.
    pub jackpots: Vec<Id>,
    /// Score changes for leaderboards, non-zero only.
    pub leaderboard_deltas: Vec<(Id, i64)>,
}

/// Why a spin cannot be made now: expected outcomes, not errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpinRefusal {
    NoEntitlement { needed: u32, available: u32 },
    NotEnoughPoints { needed: i64, available: i64 },
    DailyLimit { limit: u32 },
}

impl std::fmt::Display for SpinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoEntitlement { needed, available } => {
                write!(f, "a spin of this wheel needs {needed} entitlement(s); the customer has {available}")
            }
            Self::NotEnoughPoints { needed, available } => {
                write!(f, "a spin of this wheel costs {needed} points; the customer has {available}")
            }
            Self::DailyLimit { limit } => {
                write!(f, "the daily limit of {limit} spin(s) on this wheel is reached; try again tomorrow (UTC)")
            }
        }
    }
}

impl Customer {
    /// Applies one event under the tenant's catalog: statistics, points by
    /// every campaign it falls under, spins, missions, tier. Returns what
    /// changed and what the event causes elsewhere.
    pub fn apply_event(&mut self, event: &Event, catalog: &Catalog) -> EventOutcome {
        let mut outcome = EventOutcome::default();
        self.record_stats(event);
        let campaigns = catalog.campaigns_for(event);
        // Per-event tallies key by the catalog's ids, borrowed.
        let mut points_by_campaign: BTreeMap<&Id, i64> = BTreeMap::new();
        let tier_before = self.tier.as_deref();
        for campaign_id in &campaigns {
            let campaign = &catalog.campaigns[*campaign_id];
            let points = campaign.points_for(event, tier_before);
            *points_by_campaign.entry(*campaign_id).or_insert(0) += points;
        }

        for (wheel_id, wheel) in &catalog.wheels {
            let Some(earn) = &wheel.earn else { continue };
            if event.kind.is_purchase()
                && earn.min_purchase_minor <= event.amount_minor
                && campaigns.contains(&&wheel.campaign)
            {
                *outcome.spins_granted.entry(wheel_id.clone()).or_insert(0) += earn.spins;
            }
        }

        let category = catalog.category_of(event.store.as_ref());
        let mut missions_completed: BTreeMap<&Id, i64> = BTreeMap::new();
        for (mission_id, def) in &catalog.missions {
            if !campaigns.contains(&&def.campaign) {
                continue;
            }
            let progress = slot(&mut self.missions, mission_id);
            let Some(advance) = mission::advance(def, progress, event, category) else {
                continue;
            };
            self.engagement.last_mission_progress_at = Some(event.at);
            outcome.missions.push(MissionStatus {
                mission: mission_id.clone(),
                step: advance.steps_done,
                completed: advance.mission_completed,
            });
            if advance.step_completed {
                outcome.steps_completed.push(mission_id.clone());
            }
            if advance.mission_completed {
                *missions_completed.entry(&def.campaign).or_insert(0) += 1;
            }
            let run = progress.completions;
            for (index, reward) in advance.rewards.iter().enumerate() {
                *points_by_campaign.entry(&def.campaign).or_insert(0) += reward.points;
                self.grant_reward(
                    reward,
                    mission_id,
                    &format!("{run}.{}.{index}", advance.steps_done),
                    event,
                    &mut outcome,
                );
            }
        }

        for (campaign, points) in &points_by_campaign {
            outcome.points_earned = outcome.points_earned.saturating_add(*points);
            let total = slot(&mut self.campaign_points, campaign);
            *total = total.saturating_add(*points);
        }
        self.credit_points(outcome.points_earned);
        for (wheel, spins) in &outcome.spins_granted {
            *slot(&mut self.spins, wheel) += spins;
        }
        if let Some(tier) = campaigns.iter().filter_map(|c| catalog.campaigns[*c].tier_for(self.points_earned)).next() {
            if self.tier.as_deref() != Some(tier) {
                self.tier = Some(tier.to_owned());
            }
        }

        if event.kind.is_purchase() {
            outcome.jackpots = catalog
                .jackpots
                .iter()
                .filter(|(_, def)| campaigns.contains(&&def.campaign) && def.min_purchase_minor <= event.amount_minor)
                .filter(|(_, def)| 0 < def.contribution_for(event.amount_minor))
                .map(|(id, _)| id.clone())
                .collect();
        }
        for (board_id, def) in &catalog.leaderboards {
            if !campaigns.contains(&&def.campaign) {
                continue;
            }
            let delta = match def.metric {
                Metric::Points => points_by_campaign.get(&def.campaign).copied().unwrap_or(0),
                Metric::Spend if event.kind.is_purchase() => event.amount_minor,
                Metric::Purchases if event.kind.is_purchase() => 1,
                Metric::Missions => missions_completed.get(&def.campaign).copied().unwrap_or(0),
                Metric::Spend | Metric::Purchases => 0,
            };
            if delta != 0 {
                outcome.leaderboard_deltas.push((board_id.clone(), delta));
            }
        }
        outcome
    }

    fn record_stats(&mut self, event: &Event) {
        let stats = &mut self.stats;
        stats.events += 1;
        stats.last_event_at = Some(stats.last_event_at.map_or(event.at, |t| t.max(event.at)));
        match event.kind {
            crate::event::EventKind::Purchase => {
                stats.purchases += 1;
                stats.spend_minor = stats.spend_minor.saturating_add(event.amount_minor);
                stats.first_purchase_at = Some(stats.first_purchase_at.map_or(event.at, |t| t.min(event.at)));
                stats.last_purchase_at = Some(stats.last_purchase_at.map_or(event.at, |t| t.max(event.at)));
            }
            crate::event::EventKind::Visit => stats.visits += 1,
            _ => {}
        }
    }

    fn credit_points(&mut self, points: i64) {
        self.points_balance = self.points_balance.saturating_add(points);
        self.points_earned = self.points_earned.saturating_add(points);
    }

    fn grant_reward(&mut self, reward: &Reward, source: &Id, serial: &str, event: &Event, outcome: &mut EventOutcome) {
        if let Some(spins) = &reward.spins {
            *outcome.spins_granted.entry(spins.wheel.clone()).or_insert(0) += spins.count;
        }
        if let Some(prefix) = &reward.coupon {
            let code = format!("{prefix}-{}-{source}-{serial}", event.customer);
            outcome.coupons_won.push(code.clone());
            self.coupons.push(Coupon { code, source: source.clone(), at: event.at });
        }
        self.engagement.last_reward_at = Some(event.at);
    }

    /// Takes the cost of a spin and counts it against the daily limit.
    /// `request_id` identifies the spin until it is settled.
    pub fn reserve_spin(
        &mut self,
        wheel_id: &Id,
        wheel: &WheelDef,
        request_id: &Id,
        now: UnixMillis,
    ) -> Result<(), SpinRefusal> {
        let day = now.div_euclid(DAY_MILLIS);
        let today = self.spins_today.get(wheel_id).filter(|d| d.day == day).map_or(0, |d| d.count);
        if let Some(limit) = wheel.daily_limit {
            if limit <= today {
                return Err(SpinRefusal::DailyLimit { limit });
            }
        }
        match wheel.cost {
            SpinCost::Entitlements(needed) => {
                let available = self.spins.get(wheel_id).copied().unwrap_or(0);
                if available < needed {
                    return Err(SpinRefusal::NoEntitlement { needed, available });
                }
                self.spins.insert(wheel_id.clone(), available - needed);
            }
            SpinCost::Points(needed) => {
                if self.points_balance < needed {
                    return Err(SpinRefusal::NotEnoughPoints { needed, available: self.points_balance });
                }
                self.points_balance -= needed;
                self.points_spent += needed;
            }
        }
        self.spins_today.insert(wheel_id.clone(), DailyCount { day, count: today + 1 });
        self.pending_spins
            .insert(request_id.clone(), PendingSpin { wheel: wheel_id.clone(), cost: wheel.cost.clone(), day });
        self.engagement.last_played_at = Some(now);
        Ok(())
    }

    /// Settles a reserved spin: credits `prize`, or refunds the cost when
    /// the wheel had nothing left (`None`). Returns false, changing nothing,
    /// when the spin is not pending (already settled).
    pub fn settle_spin(&mut self, request_id: &Id, prize: Option<(&WonPrize, &str)>, now: UnixMillis) -> bool {
        let Some(pending) = self.pending_spins.remove(request_id) else {
            return false;
        };
        let Some((prize, draw_id)) = prize else {
            match pending.cost {
                SpinCost::Entitlements(n) => *self.spins.entry(pending.wheel.clone()).or_insert(0) += n,
                SpinCost::Points(n) => {
                    self.points_balance += n;
                    self.points_spent -= n;
                }
            }
            if let Some(daily) = self.spins_today.get_mut(&pending.wheel) {
                if daily.day == pending.day {
                    daily.count = daily.count.saturating_sub(1);
                }
            }
            return true;
        };
        match prize {
            WonPrize::Points(n) => self.credit_points(*n),
            WonPrize::Spins(n) => *self.spins.entry(pending.wheel.clone()).or_insert(0) += n,
            WonPrize::Coupon(code) => {
                self.coupons.push(Coupon { code: code.clone(), source: pending.wheel.clone(), at: now })
            }
            WonPrize::CashbackMinor(n) => self.wallet_minor = self.wallet_minor.saturating_add(*n),
            WonPrize::Item(item) => self.items.push(ItemWon {
                item: item.clone(),
                wheel: pending.wheel.clone(),
                draw_id: draw_id.to_owned(),
                at: now,
            }),
            WonPrize::Nothing => {}
        }
        if !matches!(prize, WonPrize::Nothing) {
            self.engagement.last_reward_at = Some(now);
        }
        true
    }
}

/// The value of `key` in `map`, inserted as the default if missing. The key
/// is cloned only then: `entry` takes it owned, which cloned an id at every
/// event for every mission, campaign and wheel it touched.
fn slot<'m, K: Ord + Clone, V: Default>(map: &'m mut BTreeMap<K, V>, key: &K) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.clone(), V::default());
    }
    map.get_mut(key).expect("present or just inserted")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::{Campaign, EarningRules, TierDef};
    use crate::catalog::StoreDef;
    use crate::event::EventKind;
    use crate::jackpot::JackpotDef;
    use crate::leaderboard::LeaderboardDef;
    use crate::mission::{MissionDef, SpinReward, Step};
    use crate::wheel::{Prize, Segment, SpinEarning};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn id(text: &str) -> Id {
        Id::parse(text).expect("valid")
    }

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        for n in 1..=4 {
            catalog.stores.insert(id(&format!("s-{n}")), StoreDef { name: format!("Shop {n}"), category: id("food") });
        }
        catalog.campaigns.insert(
            id("bf"),
            Campaign {
                name: "Black Friday".into(),
                starts_at: 0,
                ends_at: 1_000_000,
                stores: None,
                earning: EarningRules {
                    points_per_unit_minor: 100,
                    tier_multipliers_pct: BTreeMap::from([("gold".into(), 200)]),
                    store_multipliers_pct: BTreeMap::new(),
                    event_bonus: BTreeMap::from([(EventKind::Visit, 3)]),
                },
                tiers: vec![
                    TierDef { name: "silver".into(), min_points: 100 },
                    TierDef { name: "gold".into(), min_points: 1_000 },
                ],
            },
        );
        catalog.wheels.insert(
            id("w"),
            WheelDef {
                campaign: id("bf"),
                cost: SpinCost::Entitlements(1),
                daily_limit: Some(2),
                segments: vec![Segment { label: "ten".into(), weight: 1, prize: Prize::Points(10), stock: None }],
                earn: Some(SpinEarning { min_purchase_minor: 10_000, spins: 1 }),
            },
        );
        catalog.jackpots.insert(
            id("j"),
            JackpotDef {
                campaign: id("bf"),
                seed_minor: 1_000,
                cap_minor: 5_000,
                contribution_bps: 100,
                reserve_bps: 0,
                min_purchase_minor: 5_000,
            },
        );
        catalog.missions.insert(
            id("m"),
            MissionDef {
                campaign: id("bf"),
                name: "Two shops".into(),
                repeatable: false,
                steps: vec![Step {
                    kind: EventKind::Purchase,
                    min_amount_minor: 0,
                    store: None,
                    category: Some(id("food")),
                    count: 2,
                    distinct_stores: true,
                    reward: None,
                }],
                reward: Some(Reward {
                    points: 50,
                    spins: Some(SpinReward { wheel: id("w"), count: 2 }),
                    coupon: Some("GIFT".into()),
                }),
                starts_at: None,
                ends_at: None,
            },
        );
        catalog
            .leaderboards
            .insert(id("lb-spend"), LeaderboardDef { campaign: id("bf"), metric: Metric::Spend, top_size: 10 });
        catalog
            .leaderboards
            .insert(id("lb-points"), LeaderboardDef { campaign: id("bf"), metric: Metric::Points, top_size: 10 });
        catalog
    }

    fn purchase(n: u32, store: &str, amount_minor: i64) -> Event {
        Event {
            event_id: id(&format!("e-{n}")),
            customer: id("c-1"),
            store: Some(id(store)),
            kind: EventKind::Purchase,
            amount_minor,
            at: 1_000 + i64::from(n),
        }
    }

    #[test]
    fn a_purchase_earns_points_spins_contributions_and_scores() {
        let mut customer = Customer::default();
        let outcome = customer.apply_event(&purchase(1, "s-1", 20_000), &catalog());
        assert_eq!(outcome.points_earned, 200);
        assert_eq!(outcome.spins_granted, BTreeMap::from([(id("w"), 1)]));
        assert_eq!(outcome.jackpots, vec![id("j")]);
        assert_eq!(outcome.leaderboard_deltas, vec![(id("lb-points"), 200), (id("lb-spend"), 20_000)]);
        assert_eq!(outcome.missions, vec![MissionStatus { mission: id("m"), step: 0, completed: false }]);
        assert_eq!(customer.points_balance, 200);
        assert_eq!(customer.tier.as_deref(), Some("silver"));
        assert_eq!(customer.stats.purchases, 1);
        assert_eq!(customer.stats.spend_minor, 20_000);
    }

    #[test]
    fn completing_a_mission_pays_its_reward_into_the_same_answer() {
        let mut customer = Customer::default();
        let catalog = catalog();
        customer.apply_event(&purchase(1, "s-1", 1_000), &catalog);
        let outcome = customer.apply_event(&purchase(2, "s-2", 1_000), &catalog);
        assert_eq!(outcome.missions, vec![MissionStatus { mission: id("m"), step: 1, completed: true }]);
        assert_eq!(outcome.points_earned, 10 + 50);
        assert_eq!(outcome.spins_granted, BTreeMap::from([(id("w"), 2)]));
        assert_eq!(outcome.coupons_won.len(), 1);
        assert_eq!(customer.coupons.len(), 1);
        assert_eq!(customer.spins[&id("w")], 2);
    }

    #[test]
    fn tier_multiplier_applies_from_the_next_event() {
        let mut customer = Customer::default();
        let catalog = catalog();
        let first = customer.apply_event(&purchase(1, "s-1", 100_000), &catalog);
        assert_eq!(first.points_earned, 1_000);
        assert_eq!(customer.tier.as_deref(), Some("gold"));
        let second = customer.apply_event(&purchase(2, "s-1", 100_000), &catalog);
        assert_eq!(second.points_earned, 2_000);
    }

    #[test]
    fn spins_check_entitlement_and_daily_limit_and_refund_when_exhausted() {
        let catalog = catalog();
        let wheel = &catalog.wheels[&id("w")];
        let mut customer = Customer::default();
        assert_eq!(
            customer.reserve_spin(&id("w"), wheel, &id("r-1"), 0),
            Err(SpinRefusal::NoEntitlement { needed: 1, available: 0 })
        );
        customer.spins.insert(id("w"), 5);
        customer.reserve_spin(&id("w"), wheel, &id("r-1"), 0).expect("entitled");
        customer.reserve_spin(&id("w"), wheel, &id("r-2"), 0).expect("entitled");
        assert_eq!(customer.reserve_spin(&id("w"), wheel, &id("r-3"), 0), Err(SpinRefusal::DailyLimit { limit: 2 }));
        assert!(customer.settle_spin(&id("r-1"), Some((&WonPrize::Points(10), "w-1")), 0));
        assert!(!customer.settle_spin(&id("r-1"), Some((&WonPrize::Points(10), "w-1")), 0), "settles once");
        assert!(customer.settle_spin(&id("r-2"), None, 0), "refund");
        assert_eq!(customer.spins[&id("w")], 4);
        assert_eq!(customer.points_balance, 10);
        // The refund gave the day's spin back; the next day starts afresh.
        customer.reserve_spin(&id("w"), wheel, &id("r-3"), 0).expect("refunded spin frees the limit");
        customer.reserve_spin(&id("w"), wheel, &id("r-4"), DAY_MILLIS).expect("new day");
    }

    proptest! {
        /// Whatever events and spins come, the balance is never negative and
        /// always equals earned minus spent.
        #[test]
        fn ledger_never_negative(ops in prop::collection::vec((0u8..3, 0i64..50_000, 0u8..4), 1..150)) {
            let mut catalog = catalog();
            catalog.wheels.get_mut(&id("w")).expect("defined").cost = SpinCost::Points(30);
            catalog.wheels.get_mut(&id("w")).expect("defined").daily_limit = None;
            let wheel = catalog.wheels[&id("w")].clone();
            let mut customer = Customer::default();
            let mut pending = BTreeSet::new();
            for (n, (op, amount, store)) in ops.into_iter().enumerate() {
                let n = u32::try_from(n).expect("small");
                match op {
                    0 => { customer.apply_event(&purchase(n, &format!("s-{}", store + 1), amount), &catalog); }
                    1 => {
                        let request = id(&format!("r-{n}"));
                        if customer.reserve_spin(&id("w"), &wheel, &request, 0).is_ok() {
                            pending.insert(request);
                        }
                    }
                    _ => {
                        if let Some(request) = pending.pop_first() {
                            let prize = WonPrize::Points(amount % 40);
                            let settled = if amount % 2 == 0 { Some((&prize, "d")) } else { None };
                            prop_assert!(customer.settle_spin(&request, settled, 0));
                        }
                    }
                }
                prop_assert!(0 <= customer.points_balance);
                prop_assert_eq!(customer.points_balance, customer.points_earned - customer.points_spent);
            }
        }
    }
}
