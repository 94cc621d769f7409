//! What the node writes per event: encoding one journal entry (a
//! customer's post-image, its idempotency record and two outbox messages),
//! a group-commit batch of 64 entries, and a snapshot of a 100,000-member
//! leaderboard; and a message's fingerprint, which every receiver computes
//! (against encoding into a new buffer and hashing that).
//! `cargo bench -p bazaar-node --bench codec`.

use bazaar_games::customer::Customer;
use bazaar_games::leaderboard::Leaderboard;
use bazaar_games::Id;
use bazaar_node::journal::{JournalEntry, Snapshot};
use bazaar_node::outbox::OutboxMessage;
use bazaar_node::storage::{encode, hash_encoded};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn id(text: &str) -> Id {
    Id::parse(text).expect("valid id")
}

fn entry(n: u64) -> JournalEntry {
    let mut customer = Customer { points_balance: 12_345, points_earned: 20_000, ..Customer::default() };
    customer.stats.purchases = 17;
    customer.stats.spend_minor = 1_234_567;
    customer.spins.insert(id("w-main"), 2);
    customer.campaign_points.insert(id("bf"), 20_000);
    let event_id = id(&format!("till-7-{n:08}"));
    let outbox = [
        OutboxMessage::contribution("mall", &event_id, &id("j-mall"), &id("c-42"), 125_000, 0, 0),
        OutboxMessage::score("mall", &event_id, &id("lb-spend"), &id("c-42"), 125_000, 0),
    ];
    JournalEntry {
        entity: "mall/customer/c-42".into(),
        entity_seq: n,
        change: encode(&customer),
        seen: Some((format!("mall/event/{event_id}").into_bytes().into(), vec![0; 160].into())),
        outbox: outbox.iter().map(OutboxMessage::record).collect(),
        audit: Vec::new(),
    }
}

fn codec(c: &mut Criterion) {
    let one = entry(1);
    println!("one journal entry: {} bytes encoded", encode(&one).len());
    c.bench_function("journal/encode_entry", |b| b.iter(|| black_box(encode(&one))));
    let batch: Vec<JournalEntry> = (0..64).map(entry).collect();
    c.bench_function("journal/encode_batch_64", |b| b.iter(|| black_box(encode(&batch))));

    let score = OutboxMessage::score("mall", &id("till-7-00000001"), &id("lb-spend"), &id("c-42"), 125_000, 0);
    assert_eq!(hash_encoded(&score.payload), xxhash_rust::xxh3::xxh3_64(&encode(&score.payload)));
    c.bench_function("fingerprint/score", |b| b.iter(|| black_box(score.fingerprint())));
    c.bench_function("fingerprint/score_new_buffer", |b| {
        b.iter(|| black_box(xxhash_rust::xxh3::xxh3_64(&encode(&score.payload))))
    });

    let mut board = Leaderboard::default();
    for n in 0..100_000u64 {
        board.add(&id(&format!("c-{n}")), 1 + (n * 7_919 % 100_000) as i64);
    }
    c.bench_function("snapshot/leaderboard_100k", |b| {
        b.iter(|| black_box(encode(&Snapshot { entity_seq: 1, state: encode(&board) })))
    });
    let customer = Customer::default();
    c.bench_function("snapshot/customer", |b| {
        b.iter(|| black_box(encode(&Snapshot { entity_seq: 1, state: encode(&customer) })))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
