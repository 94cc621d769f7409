//! Multi-step missions: ordered steps, each a condition over events.
//!
//! A customer works on one step at a time. An event that meets the current
//! step's condition counts towards it (or adds its store, for a "N distinct
//! stores" step); reaching the step's count completes it, pays its reward and
//! moves to the next step. One event completes at most one step, so steps
//! stay ordered in time. The last step completes the mission; a repeatable
//! mission then starts over.

use crate::event::{Event, EventKind};
use crate::ids::Id;
use crate::{DefinitionError, UnixMillis, MAX_AMOUNT_MINOR, MAX_POINTS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A reward for a step or for the whole mission. All parts are optional and
/// add up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reward {
    #[serde(default)]
    pub points: i64,
    /// Spins of one wheel.
    #[serde(default)]
    pub spins: Option<SpinReward>,
    /// A coupon whose code starts with this prefix.
    #[serde(default)]
    pub coupon: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpinReward {
    pub wheel: Id,
    pub count: u32,
}

impl Reward {
    fn validate(&self, field: &str) -> Result<(), DefinitionError> {
        if !(0..=MAX_POINTS).contains(&self.points) {
            return Err(DefinitionError::new(format!("{field}.points"), "must be between 0 and 10^9"));
        }
        if let Some(spins) = &self.spins {
            if spins.count == 0 || 100 < spins.count {
                return Err(DefinitionError::new(format!("{field}.spins.count"), "must be between 1 and 100"));
            }
        }
        if let Some(prefix) = &self.coupon {
            if Id::parse(prefix).is_err() || 32 < prefix.len() {
                return Err(DefinitionError::new(
                    format!("{field}.coupon"),
                    "must be 1-32 characters from [A-Za-z0-9._:-]",
                ));
            }
        }
        Ok(())
    }
}

/// One step's condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Step {
    pub kind: EventKind,
    #[serde(default)]
    pub min_amount_minor: i64,
    /// Only events in this store count.
    #[serde(default)]
    pub store: Option<Id>,
    /// Only events in stores of this category count.
    #[serde(default)]
    pub category: Option<Id>,
    /// Events (or distinct stores) needed; at least 1.
    #[serde(default = "one")]
    pub count: u32,
    /// Count distinct stores instead of events.
    #[serde(default)]
    pub distinct_stores: bool,
    #[serde(default)]
    pub reward: Option<Reward>,
}

fn one() -> u32 {
    1
}

/// A mission's definition. The window is the campaign's unless narrowed by
/// `starts_at`/`ends_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissionDef {
    pub campaign: Id,
    pub name: String,
    pub repeatable: bool,
    pub steps: Vec<Step>,
    pub reward: Option<Reward>,
    pub starts_at: Option<UnixMillis>,
    pub ends_at: Option<UnixMillis>,
}

impl MissionDef {
    pub fn validate(&self) -> Result<(), DefinitionError> {
        crate::campaign::check_name("name", &self.name)?;
        if self.steps.is_empty() || 20 < self.steps.len() {
            return Err(DefinitionError::new("steps", "must have between 1 and 20 steps"));
        }
        for (index, step) in self.steps.iter().enumerate() {
            let field = |name: &str| format!("steps[{index}].{name}");
            if !(0..=MAX_AMOUNT_MINOR).contains(&step.min_amount_minor) {
                return Err(DefinitionError::new(field("min_amount_minor"), "must be between 0 and 10^12"));
            }
            if step.count == 0 || 10_000 < step.count {
                return Err(DefinitionError::new(field("count"), "must be between 1 and 10000"));
            }
            if step.distinct_stores && step.store.is_some() {
                return Err(DefinitionError::new(field("distinct_stores"), "cannot be combined with a single store"));
            }
            if let Some(reward) = &step.reward {
                reward.validate(&field("reward"))?;
            }
        }
        if let Some(reward) = &self.reward {
            reward.validate("reward")?;
        }
        if let (Some(starts), Some(ends)) = (self.starts_at, self.ends_at) {
            if ends <= starts {
                return Err(DefinitionError::new("ends_at", "must be after starts_at"));
            }
        }
        Ok(())
    }

    fn in_window(&self, at: UnixMillis) -> bool {
        self.starts_at.is_none_or(|s| s <= at) && self.ends_at.is_none_or(|e| at < e)
    }
}

/// A customer's progress in one mission.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissionProgress {
    /// Index of the step being worked on (== steps.len() when done).
    pub step: usize,
    /// Events counted towards the current step.
    pub count: u32,
    /// Stores counted towards the current step, for distinct-store steps.
    pub stores: BTreeSet<Id>,
    pub completions: u32,
}

impl MissionProgress {
    pub fn completed(&self, def: &MissionDef) -> bool {
        def.steps.len() <= self.step
    }
}

/// What an event did to one mission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advance {
    /// Steps completed so far in this run (1-based: 2 means two steps done).
    pub steps_done: usize,
    pub step_completed: bool,
    pub mission_completed: bool,
    /// Rewards earned by this event: the step's, then the mission's.
    pub rewards: Vec<Reward>,
}

/// Applies `event` to `progress`. `category` is the category of the event's
/// store, if known. Returns `None` when the event does not count.
pub fn advance(
    def: &MissionDef,
    progress: &mut MissionProgress,
    event: &Event,
    category: Option<&Id>,
) -> Option<Advance> {
    if progress.completed(def) || !def.in_window(event.at) {
        return None;
    }
    let step = &def.steps[progress.step];
    let matches = step.kind == event.kind
        && step.min_amount_minor <= event.amount_minor
        && step.store.as_ref().is_none_or(|s| event.store.as_ref() == Some(s))
        && step.category.as_ref().is_none_or(|c| category == Some(c));
    if !matches {
        return None;
    }
    let reached = if step.distinct_stores {
        let store = event.store.clone()?;
        if !progress.stores.insert(store) {
            return None;
        }
        progress.stores.len() as u64 >= u64::from(step.count)
    } else {
        progress.count += 1;
        progress.count >= step.count
    };
    let mut result =
        Advance { steps_done: progress.step, step_completed: false, mission_completed: false, rewards: Vec::new() };
    if reached {
        result.rewards.extend(step.reward.clone());
        progress.step += 1;
        progress.count = 0;
        progress.stores.clear();
        result.step_completed = true;
        result.steps_done = progress.step;
        if progress.completed(def) {
            result.mission_completed = true;
            progress.completions += 1;
            result.rewards.extend(def.reward.clone());
            if def.repeatable {
                progress.step = 0;
            }
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(text: &str) -> Id {
        Id::parse(text).expect("valid")
    }

    fn three_shops() -> MissionDef {
        MissionDef {
            campaign: id("bf"),
            name: "Buy in 3 different shops".into(),
            repeatable: false,
            steps: vec![
                Step {
                    kind: EventKind::Visit,
                    min_amount_minor: 0,
                    store: None,
                    category: None,
                    count: 1,
                    distinct_stores: false,
                    reward: Some(Reward { points: 10, ..Reward::default() }),
                },
                Step {
                    kind: EventKind::Purchase,
                    min_amount_minor: 1_000,
                    store: None,
                    category: None,
                    count: 3,
                    distinct_stores: true,
                    reward: None,
                },
            ],
            reward: Some(Reward { points: 500, ..Reward::default() }),
            starts_at: None,
            ends_at: None,
        }
    }

    fn event(kind: EventKind, store: &str, amount_minor: i64) -> Event {
        Event { event_id: id("e"), customer: id("c"), store: Some(id(store)), kind, amount_minor, at: 0 }
    }

    #[test]
    fn steps_complete_in_order_with_distinct_stores() {
        let def = three_shops();
        let mut p = MissionProgress::default();
        // A purchase before the visit step does not count.
        assert_eq!(advance(&def, &mut p, &event(EventKind::Purchase, "s1", 5_000), None), None);
        let visit = advance(&def, &mut p, &event(EventKind::Visit, "s1", 0), None).expect("counts");
        assert!(visit.step_completed);
        assert_eq!(visit.rewards[0].points, 10);
        assert!(advance(&def, &mut p, &event(EventKind::Purchase, "s1", 5_000), None).is_some());
        // The same shop again, and a purchase under the minimum, do not count.
        assert_eq!(advance(&def, &mut p, &event(EventKind::Purchase, "s1", 5_000), None), None);
        assert_eq!(advance(&def, &mut p, &event(EventKind::Purchase, "s2", 999), None), None);
        assert!(advance(&def, &mut p, &event(EventKind::Purchase, "s2", 5_000), None).is_some());
        let done = advance(&def, &mut p, &event(EventKind::Purchase, "s3", 5_000), None).expect("counts");
        assert!(done.mission_completed);
        assert_eq!(done.steps_done, 2);
        assert_eq!(done.rewards.iter().map(|r| r.points).sum::<i64>(), 500);
        // Done once: nothing more counts.
        assert_eq!(advance(&def, &mut p, &event(EventKind::Visit, "s1", 0), None), None);
        assert_eq!(p.completions, 1);
    }

    #[test]
    fn category_and_window_filter_events() {
        let mut def = three_shops();
        def.steps[0].category = Some(id("food"));
        def.starts_at = Some(10);
        let mut p = MissionProgress::default();
        let mut visit = event(EventKind::Visit, "s1", 0);
        assert_eq!(advance(&def, &mut p, &visit, Some(&id("food"))), None, "before the window");
        visit.at = 10;
        assert_eq!(advance(&def, &mut p, &visit, Some(&id("fashion"))), None, "wrong category");
        assert!(advance(&def, &mut p, &visit, Some(&id("food"))).is_some());
    }

    #[test]
    fn validation_names_the_field() {
        let check = |edit: fn(&mut MissionDef), field: &str| {
            let mut d = three_shops();
            edit(&mut d);
            assert_eq!(d.validate().map_err(|e| e.field), Err(field.to_owned()));
        };
        assert_eq!(three_shops().validate(), Ok(()));
        check(|d| d.steps.clear(), "steps");
        check(|d| d.steps[1].count = 0, "steps[1].count");
        check(|d| d.steps[0].min_amount_minor = -1, "steps[0].min_amount_minor");
        check(|d| d.reward = Some(Reward { points: -1, ..Reward::default() }), "reward.points");
    }

    proptest! {
        /// A repeatable mission completes exactly once per full run of its
        /// steps, whatever the events in between.
        #[test]
        fn repeatable_missions_count_whole_runs(stores in prop::collection::vec(0u8..6, 0..200)) {
            let mut def = three_shops();
            def.repeatable = true;
            def.steps.remove(0);
            let mut p = MissionProgress::default();
            let mut completions = 0;
            let mut run = std::collections::BTreeSet::new();
            for s in stores {
                let e = event(EventKind::Purchase, &format!("s{s}"), 1_000);
                let newly = run.insert(s);
                let a = advance(&def, &mut p, &e, None);
                prop_assert_eq!(a.is_some(), newly);
                if run.len() == 3 {
                    completions += 1;
                    run.clear();
                    prop_assert!(a.expect("counted").mission_completed);
                }
            }
            prop_assert_eq!(p.completions, completions);
        }
    }
}
