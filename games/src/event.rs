//! What shoppers do: the events a till, web shop or app reports.

use crate::ids::Id;
use crate::UnixMillis;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The kinds of event Bazaar understands.
///
/// `Custom` carries the operator's own name (`custom:app_review`), so
/// campaigns can award bonuses for anything a retailer can report.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum EventKind {
    Purchase,
    Visit,
    ProfileCompleted,
    Referral,
    Custom(String),
}

/// Why a string is not an event kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be one of purchase, visit, profile_completed, referral or custom:<name> with a name of 1-64 characters from [a-z0-9_-]")]
pub struct UnknownKind;

impl EventKind {
    pub fn parse(text: &str) -> Result<Self, UnknownKind> {
        match text {
            "purchase" => Ok(Self::Purchase),
            "visit" => Ok(Self::Visit),
            "profile_completed" => Ok(Self::ProfileCompleted),
            "referral" => Ok(Self::Referral),
            other => {
                let name = other.strip_prefix("custom:").ok_or(UnknownKind)?;
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
                if valid {
                    Ok(Self::Custom(name.to_owned()))
                } else {
                    Err(UnknownKind)
                }
            }
        }
    }

    pub fn is_purchase(&self) -> bool {
        matches!(self, Self::Purchase)
    }

    /// The name of a built-in kind as it is written (none for a custom
    /// kind, written `custom:<name>`).
    pub fn builtin_name(&self) -> Option<&'static str> {
        match self {
            Self::Purchase => Some("purchase"),
            Self::Visit => Some("visit"),
            Self::ProfileCompleted => Some("profile_completed"),
            Self::Referral => Some("referral"),
            Self::Custom(_) => None,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.builtin_name(), self) {
            (Some(name), _) => f.write_str(name),
            (None, Self::Custom(name)) => write!(f, "custom:{name}"),
            (None, _) => unreachable!("only custom kinds have no built-in name"),
        }
    }
}

/// Serialized as its name, as it is written (a built-in kind without
/// making a string: `#[serde(into = "String")]` formatted one at every
/// event's fingerprint).
impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.builtin_name() {
            Some(name) => serializer.serialize_str(name),
            None => serializer.collect_str(self),
        }
    }
}

impl TryFrom<String> for EventKind {
    type Error = UnknownKind;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for EventKind {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^(purchase|visit|profile_completed|referral|custom:[a-z0-9_-]{1,64})$"))
            .description(Some("purchase, visit, profile_completed, referral or custom:<name>"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for EventKind {}

/// One validated event about one customer.
///
/// The transport layer builds it only after checking every field, so the
/// domain can rely on: ids valid, `0 <= amount_minor <= MAX_AMOUNT_MINOR`,
/// a store for purchases and visits, `at` within the accepted window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Id,
    pub customer: Id,
    pub store: Option<Id>,
    pub kind: EventKind,
    pub amount_minor: i64,
    pub at: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<EventKind, UnknownKind>) {
        assert_eq!(EventKind::parse(input), expected, "input {input:?}");
    }

    #[test]
    fn kinds_parse_and_print_back() {
        check("purchase", Ok(EventKind::Purchase));
        check("visit", Ok(EventKind::Visit));
        check("profile_completed", Ok(EventKind::ProfileCompleted));
        check("referral", Ok(EventKind::Referral));
        check("custom:app_review", Ok(EventKind::Custom("app_review".into())));
        check("custom:", Err(UnknownKind));
        check("custom:Bad Name", Err(UnknownKind));
        check("refund", Err(UnknownKind));
        check("Purchase", Err(UnknownKind));
        for text in ["purchase", "visit", "profile_completed", "referral", "custom:x-1"] {
            assert_eq!(EventKind::parse(text).map(|k| k.to_string()), Ok(text.to_owned()));
        }
    }

    #[test]
    fn kinds_are_stored_as_their_names() {
        // Fingerprints and stored answers hash and keep these bytes.
        for text in ["purchase", "visit", "profile_completed", "referral", "custom:x-1"] {
            let kind = EventKind::parse(text).expect("a kind");
            let stored = bincode::serialize(&kind).expect("serialises");
            assert_eq!(stored, bincode::serialize(text).expect("serialises"), "{text}");
            assert_eq!(bincode::deserialize::<EventKind>(&stored).expect("reads back"), kind);
        }
    }
}
