//! The domain's hot paths, in-process: applying a purchase to a customer
//! (earning rules, missions, tier, outbox), a jackpot contribution, and a
//! wheel draw. `cargo bench -p bazaar-games --bench hot_paths`.

use bazaar_games::campaign::{Campaign, EarningRules, TierDef};
use bazaar_games::catalog::{Catalog, StoreDef};
use bazaar_games::customer::Customer;
use bazaar_games::event::{Event, EventKind};
use bazaar_games::jackpot::{JackpotDef, JackpotState};
use bazaar_games::leaderboard::{LeaderboardDef, Metric};
use bazaar_games::mission::{MissionDef, Reward, Step};
use bazaar_games::wheel::{Prize, Segment, SpinCost, SpinEarning, WheelDef, WheelState};
use bazaar_games::Id;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;

fn id(text: &str) -> Id {
    Id::parse(text).expect("valid id")
}

/// A mall's catalog: 20 stores, one campaign, a wheel, a jackpot, a
/// three-step mission and two leaderboards.
fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    for n in 0..20 {
        let category = ["fashion", "food", "electronics", "beauty"][n % 4];
        catalog.stores.insert(id(&format!("s-{n}")), StoreDef { name: format!("Shop {n}"), category: id(category) });
    }
    catalog.campaigns.insert(
        id("bf"),
        Campaign {
            name: "Black Friday".into(),
            starts_at: 0,
            ends_at: i64::MAX,
            stores: None,
            earning: EarningRules {
                points_per_unit_minor: 100,
                tier_multipliers_pct: BTreeMap::from([("gold".into(), 150)]),
                store_multipliers_pct: BTreeMap::from([(id("s-3"), 200)]),
                event_bonus: BTreeMap::from([(EventKind::Visit, 5)]),
            },
            tiers: vec![
                TierDef { name: "silver".into(), min_points: 500 },
                TierDef { name: "gold".into(), min_points: 5_000 },
            ],
        },
    );
    catalog.wheels.insert(id("w"), wheel());
    catalog.jackpots.insert(id("j"), jackpot());
    let step = |category: Option<&str>, count: u32, distinct_stores: bool| Step {
        kind: EventKind::Purchase,
        min_amount_minor: 1_000,
        store: None,
        category: category.map(id),
        count,
        distinct_stores,
        reward: Some(Reward { points: 20, ..Reward::default() }),
    };
    catalog.missions.insert(
        id("m"),
        MissionDef {
            campaign: id("bf"),
            name: "Three shops".into(),
            repeatable: true,
            steps: vec![step(Some("fashion"), 1, false), step(Some("food"), 1, false), step(None, 3, true)],
            reward: Some(Reward { points: 300, ..Reward::default() }),
            starts_at: None,
            ends_at: None,
        },
    );
    for (name, metric) in [("lb-spend", Metric::Spend), ("lb-points", Metric::Points)] {
        catalog.leaderboards.insert(id(name), LeaderboardDef { campaign: id("bf"), metric, top_size: 10 });
    }
    catalog
}

fn wheel() -> WheelDef {
    WheelDef {
        campaign: id("bf"),
        cost: SpinCost::Entitlements(1),
        daily_limit: Some(5),
        segments: (0..8)
            .map(|n| Segment {
                label: format!("segment {n}"),
                weight: 10 + n,
                prize: if n % 2 == 0 { Prize::Points(50) } else { Prize::Coupon("BF".into()) },
                stock: if n == 7 { Some(1_000_000) } else { None },
            })
            .collect(),
        earn: Some(SpinEarning { min_purchase_minor: 5_000, spins: 1 }),
    }
}

fn jackpot() -> JackpotDef {
    JackpotDef {
        campaign: id("bf"),
        seed_minor: 100_000,
        cap_minor: 1_000_000_000,
        contribution_bps: 100,
        reserve_bps: 2_000,
        min_purchase_minor: 1_000,
    }
}

fn hot_paths(c: &mut Criterion) {
    let catalog = catalog();
    let customer_id = id("c-42");
    let events: Vec<Event> = (0..1_024)
        .map(|n| Event {
            event_id: id(&format!("e-{n}")),
            customer: customer_id.clone(),
            store: Some(id(&format!("s-{}", n % 20))),
            kind: EventKind::Purchase,
            amount_minor: 1_000 + (n * 7_919) % 50_000,
            at: 1_000 + n,
        })
        .collect();
    let mut customer = Customer::default();
    let mut next = 0usize;
    c.bench_function("customer/apply_purchase", |b| {
        b.iter(|| {
            next = (next + 1) % events.len();
            black_box(customer.apply_event(&events[next], &catalog))
        })
    });

    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let def = jackpot();
    let mut state = JackpotState::start(&def, &mut rng);
    c.bench_function("jackpot/contribute", |b| {
        b.iter(|| black_box(state.contribute(&def, &customer_id, 12_345, 0, &mut rng)))
    });

    let wheel_def = wheel();
    let mut wheel_state = WheelState::default();
    let wheel_id = id("w");
    c.bench_function("wheel/draw", |b| b.iter(|| black_box(wheel_state.draw(&wheel_id, &wheel_def, &mut rng))));
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
