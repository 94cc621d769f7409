//! Campaigns and their earning rules: how many points an event is worth.
//!
//! The formula is the public contract of API.md, in integers only:
//! `points = floor(amount_minor × tier_pct × store_pct /
//! (points_per_unit_minor × 100 × 100))`, a missing multiplier counting as
//! 100, plus the bonus of the event's kind. It is computed in `i128`, so no
//! valid amount and multiplier can overflow.

use crate::event::{Event, EventKind};
use crate::ids::Id;
use crate::{DefinitionError, UnixMillis, MAX_AMOUNT_MINOR, MAX_POINTS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The largest multiplier accepted, in percent (100× the base rate).
pub const MAX_MULTIPLIER_PCT: u32 = 10_000;

/// A tier: reached when a customer's lifetime points reach `min_points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TierDef {
    pub name: String,
    pub min_points: i64,
}

/// How events earn points within one campaign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EarningRules {
    /// Minor units of spend per point (100 = one point per currency unit
    /// when the currency has cents).
    pub points_per_unit_minor: i64,
    #[serde(default)]
    pub tier_multipliers_pct: BTreeMap<String, u32>,
    #[serde(default)]
    pub store_multipliers_pct: BTreeMap<Id, u32>,
    /// Fixed points per event kind (`visit`, `referral`, `custom:<name>`,
    /// and `purchase` too).
    #[serde(default)]
    pub event_bonus: BTreeMap<EventKind, i64>,
}

/// A campaign: a window of time, the stores it covers, and its rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub name: String,
    pub starts_at: UnixMillis,
    pub ends_at: UnixMillis,
    /// `None`: every store of the tenant (and events without a store).
    pub stores: Option<BTreeSet<Id>>,
    pub earning: EarningRules,
    /// Sorted by `min_points`, ascending (validation enforces it).
    pub tiers: Vec<TierDef>,
}

impl Campaign {
    /// Checks a display name (1-200 characters, no control characters).
    pub fn validate_name(field: &str, name: &str) -> Result<(), DefinitionError> {
        check_name(field, name)
    }

    /// Checks every rule of a campaign definition.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        check_name("name", &self.name)?;
        if self.ends_at <= self.starts_at {
            return Err(DefinitionError::new("ends_at", "must be after starts_at"));
        }
        let earning = &self.earning;
        if !(1..=MAX_AMOUNT_MINOR).contains(&earning.points_per_unit_minor) {
            return Err(DefinitionError::new("earning.points_per_unit_minor", "must be between 1 and 10^12"));
        }
        for (tier, pct) in &earning.tier_multipliers_pct {
            if MAX_MULTIPLIER_PCT < *pct {
                return Err(DefinitionError::new(
                    format!("earning.tier_multipliers_pct.{tier}"),
                    "must be between 0 and 10000",
                ));
            }
            if !self.tiers.iter().any(|t| &t.name == tier) {
                return Err(DefinitionError::new(
                    format!("earning.tier_multipliers_pct.{tier}"),
                    "names a tier that is not in tiers",
                ));
            }
        }
        for (store, pct) in &earning.store_multipliers_pct {
            if MAX_MULTIPLIER_PCT < *pct {
                return Err(DefinitionError::new(
                    format!("earning.store_multipliers_pct.{store}"),
                    "must be between 0 and 10000",
                ));
            }
        }
        for (kind, bonus) in &earning.event_bonus {
            if !(0..=MAX_POINTS).contains(bonus) {
                return Err(DefinitionError::new(format!("earning.event_bonus.{kind}"), "must be between 0 and 10^9"));
            }
        }
        for (index, tier) in self.tiers.iter().enumerate() {
            check_name(&format!("tiers[{index}].name"), &tier.name)?;
            if !(0..=i64::MAX / 2).contains(&tier.min_points) {
                return Err(DefinitionError::new(format!("tiers[{index}].min_points"), "must not be negative"));
            }
            if 0 < index && tier.min_points <= self.tiers[index - 1].min_points {
                return Err(DefinitionError::new(
                    format!("tiers[{index}].min_points"),
                    "must be greater than the previous tier's min_points",
                ));
            }
            if self.tiers[..index].iter().any(|t| t.name == tier.name) {
                return Err(DefinitionError::new(format!("tiers[{index}].name"), "must be unique"));
            }
        }
        Ok(())
    }

    /// Whether an event at `at` in `store` falls under this campaign.
    pub fn applies(&self, store: Option<&Id>, at: UnixMillis) -> bool {
        let in_window = self.starts_at <= at && at < self.ends_at;
        let in_stores = match (&self.stores, store) {
            (None, _) => true,
            (Some(stores), Some(store)) => stores.contains(store),
            (Some(_), None) => false,
        };
        in_window && in_stores
    }

    /// Points the event earns under this campaign for a customer currently
    /// in `tier`: the spend rule for purchases plus the kind's bonus.
    pub fn points_for(&self, event: &Event, tier: Option<&str>) -> i64 {
        let bonus = self.earning.event_bonus.get(&event.kind).copied().unwrap_or(0);
        if !event.kind.is_purchase() {
            return bonus;
        }
        let tier_pct = tier.and_then(|t| self.earning.tier_multipliers_pct.get(t)).copied().unwrap_or(100);
        let store_pct =
            event.store.as_ref().and_then(|s| self.earning.store_multipliers_pct.get(s)).copied().unwrap_or(100);
        let numerator = i128::from(event.amount_minor) * i128::from(tier_pct) * i128::from(store_pct);
        let denominator = i128::from(self.earning.points_per_unit_minor) * 100 * 100;
        let spend_points = i64::try_from(numerator / denominator)
            .expect("amount <= 10^12 and multipliers <= 10^4 keep the quotient far below i64::MAX");
        spend_points + bonus
    }

    /// The highest tier reached with `lifetime_points`, if the campaign has
    /// tiers and the first one is reached.
    pub fn tier_for(&self, lifetime_points: i64) -> Option<&str> {
        self.tiers.iter().rev().find(|t| t.min_points <= lifetime_points).map(|t| t.name.as_str())
    }
}

/// A display name: 1–200 characters, no control characters.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), DefinitionError> {
    let length = name.chars().count();
    if length == 0 || 200 < length {
        return Err(DefinitionError::new(field, "must be 1-200 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(DefinitionError::new(field, "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse(text).expect("test ids are valid")
    }

    fn campaign() -> Campaign {
        Campaign {
            name: "Black Friday".into(),
            starts_at: 0,
            ends_at: 1_000,
            stores: None,
            earning: EarningRules {
                points_per_unit_minor: 100,
                tier_multipliers_pct: BTreeMap::from([("gold".into(), 150)]),
                store_multipliers_pct: BTreeMap::from([(id("s-2"), 200)]),
                event_bonus: BTreeMap::from([(EventKind::Visit, 5)]),
            },
            tiers: vec![
                TierDef { name: "silver".into(), min_points: 100 },
                TierDef { name: "gold".into(), min_points: 1_000 },
            ],
        }
    }

    fn purchase(store: &str, amount_minor: i64) -> Event {
        Event {
            event_id: id("e-1"),
            customer: id("c-1"),
            store: Some(id(store)),
            kind: EventKind::Purchase,
            amount_minor,
            at: 10,
        }
    }

    #[test]
    fn earning_formula_of_the_contract() {
        let c = campaign();
        let check = |store: &str, amount: i64, tier: Option<&str>, expected: i64| {
            assert_eq!(c.points_for(&purchase(store, amount), tier), expected, "{store} {amount} {tier:?}");
        };
        check("s-1", 125_000, None, 1_250);
        check("s-1", 199, None, 1);
        check("s-1", 99, None, 0);
        check("s-2", 125_000, None, 2_500);
        check("s-2", 125_000, Some("gold"), 3_750);
        check("s-1", 125_000, Some("silver"), 1_250);
        check("s-2", MAX_AMOUNT_MINOR, Some("gold"), 30_000_000_000);
        let mut visit = purchase("s-1", 0);
        visit.kind = EventKind::Visit;
        assert_eq!(c.points_for(&visit, None), 5);
    }

    #[test]
    fn tiers_and_window() {
        let c = campaign();
        assert_eq!(c.tier_for(0), None);
        assert_eq!(c.tier_for(100), Some("silver"));
        assert_eq!(c.tier_for(999), Some("silver"));
        assert_eq!(c.tier_for(1_000), Some("gold"));
        assert!(c.applies(Some(&id("s-9")), 0));
        assert!(!c.applies(Some(&id("s-9")), 1_000));
        let mut only = campaign();
        only.stores = Some(BTreeSet::from([id("s-1")]));
        assert!(only.applies(Some(&id("s-1")), 5));
        assert!(!only.applies(Some(&id("s-2")), 5));
        assert!(!only.applies(None, 5));
    }

    #[test]
    fn validation_names_the_field() {
        let check = |edit: fn(&mut Campaign), field: &str| {
            let mut c = campaign();
            edit(&mut c);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field.to_owned()));
        };
        assert_eq!(campaign().validate(), Ok(()));
        check(|c| c.ends_at = c.starts_at, "ends_at");
        check(|c| c.earning.points_per_unit_minor = 0, "earning.points_per_unit_minor");
        check(|c| c.name.clear(), "name");
        check(|c| c.tiers[1].min_points = 100, "tiers[1].min_points");
        check(
            |c| {
                c.earning.tier_multipliers_pct.insert("platinum".into(), 200);
            },
            "earning.tier_multipliers_pct.platinum",
        );
        check(
            |c| {
                c.earning.event_bonus.insert(EventKind::Referral, -1);
            },
            "earning.event_bonus.referral",
        );
    }
}
