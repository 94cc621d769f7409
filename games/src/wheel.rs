//! Wheels of fortune: weighted segments, prizes, stock.
//!
//! A wheel's definition says what a spin costs and what it can win; the
//! wheel's state counts what each segment has given away, so a segment whose
//! stock is gone is never drawn. The draw itself is one uniform integer below
//! the sum of the available weights ([`Draw::roll`]); recording that integer
//! with the weights it was drawn against lets an auditor re-check the choice.

use crate::ids::Id;
use crate::{DefinitionError, MAX_AMOUNT_MINOR, MAX_POINTS};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most segments one wheel may have.
pub const MAX_SEGMENTS: usize = 64;

/// What one spin costs the customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SpinCost {
    /// Spin entitlements of this wheel, earned from purchases or missions.
    Entitlements(u32),
    /// Points from the customer's balance.
    Points(i64),
}

/// A prize a segment awards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Prize {
    Points(i64),
    /// Free spins of this same wheel.
    Spins(u32),
    /// A coupon whose unique code starts with this prefix.
    Coupon(String),
    /// Credit to the customer's wallet.
    CashbackMinor(i64),
    /// A physical item, usually with a stock limit.
    Item(String),
    /// "Better luck next time".
    Nothing,
}

/// One segment of the wheel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Segment {
    pub label: String,
    pub weight: u32,
    pub prize: Prize,
    /// How many times this segment may be won in all; `None` for unlimited.
    #[serde(default)]
    pub stock: Option<u32>,
}

/// Spins that purchases grant: every purchase of at least
/// `min_purchase_minor` under the wheel's campaign grants `spins`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpinEarning {
    pub min_purchase_minor: i64,
    pub spins: u32,
}

/// A wheel's definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WheelDef {
    pub campaign: Id,
    pub cost: SpinCost,
    /// Spins per customer per UTC day; `None` for no limit.
    #[serde(default)]
    pub daily_limit: Option<u32>,
    pub segments: Vec<Segment>,
    #[serde(default)]
    pub earn: Option<SpinEarning>,
}

impl WheelDef {
    pub fn validate(&self) -> Result<(), DefinitionError> {
        match self.cost {
            SpinCost::Entitlements(n) if n == 0 || 100 < n => {
                return Err(DefinitionError::new("cost.entitlements", "must be between 1 and 100"))
            }
            SpinCost::Points(n) if !(1..=MAX_POINTS).contains(&n) => {
                return Err(DefinitionError::new("cost.points", "must be between 1 and 10^9"))
            }
            _ => {}
        }
        if self.daily_limit == Some(0) {
            return Err(DefinitionError::new("daily_limit", "must be at least 1, or null for no limit"));
        }
        if self.segments.is_empty() || MAX_SEGMENTS < self.segments.len() {
            return Err(DefinitionError::new("segments", "must have between 1 and 64 segments"));
        }
        let total: u64 = self.segments.iter().map(|s| u64::from(s.weight)).sum();
        if total == 0 {
            return Err(DefinitionError::new("segments", "weights must not sum to zero"));
        }
        for (index, segment) in self.segments.iter().enumerate() {
            let field = |name: &str| format!("segments[{index}].{name}");
            crate::campaign::check_name(&field("label"), &segment.label)?;
            if self.segments[..index].iter().any(|s| s.label == segment.label) {
                return Err(DefinitionError::new(field("label"), "must be unique within the wheel"));
            }
            if 1_000_000 < segment.weight {
                return Err(DefinitionError::new(field("weight"), "must be between 0 and 10^6"));
            }
            match &segment.prize {
                Prize::Points(n) if !(1..=MAX_POINTS).contains(n) => {
                    return Err(DefinitionError::new(field("prize.points"), "must be between 1 and 10^9"))
                }
                Prize::Spins(n) if *n == 0 || 100 < *n => {
                    return Err(DefinitionError::new(field("prize.spins"), "must be between 1 and 100"))
                }
                Prize::CashbackMinor(n) if !(1..=MAX_AMOUNT_MINOR).contains(n) => {
                    return Err(DefinitionError::new(field("prize.cashback_minor"), "must be between 1 and 10^12"))
                }
                Prize::Coupon(prefix) if crate::ids::Id::parse(prefix).is_err() || 32 < prefix.len() => {
                    return Err(DefinitionError::new(
                        field("prize.coupon"),
                        "must be 1-32 characters from [A-Za-z0-9._:-]",
                    ))
                }
                Prize::Item(name) => crate::campaign::check_name(&field("prize.item"), name)?,
                _ => {}
            }
        }
        if let Some(earn) = &self.earn {
            if !(0..=MAX_AMOUNT_MINOR).contains(&earn.min_purchase_minor) {
                return Err(DefinitionError::new("earn.min_purchase_minor", "must be between 0 and 10^12"));
            }
            if earn.spins == 0 || 100 < earn.spins {
                return Err(DefinitionError::new("earn.spins", "must be between 1 and 100"));
            }
        }
        Ok(())
    }
}

/// A prize as won, with a coupon's unique code filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WonPrize {
    Points(i64),
    Spins(u32),
    Coupon(String),
    CashbackMinor(i64),
    Item(String),
    Nothing,
}

/// The outcome of one draw, with what is needed to re-check it: the weights
/// available at the time (a segment out of stock has weight 0) and the roll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draw {
    pub draw_id: String,
    pub segment_index: usize,
    pub label: String,
    pub prize: WonPrize,
    /// Uniform in `0..total_weight`.
    pub roll: u64,
    pub total_weight: u64,
    pub available_weights: Vec<u64>,
}

/// Every segment with stock left has weight zero: nothing can be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("every prize of this wheel is out of stock")]
pub struct WheelExhausted;

/// What a wheel has given away.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WheelState {
    /// Wins per segment label (labels, not positions, so a redefinition
    /// that reorders segments keeps their stock).
    pub awarded: BTreeMap<String, u32>,
    /// Draws made so far; numbers the draw ids.
    pub draws: u64,
}

impl WheelState {
    /// The weight each segment may be drawn with now: its weight, or 0 when
    /// its stock is gone.
    pub fn available_weights(&self, def: &WheelDef) -> Vec<u64> {
        def.segments
            .iter()
            .map(|segment| {
                let awarded = self.awarded.get(&segment.label).copied().unwrap_or(0);
                match segment.stock {
                    Some(stock) if stock <= awarded => 0,
                    _ => u64::from(segment.weight),
                }
            })
            .collect()
    }

    /// Draws a segment. `wheel` names the wheel in the draw id and coupon
    /// codes, which are unique because they carry the draw number.
    pub fn draw(&mut self, wheel: &Id, def: &WheelDef, rng: &mut impl Rng) -> Result<Draw, WheelExhausted> {
        let weights = self.available_weights(def);
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return Err(WheelExhausted);
        }
        let roll = rng.gen_range(0..total);
        let segment_index = pick(&weights, roll);
        let segment = &def.segments[segment_index];
        self.draws += 1;
        *self.awarded.entry(segment.label.clone()).or_insert(0) += 1;
        let draw_id = format!("{wheel}-{}", self.draws);
        let prize = match &segment.prize {
            Prize::Points(n) => WonPrize::Points(*n),
            Prize::Spins(n) => WonPrize::Spins(*n),
            Prize::Coupon(prefix) => {
                let suffix: String =
                    (0..6).map(|_| char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[rng.gen_range(0..32)])).collect();
                WonPrize::Coupon(format!("{prefix}-{}{suffix}", self.draws))
            }
            Prize::CashbackMinor(n) => WonPrize::CashbackMinor(*n),
            Prize::Item(name) => WonPrize::Item(name.clone()),
            Prize::Nothing => WonPrize::Nothing,
        };
        Ok(Draw {
            draw_id,
            segment_index,
            label: segment.label.clone(),
            prize,
            roll,
            total_weight: total,
            available_weights: weights,
        })
    }
}

/// The segment a roll lands on: the first whose cumulative weight exceeds
/// the roll. Public so an auditor's tool can re-check a recorded draw.
pub fn pick(weights: &[u64], roll: u64) -> usize {
    let mut cumulative = 0;
    for (index, weight) in weights.iter().enumerate() {
        cumulative += weight;
        if roll < cumulative {
            return index;
        }
    }
    unreachable!("roll is drawn below the sum of the weights")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn segment(label: &str, weight: u32, prize: Prize, stock: Option<u32>) -> Segment {
        Segment { label: label.into(), weight, prize, stock }
    }

    fn wheel() -> WheelDef {
        WheelDef {
            campaign: Id::parse("bf").expect("valid"),
            cost: SpinCost::Entitlements(1),
            daily_limit: Some(3),
            segments: vec![
                segment("10 points", 50, Prize::Points(10), None),
                segment("coupon", 30, Prize::Coupon("BF".into()), None),
                segment("tv", 20, Prize::Item("TV".into()), Some(2)),
                segment("never", 0, Prize::Nothing, None),
            ],
            earn: None,
        }
    }

    #[test]
    fn pick_follows_cumulative_weights() {
        let weights = [5, 0, 3];
        let picks: Vec<usize> = (0..8).map(|roll| pick(&weights, roll)).collect();
        assert_eq!(picks, [0, 0, 0, 0, 0, 2, 2, 2]);
    }

    #[test]
    fn out_of_stock_segment_is_never_drawn_and_the_wheel_can_run_dry() {
        let def = WheelDef { segments: vec![segment("tv", 1, Prize::Item("TV".into()), Some(2))], ..wheel() };
        let wheel_id = Id::parse("w").expect("valid");
        let mut state = WheelState::default();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        assert!(state.draw(&wheel_id, &def, &mut rng).is_ok());
        assert!(state.draw(&wheel_id, &def, &mut rng).is_ok());
        assert_eq!(state.draw(&wheel_id, &def, &mut rng), Err(WheelExhausted));
        assert_eq!(state.awarded["tv"], 2);
    }

    #[test]
    fn validation_names_the_field() {
        let check = |edit: fn(&mut WheelDef), field: &str| {
            let mut def = wheel();
            edit(&mut def);
            assert_eq!(def.validate().map_err(|e| e.field), Err(field.to_owned()));
        };
        assert_eq!(wheel().validate(), Ok(()));
        check(|w| w.segments.iter_mut().for_each(|s| s.weight = 0), "segments");
        check(|w| w.segments.clear(), "segments");
        check(|w| w.cost = SpinCost::Points(0), "cost.points");
        check(|w| w.daily_limit = Some(0), "daily_limit");
        check(|w| w.segments[1].label = "10 points".into(), "segments[1].label");
        check(|w| w.segments[0].prize = Prize::Points(-5), "segments[0].prize.points");
        check(|w| w.segments[1].prize = Prize::Coupon("bad prefix".into()), "segments[1].prize.coupon");
    }

    proptest! {
        /// Whatever the seed, a draw lands on a segment with available
        /// weight, its roll re-checks with `pick`, coupon codes are unique,
        /// and stock is never exceeded.
        #[test]
        fn draws_respect_weights_and_stock(seed in any::<u64>(), spins in 1usize..200) {
            let def = wheel();
            let wheel_id = Id::parse("w").expect("valid");
            let mut state = WheelState::default();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut codes = std::collections::BTreeSet::new();
            for _ in 0..spins {
                let draw = state.draw(&wheel_id, &def, &mut rng).expect("unlimited segments remain");
                prop_assert!(0 < draw.available_weights[draw.segment_index]);
                prop_assert_eq!(pick(&draw.available_weights, draw.roll), draw.segment_index);
                prop_assert_ne!(draw.label.as_str(), "never");
                if let WonPrize::Coupon(code) = &draw.prize {
                    prop_assert!(codes.insert(code.clone()), "duplicate coupon {}", code);
                }
            }
            prop_assert!(state.awarded.get("tv").copied().unwrap_or(0) <= 2);
        }
    }
}
