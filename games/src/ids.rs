//! Validated identifiers.
//!
//! Every id in Bazaar (tenant, store, customer, event, game) is 1–128
//! characters from `[A-Za-z0-9._:-]`. The rule is enforced once, in
//! [`Id::parse`], so a value of type [`Id`] is always valid: storage keys can
//! be built from it with `/` as a separator without escaping.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_ID_LEN} characters, got {0}")]
    TooLong(usize),
    #[error("may contain only A-Z, a-z, 0-9 and . _ : - (found {0:?})")]
    BadCharacter(char),
}

/// A validated identifier.
///
/// Its text is kept inline up to 24 bytes (customers, stores, games,
/// most tenants), so cloning one, as every event's path does several
/// times (payloads, keys, answers), allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(CompactString);

/// Read from any string form, borrowed when the format can lend one
/// (bincode from a slice), and checked: an id read back is valid too.
impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id: 1-128 characters from [A-Za-z0-9._:-]")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Id, E> {
                Id::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// Serialized as its text, borrowed: `#[serde(into = "String")]` cloned
/// the string at every encode of a state, answer or journal entry.
impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl Id {
    /// Checks `text` against the id rule.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        Self::check(text)?;
        Ok(Self(CompactString::new(text)))
    }

    fn check(text: &str) -> Result<(), IdError> {
        // Every allowed character is one byte, so a valid id's length is
        // its byte count; the slow path below finds the error otherwise.
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if !text.is_empty() && text.len() <= MAX_ID_LEN && text.bytes().all(|b| allowed(char::from(b))) {
            return Ok(());
        }
        if text.is_empty() {
            return Err(IdError::Empty);
        }
        let length = text.chars().count();
        if MAX_ID_LEN < length {
            return Err(IdError::TooLong(length));
        }
        if let Some(bad) = text.chars().find(|c| !allowed(*c)) {
            return Err(IdError::BadCharacter(bad));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Id {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::check(&value)?;
        Ok(Self(CompactString::from(value)))
    }
}

impl From<Id> for String {
    fn from(id: Id) -> Self {
        id.0.into_string()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_ID_LEN))
            .pattern(Some("^[A-Za-z0-9._:-]+$"))
            .description(Some("An id: 1-128 characters from [A-Za-z0-9._:-]"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Id {}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<(), IdError>) {
        assert_eq!(Id::parse(input).map(|_| ()), expected, "input {input:?}");
    }

    #[test]
    fn ids_are_stored_as_their_text() {
        let id = Id::parse("till-7.000123:a_b").expect("an id");
        let stored = bincode::serialize(&id).expect("serialises");
        assert_eq!(stored, bincode::serialize("till-7.000123:a_b").expect("serialises"));
        assert_eq!(bincode::deserialize::<Id>(&stored).expect("reads back"), id);
        let bad = bincode::serialize("a/b").expect("serialises");
        assert!(bincode::deserialize::<Id>(&bad).is_err(), "the rule holds when reading too");
    }

    #[test]
    fn id_rules() {
        check("c-42", Ok(()));
        check("till-7.000123:a_b", Ok(()));
        check(&"x".repeat(128), Ok(()));
        check("", Err(IdError::Empty));
        check(&"x".repeat(129), Err(IdError::TooLong(129)));
        check("a b", Err(IdError::BadCharacter(' ')));
        check("a/b", Err(IdError::BadCharacter('/')));
        check("é", Err(IdError::BadCharacter('é')));
    }
}
