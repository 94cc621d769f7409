//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! `#[utoipa::path]` annotations and the request and answer types, never
//! written by hand. Served at `/v1/openapi.json`; `bazaar openapi` prints
//! it, and `docs/openapi.json` is a copy that CI checks against the live
//! one.

use crate::api;
use crate::http::{self, errors};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar",
        description = "Loyalty and gamification: points, tiers, wheels, progressive jackpots, missions and live \
            leaderboards, driven by what shoppers do. Money is integer minor units; every answer that changed \
            something is durable before it is sent; retries with the same event_id or request_id never count twice.",
        license(name = "Apache-2.0"),
    ),
    paths(
        http::create_tenant,
        http::get_tenant,
        http::create_key,
        http::put_store,
        http::put_campaign,
        http::put_wheel,
        http::put_jackpot,
        http::put_mission,
        http::put_leaderboard,
        http::record_event,
        http::record_batch,
        http::spin,
        http::get_jackpot,
        http::stream_jackpot,
        http::get_leaderboard,
        http::stream_leaderboard,
        http::get_around,
        http::get_audit,
        http::get_customer,
        http::healthz,
        http::readyz,
        http::metrics,
    ),
    components(schemas(errors::ErrorBody, errors::ErrorDetail, api::HitAnswer)),
    modifiers(&BearerKeys),
    tags(
        (name = "tenants", description = "Tenants and API keys"),
        (name = "definitions", description = "Stores, campaigns and games (operator)"),
        (name = "events", description = "What shoppers do (pos)"),
        (name = "games", description = "Spins, jackpots, leaderboards, audit"),
        (name = "streams", description = "Live Server-Sent Events"),
        (name = "customers", description = "Customer views"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

/// `Authorization: Bearer <key>`.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: bzk_<key id>_<secret>, or the bootstrap admin key"))
                    .build(),
            ),
        );
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON, as served and as checked in.
pub fn json() -> String {
    document().to_pretty_json().expect("the generated document serialises")
}
