//! The one error type of definition validation: it names the offending field
//! (as a dotted path the API returns verbatim) and the rule it broke.

use std::fmt;

/// A definition (campaign, wheel, jackpot, mission, leaderboard) broke a rule.
///
/// `field` is a path into the JSON body, such as `segments[2].weight`, so an
/// API can point the integrator at the exact place to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub field: String,
    pub message: String,
}

impl DefinitionError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for DefinitionError {}
