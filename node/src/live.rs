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

use crate::FastMap;
use parking_lot::Mutex;
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

/// Channels by tenant, then by jackpot or leaderboard: looked up by
/// borrowed names, so that a publication (one per durable delivery)
/// allocates nothing once its channel exists (a map keyed by owned pairs
/// made two strings per lookup).
type ByTenant<C> = FastMap<String, FastMap<String, C>>;

/// The channel of `tenant`'s `id` in `map`, made by `new` on first use.
fn channel<'a, C>(map: &'a mut ByTenant<C>, tenant: &str, id: &str, new: impl FnOnce() -> C) -> &'a C {
    if !map.get(tenant).is_some_and(|ids| ids.contains_key(id)) {
        map.entry(tenant.to_owned()).or_default().insert(id.to_owned(), new());
    }
    &map[tenant][id]
}

/// The node's live channels, created on first use.
pub struct Live {
    jackpots: Mutex<ByTenant<JackpotChannels>>,
    leaderboards: Mutex<ByTenant<watch::Sender<u64>>>,
    /// Set once the node stops: every watch ends.
    stopping: watch::Sender<bool>,
}

impl Default for Live {
    fn default() -> Self {
        Self { jackpots: Mutex::default(), leaderboards: Mutex::default(), stopping: watch::channel(false).0 }
    }
}

impl Live {
    /// Ends every watch, now and from now on: a stop drains its requests,
    /// and a screen's stream would otherwise never end (its browser
    /// reconnects, to this node once it is back or to another, and
    /// catches up with `Last-Event-ID`).
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once the node stops (at once if it has).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }
    }

    fn with_jackpot<T>(&self, tenant: &str, jackpot: &str, f: impl FnOnce(&JackpotChannels) -> T) -> T {
        let mut jackpots = self.jackpots.lock();
        f(channel(&mut jackpots, tenant, jackpot, || JackpotChannels {
            pool: watch::channel(PoolUpdate::default()).0,
            hits: broadcast::channel(HIT_BUFFER).0,
        }))
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

    /// Notes that a leaderboard's scores changed: their causes are durable
    /// and the scores sent, so a watcher's read, which goes through the
    /// leaderboard's mailbox behind them, sees them.
    pub fn publish_leaderboard(&self, tenant: &str, leaderboard: &str) {
        let mut boards = self.leaderboards.lock();
        channel(&mut boards, tenant, leaderboard, || watch::channel(0).0).send_modify(|changes| *changes += 1);
    }

    pub fn watch_leaderboard(&self, tenant: &str, leaderboard: &str) -> watch::Receiver<u64> {
        let mut boards = self.leaderboards.lock();
        channel(&mut boards, tenant, leaderboard, || watch::channel(0).0).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenants_channels_are_its_own() {
        let live = Live::default();
        let mut a = live.watch_leaderboard("t1", "top");
        let mut b = live.watch_leaderboard("t2", "top");
        let c = live.watch_leaderboard("t1", "other");
        live.publish_leaderboard("t1", "top");
        live.publish_leaderboard("t1", "top");
        assert_eq!(*a.borrow_and_update(), 2);
        assert!(!b.has_changed().expect("open") && !c.has_changed().expect("open"));
        // A channel made by a publication is the one a later watcher gets.
        live.publish_leaderboard("t2", "top");
        assert_eq!(*live.watch_leaderboard("t2", "top").borrow(), 1);
        assert_eq!(*b.borrow_and_update(), 1);
        live.publish_pool("t3", "j", PoolUpdate { cycle: 1, contributed_minor: 5, pool_minor: 105 });
        assert_eq!(live.watch_pool("t3", "j").borrow().pool_minor, 105);
        assert_eq!(live.watch_pool("t1", "j").borrow().pool_minor, 0);
    }

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
