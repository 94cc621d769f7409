//! Bazaar's game domain, pure and deterministic.
//!
//! Everything a loyalty programme decides lives here: how many points a
//! purchase earns ([`campaign`]), what a customer owns ([`customer`]), how a
//! wheel draws ([`wheel`]), when a progressive jackpot hits ([`jackpot`]), how
//! missions progress ([`mission`]) and who leads a leaderboard
//! ([`leaderboard`]). A tenant's definitions travel together as a
//! [`catalog::Catalog`].
//!
//! This crate does no I/O and knows no actors, runtime or storage: time comes
//! in as Unix milliseconds and randomness as an `&mut impl Rng`, so every
//! decision can be replayed from its inputs and property-tested over any
//! interleaving. Money is always an `i64` number of minor units; points are
//! `i64` too. Nothing here is a float.

pub mod campaign;
pub mod catalog;
pub mod customer;
pub mod engagement;
pub mod event;
pub mod ids;
pub mod jackpot;
pub mod leaderboard;
pub mod mission;
pub mod wheel;

mod error;

pub use error::DefinitionError;
pub use ids::Id;

/// A point in time, in milliseconds since the Unix epoch (UTC).
pub type UnixMillis = i64;

/// Milliseconds in one day; daily limits count UTC days.
pub const DAY_MILLIS: i64 = 86_400_000;

/// The largest amount of money, in minor units, that one field may hold:
/// 10^12 (ten billion in a currency with cents). Anything larger is treated as
/// a typing error rather than a purchase.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// The largest number of points one definition may award at once.
pub const MAX_POINTS: i64 = 1_000_000_000;
