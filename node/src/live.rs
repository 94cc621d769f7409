//! Live updates for watchers (in-store screens, apps): jackpot pools and
//! hits, leaderboard changes.
//!
//! The service layer publishes here only after the journal entries behind
//! an update are durable, so a screen never shows a hit that a crash could
//! take back. Pools go through a `watch` channel (a watcher always reads the
//! latest value; a slow one skips values, never slows the game); hits
//! through a bounded `broadcast` (a watcher that falls behind is told so and
//! catches up from the audit); leaderboards publish a change counter and
//! watchers re-read the top entries themselves, at most ten times a second.
//!
//! A pool update carries its position `(cycle, contributed_minor)`, which
//! only grows, so updates published out of order by concurrent requests
//! never move a pool backwards.

use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::{broadcast, watch};

/// Hits a watcher may fall behind by before it must catch up.
const HIT_BUFFER: usize = 64;

/// A jackpot's pool at one point of its history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolUpdate {
    pub cycle: u64,
    pub contributed_minor: i64,
    pub pool_minor: i64,
}

impl PoolUpdate {
    /// The update's place in the jackpot's history.
    pub fn position(&self) -> (u64, i64) {
        (self.cycle, self.contributed_minor)
    }
}

struct JackpotChannels {
    pool: watch::Sender<PoolUpdate>,
    hits: broadcast::Sender<crate::api::HitAnswer>,
}

type Key = (String, String);

/// The node's live channels, created on first use.
#[derive(Default)]
pub struct Live {
    jackpots: Mutex<HashMap<Key, JackpotChannels>>,
    leaderboards: Mutex<HashMap<Key, watch::Sender<u64>>>,
}

impl Live {
    fn with_jackpot<T>(&self, tenant: &str, jackpot: &str, f: impl FnOnce(&JackpotChannels) -> T) -> T {
        let mut jackpots = self.jackpots.lock();
        let channels = jackpots.entry((tenant.to_owned(), jackpot.to_owned())).or_insert_with(|| JackpotChannels {
            pool: watch::channel(PoolUpdate::default()).0,
            hits: broadcast::channel(HIT_BUFFER).0,
        });
        f(channels)
    }

    /// Publishes a durable pool value, unless a later one is already out.
    pub fn publish_pool(&self, tenant: &str, jackpot: &str, update: PoolUpdate) {
        self.with_jackpot(tenant, jackpot, |channels| {
            channels.pool.send_if_modified(|current| {
                if current.position() < update.position() {
                    *current = update;
                    true
                } else {
                    false
                }
            });
        });
    }

    /// Publishes a durable hit.
    pub fn publish_hit(&self, tenant: &str, jackpot: &str, hit: crate::api::HitAnswer) {
        self.with_jackpot(tenant, jackpot, |channels| {
            let _ = channels.hits.send(hit);
        });
    }

    pub fn watch_pool(&self, tenant: &str, jackpot: &str) -> watch::Receiver<PoolUpdate> {
        self.with_jackpot(tenant, jackpot, |channels| channels.pool.subscribe())
    }

    pub fn watch_hits(&self, tenant: &str, jackpot: &str) -> broadcast::Receiver<crate::api::HitAnswer> {
        self.with_jackpot(tenant, jackpot, |channels| channels.hits.subscribe())
    }

    /// Notes that a leaderboard's scores changed (durably).
    pub fn publish_leaderboard(&self, tenant: &str, leaderboard: &str) {
        let mut boards = self.leaderboards.lock();
        let sender = boards.entry((tenant.to_owned(), leaderboard.to_owned())).or_insert_with(|| watch::channel(0).0);
        sender.send_modify(|changes| *changes += 1);
    }

    pub fn watch_leaderboard(&self, tenant: &str, leaderboard: &str) -> watch::Receiver<u64> {
        let mut boards = self.leaderboards.lock();
        boards.entry((tenant.to_owned(), leaderboard.to_owned())).or_insert_with(|| watch::channel(0).0).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_never_moves_backwards() {
        let live = Live::default();
        let mut pool = live.watch_pool("t", "j");
        live.publish_pool("t", "j", PoolUpdate { cycle: 1, contributed_minor: 50, pool_minor: 150 });
        live.publish_pool("t", "j", PoolUpdate { cycle: 1, contributed_minor: 20, pool_minor: 120 });
        assert_eq!(pool.borrow_and_update().pool_minor, 150);
        live.publish_pool("t", "j", PoolUpdate { cycle: 2, contributed_minor: 60, pool_minor: 100 });
        assert!(pool.has_changed().expect("open"));
        assert_eq!(pool.borrow_and_update().cycle, 2);
    }
}
