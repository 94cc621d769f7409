//! A tenant's definitions, together: stores, campaigns and the games that
//! hang off them. The node keeps one immutable `Catalog` per tenant and
//! swaps in a new one when an operator changes a definition, so an event is
//! always judged against one consistent set of rules.

use crate::campaign::Campaign;
use crate::event::Event;
use crate::ids::Id;
use crate::jackpot::JackpotDef;
use crate::leaderboard::LeaderboardDef;
use crate::mission::MissionDef;
use crate::wheel::WheelDef;
use crate::DefinitionError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A shop in a tenant (a mall's tenant has many).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoreDef {
    pub name: String,
    pub category: Id,
}

impl StoreDef {
    pub fn validate(&self) -> Result<(), DefinitionError> {
        crate::campaign::check_name("name", &self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub stores: BTreeMap<Id, StoreDef>,
    pub campaigns: BTreeMap<Id, Campaign>,
    pub wheels: BTreeMap<Id, WheelDef>,
    pub jackpots: BTreeMap<Id, JackpotDef>,
    pub missions: BTreeMap<Id, MissionDef>,
    pub leaderboards: BTreeMap<Id, LeaderboardDef>,
}

impl Catalog {
    /// The campaigns an event falls under (window and store list).
    pub fn campaigns_for(&self, event: &Event) -> Vec<&Id> {
        self.campaigns
            .iter()
            .filter(|(_, campaign)| campaign.applies(event.store.as_ref(), event.at))
            .map(|(id, _)| id)
            .collect()
    }

    /// The category of a store, if the store is known.
    pub fn category_of(&self, store: Option<&Id>) -> Option<&Id> {
        store.and_then(|s| self.stores.get(s)).map(|s| &s.category)
    }
}
