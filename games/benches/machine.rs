//! The machine's own speed, measured beside the domain's benchmarks so
//! that they can be read as ratios (`bench/criterion` brackets the other
//! benchmarks with two runs of this one): absolute times on this shared
//! machine move by a fifth within minutes, a leaderboard's rank "worth 11
//! random memory reads" does not.
//!
//! - `machine/random_read`: one read of a random place in 512 MiB, each
//!   depending on the last (a walk of a random cycle: no prefetcher
//!   helps), the latency of main memory, which the leaderboard's tree and
//!   every cold actor wait on;
//! - `machine/xorshift_1k`: a thousand dependent xorshift steps, the
//!   core's speed on work that never leaves its registers.
//!
//! `cargo bench -p bazaar-games --bench machine`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};

/// Slots of the random cycle: 64 Mi of `u32`-sized indexes in `u64`s,
/// 512 MiB, far beyond any cache.
const SLOTS: usize = 64 << 20;

/// A single cycle through every slot (Sattolo's shuffle): following it
/// visits each slot once, in random order.
fn random_cycle(slots: usize) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut order: Vec<u64> = (0..slots as u64).collect();
    for i in (1..slots).rev() {
        let j = rng.gen_range(0..i);
        order.swap(i, j);
    }
    let mut next = vec![0u64; slots];
    for (i, slot) in order.iter().enumerate() {
        next[*slot as usize] = order[(i + 1) % slots];
    }
    next
}

fn machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("machine");
    let cycle = random_cycle(SLOTS);
    let mut at = 0u64;
    group.bench_function("random_read", |b| {
        b.iter(|| {
            at = cycle[at as usize];
            black_box(at)
        })
    });
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    group.bench_function("xorshift_1k", |b| {
        b.iter(|| {
            let mut x = black_box(state);
            for _ in 0..1_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            state = x;
            black_box(x)
        })
    });
    group.finish();
}

criterion_group!(benches, machine);
criterion_main!(benches);
