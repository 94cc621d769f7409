//! Engagement: of the customers active in a window, how many played a
//! game, progressed in a mission, won a reward, or any of these.
//!
//! A customer is active in a window when any of its activity (an event, a
//! spin, mission progress, a reward) falls in it. The node tallies every
//! customer on a schedule and exports the ratios as gauges; the maths is
//! here so it can be tested on its own.

use crate::customer::Customer;
use crate::{UnixMillis, DAY_MILLIS};

/// The windows engagement is measured over: name and length.
pub const WINDOWS: [(&str, i64); 2] = [("7d", 7 * DAY_MILLIS), ("30d", 30 * DAY_MILLIS)];

/// The kinds of engagement, as named in metrics.
pub const KINDS: [&str; 4] = ["games", "missions", "rewards", "any"];

/// Counts of one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub active: u64,
    pub games: u64,
    pub missions: u64,
    pub rewards: u64,
    pub any: u64,
}

impl Tally {
    /// Counts `customer` for the window `[now - length, now]`.
    pub fn add(&mut self, customer: &Customer, now: UnixMillis, length: i64) {
        let since = now - length;
        let within = |at: Option<UnixMillis>| at.is_some_and(|at| since <= at && at <= now);
        let engagement = &customer.engagement;
        let played = within(engagement.last_played_at);
        let progressed = within(engagement.last_mission_progress_at);
        let rewarded = within(engagement.last_reward_at);
        let active = within(customer.stats.last_event_at) || played || progressed || rewarded;
        if !active {
            return;
        }
        self.active += 1;
        self.games += u64::from(played);
        self.missions += u64::from(progressed);
        self.rewards += u64::from(rewarded);
        self.any += u64::from(played || progressed || rewarded);
    }

    /// The count of one kind (`active` too).
    pub fn count(&self, kind: &str) -> u64 {
        match kind {
            "active" => self.active,
            "games" => self.games,
            "missions" => self.missions,
            "rewards" => self.rewards,
            "any" => self.any,
            _ => 0,
        }
    }

    /// The share of active customers engaged in `kind`; 0 with none active.
    pub fn ratio(&self, kind: &str) -> f64 {
        if self.active == 0 {
            return 0.0;
        }
        self.count(kind) as f64 / self.active as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 100 * DAY_MILLIS;

    fn customer(event_days_ago: Option<i64>, played_days_ago: Option<i64>, rewarded_days_ago: Option<i64>) -> Customer {
        let mut customer = Customer::default();
        customer.stats.last_event_at = event_days_ago.map(|d| NOW - d * DAY_MILLIS);
        customer.engagement.last_played_at = played_days_ago.map(|d| NOW - d * DAY_MILLIS);
        customer.engagement.last_reward_at = rewarded_days_ago.map(|d| NOW - d * DAY_MILLIS);
        customer
    }

    #[test]
    fn ratios_count_the_active_customers_of_each_window() {
        let customers = [
            customer(Some(1), Some(1), None),
            customer(Some(2), None, Some(2)),
            customer(Some(3), None, None),
            customer(Some(20), Some(20), None),
            customer(Some(40), Some(40), Some(40)),
        ];
        let mut week = Tally::default();
        let mut month = Tally::default();
        for c in &customers {
            week.add(c, NOW, 7 * DAY_MILLIS);
            month.add(c, NOW, 30 * DAY_MILLIS);
        }
        assert_eq!(week, Tally { active: 3, games: 1, missions: 0, rewards: 1, any: 2 });
        assert_eq!(month, Tally { active: 4, games: 2, missions: 0, rewards: 1, any: 3 });
        assert!((week.ratio("any") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(Tally::default().ratio("games"), 0.0);
    }
}
