//! Cross-entity messages: what one entity's change causes in another.
//!
//! A purchase feeds jackpots and leaderboards; a spin asks a wheel to draw.
//! The message is part of the sender's journal entry, so it is durable with
//! the change that caused it; the writer indexes it in the `outbox` tree,
//! and it stays there until the receiver's answer is durable. The service
//! delivers it at once; [`crate::service::Service::redeliver`] delivers
//! whatever is still there after a crash or a failed attempt. Receivers
//! deduplicate by the message id, so delivery is at-least-once and the
//! effect exactly-once.

use crate::journal::KeyValue;
use crate::storage::{encode, key};
use bazaar_games::{Id, UnixMillis};
use serde::{Deserialize, Serialize};

/// The idempotency scope receivers record applied messages under.
pub const MESSAGE_SCOPE: &str = "msg";

/// The key of the idempotency record a receiver writes when it applies
/// the message stored under `outbox_key` (`tenant/id` → `tenant/msg/id`).
pub fn receipt_key(outbox_key: &[u8]) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(outbox_key.len() + MESSAGE_SCOPE.len() + 2);
    receipt_key_into(outbox_key, &mut key).then_some(key)
}

/// [`receipt_key`] written into `key` (emptied first), for a buffer used
/// again and again: the journal writer makes one per message of every
/// commit, most only to look it up. False if `outbox_key` has no tenant
/// (`key` is then empty).
pub fn receipt_key_into(outbox_key: &[u8], key: &mut Vec<u8>) -> bool {
    key.clear();
    let Some(slash) = outbox_key.iter().position(|b| *b == b'/') else { return false };
    let (tenant, id) = (&outbox_key[..slash], &outbox_key[slash + 1..]);
    key.extend_from_slice(tenant);
    key.push(b'/');
    key.extend_from_slice(MESSAGE_SCOPE.as_bytes());
    key.push(b'/');
    key.extend_from_slice(id);
    true
}

/// Whether a `seen` key is a receiver's record of a message.
pub fn is_receipt(seen_key: &[u8]) -> bool {
    seen_key.split(|b| *b == b'/').nth(1) == Some(MESSAGE_SCOPE.as_bytes())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A purchase's contribution to a jackpot.
    Contribution { jackpot: Id, customer: Id, amount_minor: i64, at: UnixMillis },
    /// A change of a customer's leaderboard score.
    Score { leaderboard: Id, customer: Id, delta: i64 },
    /// A reserved spin asking its wheel to draw; the draw is settled back
    /// to the customer.
    WheelDraw { wheel: Id, customer: Id, request_id: Id, at: UnixMillis },
}

/// What kind of message a [`Payload`] is, without its fields.
///
/// Its variants are [`Payload`]'s, in the same order: bincode writes an
/// enum's variant as its index, so this reads the kind of an encoded
/// message without decoding the rest ([`kind_of_record`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PayloadKind {
    Contribution,
    Score,
    WheelDraw,
}

impl PayloadKind {
    /// Whether the receiver's answer to it is needed again after it is
    /// applied: a contribution's (the purchase's retry answers with it) and
    /// a draw's (the spin is settled with it). A score's is not, so its
    /// idempotency record is kept only while the score may be delivered
    /// again (see [`crate::journal::Indexer`]).
    pub fn needs_receipt(self) -> bool {
        self != PayloadKind::Score
    }

    /// Whether the receiver applying it completes its effect. A draw's
    /// does not (the customer still has to settle it), so a draw always
    /// waits in the `outbox` tree until the spin is settled.
    pub fn complete_on_receipt(self) -> bool {
        self != PayloadKind::WheelDraw
    }
}

impl Payload {
    pub fn kind(&self) -> PayloadKind {
        match self {
            Payload::Contribution { .. } => PayloadKind::Contribution,
            Payload::Score { .. } => PayloadKind::Score,
            Payload::WheelDraw { .. } => PayloadKind::WheelDraw,
        }
    }
}

/// The kind of the message an `outbox` record holds (what
/// [`OutboxMessage::record`] made), read from its first fields: the
/// journal writer asks it of every message of every batch, and decoding
/// whole messages for it had been a third of its indexing.
pub fn kind_of_record(value: &[u8]) -> crate::storage::StorageResult<PayloadKind> {
    // The texts as bytes (bincode writes both the same way): skipped, not
    // checked for UTF-8 (a tenth of the writer's indexing of a message).
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        _tenant: &'a [u8],
        #[serde(borrow)]
        _id: &'a [u8],
        _created_at: UnixMillis,
        kind: PayloadKind,
    }
    crate::storage::decode::<Head<'_>>(value).map(|head| head.kind)
}

/// `parts` one after the other, in a string of their size: a message id
/// per event and receiver, where `format!` took five times the work.
/// What a score's id has between its event's id and its leaderboard's.
const SCORE_TAG: &str = ">leaderboard:";

fn joined(parts: &[&str]) -> String {
    let mut text = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        text.push_str(part);
    }
    text
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub tenant: String,
    /// Unique within the tenant, derived from what caused it (event id or
    /// spin request id) and its target, so a re-applied cause produces the
    /// same id and the receiver recognises it.
    pub id: String,
    /// When the message was first made (server time), for redelivery.
    pub created_at: UnixMillis,
    pub payload: Payload,
}

impl OutboxMessage {
    pub fn contribution(
        tenant: &str,
        event_id: &Id,
        jackpot: &Id,
        customer: &Id,
        amount_minor: i64,
        at: UnixMillis,
        now: UnixMillis,
    ) -> Self {
        Self {
            tenant: tenant.to_owned(),
            id: joined(&[event_id.as_str(), ">jackpot:", jackpot.as_str()]),
            created_at: now,
            payload: Payload::Contribution { jackpot: jackpot.clone(), customer: customer.clone(), amount_minor, at },
        }
    }

    pub fn score(tenant: &str, event_id: &Id, leaderboard: &Id, customer: &Id, delta: i64, now: UnixMillis) -> Self {
        Self {
            tenant: tenant.to_owned(),
            id: joined(&[event_id.as_str(), SCORE_TAG, leaderboard.as_str()]),
            created_at: now,
            payload: Payload::Score { leaderboard: leaderboard.clone(), customer: customer.clone(), delta },
        }
    }

    pub fn wheel_draw(tenant: &str, wheel: &Id, customer: &Id, request_id: &Id, at: UnixMillis) -> Self {
        Self {
            tenant: tenant.to_owned(),
            id: format!("spin:{request_id}"),
            created_at: at,
            payload: Payload::WheelDraw {
                wheel: wheel.clone(),
                customer: customer.clone(),
                request_id: request_id.clone(),
                at,
            },
        }
    }

    /// Whether the receiver's answer to it is needed again after it is
    /// applied (see [`PayloadKind::needs_receipt`]).
    pub fn needs_receipt(&self) -> bool {
        self.payload.kind().needs_receipt()
    }

    /// The start of the `outbox` keys of every score the event `event_id`
    /// of `tenant` sent (ids have no `>`, so no other event's keys start
    /// so).
    pub fn scores_prefix(tenant: &str, event_id: &Id) -> Vec<u8> {
        key(&[tenant, &joined(&[event_id.as_str(), SCORE_TAG])])
    }

    /// Its key in the `outbox` tree.
    pub fn storage_key(&self) -> Vec<u8> {
        key(&[&self.tenant, &self.id])
    }

    /// Its `outbox` tree record.
    pub fn record(&self) -> KeyValue {
        (self.storage_key(), encode(self))
    }

    /// The receiver's idempotency key for this message.
    pub fn dedupe(&self) -> crate::actor::Dedupe<'_> {
        crate::actor::Dedupe { scope: MESSAGE_SCOPE, id: &self.id, fingerprint: self.fingerprint() }
    }

    /// A fingerprint of the message, for the receiver's idempotency check.
    pub fn fingerprint(&self) -> u64 {
        crate::storage::hash_encoded(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_scores_and_no_other_messages_are_under_its_scores_prefix() {
        let id = |s: &str| Id::parse(s).expect("id");
        let prefix = OutboxMessage::scores_prefix("mall", &id("e-1"));
        let under = |message: OutboxMessage| message.storage_key().starts_with(&prefix);
        assert!(under(OutboxMessage::score("mall", &id("e-1"), &id("top"), &id("c-1"), 3, 8)));
        assert!(under(OutboxMessage::score("mall", &id("e-1"), &id("t"), &id("c-2"), -3, 8)));
        assert!(!under(OutboxMessage::score("mall", &id("e-10"), &id("top"), &id("c-1"), 3, 8)), "another event");
        assert!(!under(OutboxMessage::score("mall-2", &id("e-1"), &id("top"), &id("c-1"), 3, 8)), "another tenant");
        assert!(!under(OutboxMessage::contribution("mall", &id("e-1"), &id("pot"), &id("c-1"), 500, 7, 8)));
    }

    #[test]
    fn the_kind_of_a_record_is_read_without_decoding_it() {
        let id = |s: &str| Id::parse(s).expect("id");
        let messages = [
            OutboxMessage::contribution("mall", &id("e-1"), &id("pot"), &id("c-1"), 500, 7, 8),
            OutboxMessage::score("mall", &id("e-1"), &id("top"), &id("c-1"), -3, 8),
            OutboxMessage::wheel_draw("mall", &id("w"), &id("c-1"), &id("r-9"), 9),
        ];
        for message in &messages {
            let (_, value) = message.record();
            assert_eq!(kind_of_record(&value).expect("a record"), message.payload.kind(), "{message:?}");
        }
        assert!(kind_of_record(&[crate::storage::FORMAT_VERSION, 1]).is_err(), "cut short");
        // Ids as they always were: the cause, the receiver's kind and id.
        let [contribution, score, _] = &messages;
        assert_eq!((contribution.id.as_str(), score.id.as_str()), ("e-1>jackpot:pot", "e-1>leaderboard:top"));
    }
}
