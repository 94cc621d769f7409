//! Leaderboard rank, top-N and update costs at 1 million and 10 million
//! members: the order-statistic tree must keep rank queries logarithmic,
//! never a scan.
//!
//! `cargo bench -p bazaar-games --bench leaderboard` (or `bench/criterion`,
//! which reports it against the machine's memory latency; set
//! `BAZAAR_BENCH_MEMBERS=1000000` to skip the 10 million case, which takes
//! a few GiB and a minute to build).

use bazaar_games::leaderboard::Leaderboard;
use bazaar_games::Id;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

fn member(n: u64) -> Id {
    Id::parse(&format!("c-{n}")).expect("valid id")
}

/// A board of `members` with spread-out scores, built deterministically.
fn board(members: u64) -> Leaderboard {
    let mut board = Leaderboard::default();
    for n in 0..members {
        board.add(&member(n), 1 + (n.wrapping_mul(2_654_435_761) % 1_000_000) as i64);
    }
    board
}

fn sizes() -> Vec<u64> {
    match std::env::var("BAZAAR_BENCH_MEMBERS") {
        Ok(text) => text.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => vec![1_000_000, 10_000_000],
    }
}

fn leaderboard(c: &mut Criterion) {
    let mut group = c.benchmark_group("leaderboard");
    for members in sizes() {
        let mut board = board(members);
        // A million members spread over the whole board, each asked about
        // once in a while: the tree's paths to them are not all in the
        // caches, as they are for a few hundred asked again and again.
        let probes: Vec<Id> = (0..1u64 << 20).map(|n| member(n.wrapping_mul(2_654_435_761) % members)).collect();
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::new("rank", members), &members, |b, _| {
            b.iter(|| {
                next = (next + 1) % probes.len();
                black_box(board.rank(&probes[next]))
            })
        });
        group.bench_with_input(BenchmarkId::new("top_10", members), &members, |b, _| {
            b.iter(|| black_box(board.top(10)))
        });
        group.bench_with_input(BenchmarkId::new("around_5", members), &members, |b, _| {
            b.iter(|| {
                next = (next + 1) % probes.len();
                black_box(board.around(&probes[next], 5))
            })
        });
        group.bench_with_input(BenchmarkId::new("add", members), &members, |b, _| {
            b.iter(|| {
                next = (next + 1) % probes.len();
                black_box(board.add(&probes[next], 3))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, leaderboard);
criterion_main!(benches);
