//! Unary requests that arrive together, recorded together.
//!
//! A unary event on its own pays for every step of its path alone: a
//! message to its customer's actor, one to its jackpot's and one to its
//! leaderboard's, each waking a thread, and a wait for durability. A batch
//! pays once for what its events share: one message per receiver, one
//! wait, one acquisition of the counters (under batched load the node
//! spends about a third of the CPU per event it spends on unary events).
//!
//! A [`Lane`] gathers a tenant's unary events into such batches without a
//! timer. The first event to find no batch gathering starts one: it
//! spawns a task that first lets the scheduler run its other tasks once
//! (the requests it decodes meanwhile join) and then takes everything
//! queued. An idle node records a lone event after one pass of its
//! scheduler; a busy one gathers the requests that arrived during that
//! pass. Batches do not wait for one another: a new one gathers as soon
//! as the last was taken.
//!
//! Measured (docs/performance.md): 64 unary clients, a sixth to a fifth
//! fewer node CPU-µs per event and more events per second. The answers
//! are those of events recorded one by one: the batch goes the way of
//! [`crate::service::Service::record_many`] (which streams use), where
//! each event keeps its own answer, error and idempotency record.

use parking_lot::Mutex;

/// A tenant's requests waiting for the batch being gathered.
pub struct Lane<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    queue: Vec<T>,
    /// A batch is being gathered: a task will take the queue.
    gathering: bool,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self { state: Mutex::new(State { queue: Vec::new(), gathering: false }) }
    }
}

impl<T> Lane<T> {
    /// Queues `item`. True when no batch was gathering: the caller is to
    /// start the task that will [`Lane::take`] it.
    #[must_use = "on true, nothing takes the item unless the caller starts a task that does"]
    pub fn push(&self, item: T) -> bool {
        let mut state = self.state.lock();
        state.queue.push(item);
        !std::mem::replace(&mut state.gathering, true)
    }

    /// Everything queued, oldest first; the next [`Lane::push`] starts a
    /// new batch.
    pub fn take(&self) -> Vec<T> {
        let mut state = self.state.lock();
        state.gathering = false;
        std::mem::take(&mut state.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_starts_a_batch_and_the_rest_join_it_until_it_is_taken() {
        let lane = Lane::default();
        assert!(lane.push(1), "an idle lane starts a batch");
        assert!(!lane.push(2), "a batch is gathering");
        assert!(!lane.push(3));
        assert_eq!(lane.take(), vec![1, 2, 3], "all of it, oldest first");
        assert!(lane.push(4), "a request after the take starts the next batch");
        assert!(!lane.push(5));
        assert_eq!(lane.take(), vec![4, 5]);
        assert_eq!(lane.take(), Vec::<i32>::new(), "nothing is left behind or taken twice");
    }

    #[test]
    fn requests_pushed_from_many_threads_are_each_taken_exactly_once() {
        // Whoever starts a batch takes it, as the service's task does.
        let lane = Lane::default();
        let taken = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (lane, taken) = (&lane, &taken);
                scope.spawn(move || {
                    for n in 0..1_000 {
                        if lane.push(thread * 1_000 + n) {
                            taken.lock().extend(lane.take());
                        }
                    }
                });
            }
        });
        let mut taken = taken.into_inner();
        assert_eq!(lane.take(), Vec::<i32>::new(), "nothing waits once every batch is taken");
        taken.sort_unstable();
        assert_eq!(taken, (0..4_000).collect::<Vec<_>>(), "every request taken, none twice");
    }
}
