//! Progressive must-hit-by jackpots with commit–reveal fairness.
//!
//! Each eligible purchase contributes `contribution_bps` of its amount; a
//! `reserve_bps` share of that goes to the reserve that funds the next seed,
//! the rest to the pool. At each cycle start a hidden trigger is drawn
//! uniformly in `(seed, cap]` and committed to (SHA-256 of
//! `"<trigger_minor>:<salt hex>"`); the contribution that makes the pool reach
//! the trigger wins the pool, capped at the trigger, and its excess goes to
//! the reserve. So the pool never exceeds the cap, every cycle has exactly
//! one winner, and the hit reveals trigger and salt for anyone to check.
//!
//! The books always balance: `seeded + contributed == pool + reserve + paid`,
//! to the minor unit. `seeded` is money the house put in when the reserve
//! could not fund a seed.

use crate::ids::Id;
use crate::{DefinitionError, UnixMillis, MAX_AMOUNT_MINOR};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Basis points in one whole.
pub const BPS_WHOLE: i64 = 10_000;

/// A jackpot's definition. Changes to `seed_minor` and `cap_minor` apply
/// from the next cycle (the running cycle's trigger is committed); the
/// contribution rules apply to the next contribution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JackpotDef {
    pub campaign: Id,
    pub seed_minor: i64,
    pub cap_minor: i64,
    pub contribution_bps: u32,
    pub reserve_bps: u32,
    #[serde(default)]
    pub min_purchase_minor: i64,
}

impl JackpotDef {
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !(0..=MAX_AMOUNT_MINOR).contains(&self.seed_minor) {
            return Err(DefinitionError::new("seed_minor", "must be between 0 and 10^12"));
        }
        if self.cap_minor <= self.seed_minor {
            return Err(DefinitionError::new("cap_minor", "must be greater than seed_minor"));
        }
        if MAX_AMOUNT_MINOR < self.cap_minor {
            return Err(DefinitionError::new("cap_minor", "must be at most 10^12"));
        }
        if self.contribution_bps == 0 || 10_000 < self.contribution_bps {
            return Err(DefinitionError::new("contribution_bps", "must be between 1 and 10000 basis points"));
        }
        if 10_000 <= self.reserve_bps {
            return Err(DefinitionError::new(
                "reserve_bps",
                "must be between 0 and 9999 basis points (the pool must grow)",
            ));
        }
        if !(0..=MAX_AMOUNT_MINOR).contains(&self.min_purchase_minor) {
            return Err(DefinitionError::new("min_purchase_minor", "must be between 0 and 10^12"));
        }
        Ok(())
    }

    /// What a purchase of `amount_minor` contributes in all (pool and
    /// reserve together), in minor units.
    pub fn contribution_for(&self, amount_minor: i64) -> i64 {
        if amount_minor < self.min_purchase_minor {
            return 0;
        }
        amount_minor * i64::from(self.contribution_bps) / BPS_WHOLE
    }
}

/// The money books of a jackpot since its creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Books {
    pub seeded_minor: i64,
    pub contributed_minor: i64,
    pub paid_minor: i64,
}

/// A jackpot win, with the revealed trigger and salt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    pub cycle: u64,
    pub customer: Id,
    pub amount_minor: i64,
    pub at: UnixMillis,
    pub trigger_minor: i64,
    /// Lowercase hex of the 32-byte salt.
    pub salt: String,
    pub commitment: String,
}

/// The hidden part of a cycle: revealed only by its hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub trigger_minor: i64,
    pub salt: [u8; 32],
}

impl Secret {
    fn draw(seed_minor: i64, cap_minor: i64, rng: &mut impl Rng) -> Self {
        let mut salt = [0u8; 32];
        rng.fill(&mut salt);
        Self { trigger_minor: rng.gen_range(seed_minor + 1..=cap_minor), salt }
    }

    /// The public commitment of API.md.
    pub fn commitment(&self) -> String {
        commitment(self.trigger_minor, &hex::encode(self.salt))
    }
}

/// Lowercase hex SHA-256 of `"<trigger_minor>:<salt_hex>"`: what anyone can
/// recompute from a hit to check it against the published commitment.
pub fn commitment(trigger_minor: i64, salt_hex: &str) -> String {
    hex::encode(Sha256::digest(format!("{trigger_minor}:{salt_hex}").as_bytes()))
}

/// A jackpot's live state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JackpotState {
    pub cycle: u64,
    pub pool_minor: i64,
    pub reserve_minor: i64,
    /// The running cycle's seed and cap (fixed when it started).
    pub cycle_seed_minor: i64,
    pub cycle_cap_minor: i64,
    pub secret: Secret,
    pub commitment: String,
    pub books: Books,
    pub last_hit: Option<Hit>,
}

/// What one contribution did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContributionOutcome {
    pub contributed_minor: i64,
    pub won_minor: i64,
    pub hit: Option<Hit>,
}

impl JackpotState {
    /// Starts cycle 1: the house seeds the pool and commits to a trigger.
    pub fn start(def: &JackpotDef, rng: &mut impl Rng) -> Self {
        let secret = Secret::draw(def.seed_minor, def.cap_minor, rng);
        Self {
            cycle: 1,
            pool_minor: def.seed_minor,
            reserve_minor: 0,
            cycle_seed_minor: def.seed_minor,
            cycle_cap_minor: def.cap_minor,
            commitment: secret.commitment(),
            secret,
            books: Books { seeded_minor: def.seed_minor, ..Books::default() },
            last_hit: None,
        }
    }

    /// Applies a purchase of `amount_minor` by `customer`. If it reaches the
    /// trigger, the customer wins and the next cycle starts with a new
    /// trigger from `rng` under the current definition.
    pub fn contribute(
        &mut self,
        def: &JackpotDef,
        customer: &Id,
        amount_minor: i64,
        at: UnixMillis,
        rng: &mut impl Rng,
    ) -> ContributionOutcome {
        let contributed = def.contribution_for(amount_minor);
        if contributed == 0 {
            return ContributionOutcome { contributed_minor: 0, won_minor: 0, hit: None };
        }
        let to_reserve = contributed * i64::from(def.reserve_bps) / BPS_WHOLE;
        let to_pool = contributed - to_reserve;
        self.books.contributed_minor += contributed;
        self.reserve_minor += to_reserve;
        let trigger = self.secret.trigger_minor;
        if self.pool_minor + to_pool < trigger {
            self.pool_minor += to_pool;
            return ContributionOutcome { contributed_minor: contributed, won_minor: 0, hit: None };
        }
        // This contribution reaches the trigger: the pool stops at it, the
        // excess funds the reserve, and the whole pool is paid out.
        self.reserve_minor += self.pool_minor + to_pool - trigger;
        let won = trigger;
        self.books.paid_minor += won;
        let hit = Hit {
            cycle: self.cycle,
            customer: customer.clone(),
            amount_minor: won,
            at,
            trigger_minor: trigger,
            salt: hex::encode(self.secret.salt),
            commitment: self.commitment.clone(),
        };
        self.last_hit = Some(hit.clone());
        self.next_cycle(def, rng);
        ContributionOutcome { contributed_minor: contributed, won_minor: won, hit: Some(hit) }
    }

    /// Seeds the next cycle from the reserve (the house tops up what the
    /// reserve lacks) and commits to its trigger.
    fn next_cycle(&mut self, def: &JackpotDef, rng: &mut impl Rng) {
        let from_reserve = self.reserve_minor.min(def.seed_minor);
        self.reserve_minor -= from_reserve;
        self.books.seeded_minor += def.seed_minor - from_reserve;
        self.pool_minor = def.seed_minor;
        self.cycle += 1;
        self.cycle_seed_minor = def.seed_minor;
        self.cycle_cap_minor = def.cap_minor;
        self.secret = Secret::draw(def.seed_minor, def.cap_minor, rng);
        self.commitment = self.secret.commitment();
    }

    /// Whether the books balance: `seeded + contributed == pool + reserve + paid`.
    pub fn books_balance(&self) -> bool {
        let books = &self.books;
        books.seeded_minor + books.contributed_minor == self.pool_minor + self.reserve_minor + books.paid_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn def() -> JackpotDef {
        JackpotDef {
            campaign: Id::parse("bf").expect("valid"),
            seed_minor: 100_000,
            cap_minor: 200_000,
            contribution_bps: 100,
            reserve_bps: 2_000,
            min_purchase_minor: 1_000,
        }
    }

    fn customer(n: u32) -> Id {
        Id::parse(&format!("c-{n}")).expect("valid")
    }

    #[test]
    fn commitment_matches_the_contract() {
        // echo -n "150000:00ff" | sha256sum
        assert_eq!(commitment(150_000, "00ff"), hex::encode(Sha256::digest(b"150000:00ff")));
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let state = JackpotState::start(&def(), &mut rng);
        assert_eq!(state.commitment, commitment(state.secret.trigger_minor, &hex::encode(state.secret.salt)));
        assert!(100_000 < state.secret.trigger_minor && state.secret.trigger_minor <= 200_000);
    }

    #[test]
    fn contributions_split_between_pool_and_reserve() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let d = def();
        let mut state = JackpotState::start(&d, &mut rng);
        state.secret.trigger_minor = 200_000;
        let outcome = state.contribute(&d, &customer(1), 125_000, 0, &mut rng);
        assert_eq!(outcome.contributed_minor, 1_250);
        assert_eq!(state.reserve_minor, 250);
        assert_eq!(state.pool_minor, 101_000);
        let small = state.contribute(&d, &customer(1), 999, 0, &mut rng);
        assert_eq!(small.contributed_minor, 0);
        assert!(state.books_balance());
    }

    #[test]
    fn the_contribution_that_reaches_the_trigger_wins_it_exactly() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let d = def();
        let mut state = JackpotState::start(&d, &mut rng);
        state.secret.trigger_minor = 100_500;
        state.commitment = state.secret.commitment();
        let outcome = state.contribute(&d, &customer(9), 100_000, 42, &mut rng);
        // 1,000 contributed: 200 to reserve, 800 to pool; the pool stops at
        // 100,500 and the other 300 go to the reserve.
        let hit = outcome.hit.expect("trigger reached");
        assert_eq!(outcome.won_minor, 100_500);
        assert_eq!(hit.trigger_minor, 100_500);
        assert_eq!(hit.commitment, commitment(100_500, &hit.salt));
        assert_eq!(state.cycle, 2);
        assert_eq!(state.pool_minor, 100_000);
        assert_eq!(state.books.paid_minor, 100_500);
        // Reserve had 500, seeding took all 500 and the house added 99,500.
        assert_eq!(state.reserve_minor, 0);
        assert_eq!(state.books.seeded_minor, 200_000 - 500);
        assert!(state.books_balance());
        assert_ne!(state.commitment, hit.commitment);
    }

    #[test]
    fn validation_names_the_field() {
        let check = |edit: fn(&mut JackpotDef), field: &str| {
            let mut d = def();
            edit(&mut d);
            assert_eq!(d.validate().map_err(|e| e.field), Err(field.to_owned()));
        };
        assert_eq!(def().validate(), Ok(()));
        check(|d| d.cap_minor = d.seed_minor, "cap_minor");
        check(|d| d.contribution_bps = 10_001, "contribution_bps");
        check(|d| d.reserve_bps = 10_000, "reserve_bps");
        check(|d| d.seed_minor = -1, "seed_minor");
        check(|d| d.min_purchase_minor = -1, "min_purchase_minor");
    }

    proptest! {
        /// Over any sequence of purchases, with the definition changing on
        /// the way: the books balance after every step, the pool never
        /// exceeds the cycle's cap, every hit pays exactly its trigger, every
        /// revealed trigger matches its commitment, and cycles advance by one
        /// per hit.
        #[test]
        fn books_balance_and_every_cycle_has_one_winner(
            seed in any::<u64>(),
            steps in prop::collection::vec((1i64..5_000_000, 0u8..20), 1..400),
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut d = def();
            let mut state = JackpotState::start(&d, &mut rng);
            let mut hits = 0u64;
            for (index, (amount, change)) in steps.into_iter().enumerate() {
                if change == 0 {
                    d.seed_minor = 50_000 + (amount % 100_000);
                    d.cap_minor = d.seed_minor + 1 + (amount % 300_000);
                    d.reserve_bps = u32::try_from(amount % 9_000).expect("small");
                }
                let cycle_before = state.cycle;
                let trigger = state.secret.trigger_minor;
                let commitment_before = state.commitment.clone();
                let outcome = state.contribute(&d, &customer(u32::try_from(index).expect("small")), amount, 0, &mut rng);
                prop_assert!(state.books_balance(), "books off after step {}: {:?}", index, state);
                prop_assert!(state.pool_minor <= state.cycle_cap_minor);
                prop_assert!(state.pool_minor < state.secret.trigger_minor);
                if let Some(hit) = outcome.hit {
                    hits += 1;
                    prop_assert_eq!(hit.amount_minor, trigger);
                    prop_assert_eq!(&hit.commitment, &commitment_before);
                    prop_assert_eq!(commitment(hit.trigger_minor, &hit.salt), commitment_before);
                    prop_assert_eq!(state.cycle, cycle_before + 1);
                } else {
                    prop_assert_eq!(state.cycle, cycle_before);
                }
            }
            prop_assert_eq!(state.cycle, hits + 1);
        }
    }
}
