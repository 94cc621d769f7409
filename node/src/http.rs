//! The HTTP/JSON transport of API.md, on axum.
//!
//! Handlers only translate: they pull the bearer key, path and body out of
//! the request, call one [`Service`] method and render its answer or error.
//! Every body is read before anything answers (see `read_body_first`).
//! The [`JsonBody`] extractor enforces the body rules every endpoint shares
//! (declared JSON, size limit, no unknown fields) and turns serde's errors
//! into the API's error shape with the offending field's path.

use crate::api;
use crate::api::DefinitionAnswer;
use crate::error::{Code, ServiceError};
use crate::service::{JackpotEvent, Service};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

/// The router of the whole public HTTP API.
pub fn router(state: AppState) -> Router {
    let tenant = "/v1/tenants/{tenant}";
    Router::new()
        .route("/v1/tenants", post(create_tenant))
        .route(tenant, get(get_tenant))
        .route(&format!("{tenant}/keys"), post(create_key))
        .route(&format!("{tenant}/stores/{{id}}"), put(put_store))
        .route(&format!("{tenant}/campaigns/{{id}}"), put(put_campaign))
        .route(&format!("{tenant}/wheels/{{id}}"), put(put_wheel))
        .route(&format!("{tenant}/jackpots/{{id}}"), put(put_jackpot).get(get_jackpot))
        .route(&format!("{tenant}/missions/{{id}}"), put(put_mission))
        .route(&format!("{tenant}/leaderboards/{{id}}"), put(put_leaderboard).get(get_leaderboard))
        .route(&format!("{tenant}/leaderboards/{{id}}/customers/{{customer}}"), get(get_around))
        .route(&format!("{tenant}/jackpots/{{id}}/stream"), get(stream_jackpot))
        .route(&format!("{tenant}/leaderboards/{{id}}/stream"), get(stream_leaderboard))
        .route(&format!("{tenant}/events"), post(record_event))
        .route(&format!("{tenant}/events/batch"), post(record_batch))
        .route(&format!("{tenant}/wheels/{{id}}/spins"), post(spin))
        .route(&format!("{tenant}/customers/{{id}}"), get(get_customer))
        .route(&format!("{tenant}/audit/{{kind}}/{{id}}"), get(get_audit))
        .route("/display/{tenant}", get(display_page))
        .route("/display/assets/{file}", get(display_asset))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), read_body_first))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Every line logged while serving a request carries its id.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Records every request's latency by route, method and status code, and
/// logs it (at debug level: method, path, status, latency and the request
/// id that the answer echoes; never headers, so never a key).
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    state
        .service
        .metrics
        .http_request_duration
        .with_label_values(&[&route, method.as_str(), response.status().as_str()])
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, path, status = response.status().as_u16(), elapsed_us = elapsed.as_micros() as u64,
        request_id, "request");
    response
}

// ------------------------------------------------------------- plumbing

/// The error responses every endpoint documents, and the batch answer's
/// shape, for the OpenAPI document.
pub(crate) mod errors {
    use serde::Serialize;

    /// `{"error": {...}}`.
    #[derive(Serialize, utoipa::ToSchema)]
    pub struct ErrorBody {
        pub error: ErrorDetail,
    }

    #[derive(Serialize, utoipa::ToSchema)]
    pub struct ErrorDetail {
        /// invalid_argument, malformed_json, unsupported_media_type, payload_too_large, unauthenticated,
        /// permission_denied, not_found, already_exists, idempotency_conflict, failed_precondition,
        /// unavailable, internal.
        pub code: String,
        /// The offending field's path, when one field is at fault.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub field: Option<String>,
        pub message: String,
        /// For 409s: no_entitlement, not_enough_points, daily_limit, out_of_stock.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }

    impl From<&crate::error::ServiceError> for ErrorBody {
        fn from(error: &crate::error::ServiceError) -> Self {
            Self {
                error: ErrorDetail {
                    code: error.code.as_str().to_owned(),
                    field: error.field.clone(),
                    message: error.message.clone(),
                    reason: error.reason.map(str::to_owned),
                },
            }
        }
    }

    /// One result of a batch: an event's answer, or `{"error": {...}}`.
    #[derive(Serialize, utoipa::ToSchema)]
    #[serde(untagged)]
    pub enum BatchResult {
        Answer(crate::api::EventAnswer),
        Error(ErrorBody),
    }

    #[derive(Serialize, utoipa::ToSchema)]
    pub struct BatchAnswer {
        pub results: Vec<BatchResult>,
    }

    /// What any endpoint may answer besides success.
    #[derive(utoipa::IntoResponses)]
    #[allow(dead_code)]
    pub enum Errors {
        /// A field broke a rule, the body is not JSON, not declared as JSON, or too large.
        #[response(status = 400)]
        BadRequest(ErrorBody),
        /// No key or an unknown key.
        #[response(status = 401)]
        Unauthenticated(ErrorBody),
        /// The key may not do this, or not in this tenant.
        #[response(status = 403)]
        PermissionDenied(ErrorBody),
        /// The tenant, game, customer or store does not exist.
        #[response(status = 404)]
        NotFound(ErrorBody),
        /// The method is not allowed on this path.
        #[response(status = 405)]
        MethodNotAllowed(ErrorBody),
        /// Already exists, an idempotency conflict, or a game's refusal.
        #[response(status = 409)]
        Conflict(ErrorBody),
        /// A bug; logged with the request id.
        #[response(status = 500)]
        Internal(ErrorBody),
        /// Storage failed or the node is stopping: retry.
        #[response(status = 503)]
        Unavailable(ErrorBody),
    }
}

/// An error as the HTTP API renders it.
pub struct HttpError(pub ServiceError);

impl From<ServiceError> for HttpError {
    fn from(error: ServiceError) -> Self {
        Self(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if error.code == Code::Internal {
            tracing::error!(message = %error.message, "internal error");
        }
        let body = errors::ErrorBody::from(&error);
        let mut response = (status, Json(body)).into_response();
        if error.code == Code::Unavailable {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if error.code == Code::Unauthenticated {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type HttpResult<T> = Result<T, HttpError>;

/// The bearer key of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// A JSON body: declared as JSON, within the size limit, every field known.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let is_json =
            content_type.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ServiceError {
                code: Code::UnsupportedMediaType,
                field: Some("content-type".into()),
                message: "must be application/json".into(),
                reason: None,
            }
            .into());
        }
        let body = read_body(request, state.max_body_bytes).await?;
        from_json_bytes(&body).map(JsonBody).map_err(HttpError)
    }
}

/// A body past the limit is still read, up to this much more, before the
/// answer; a longer one is left unread and the connection closed.
const DRAIN_BYTES: usize = 1 << 20;

/// Reads every request's body before any handler, extractor or key check
/// sees the request, and hands it on in memory (cut one byte past the
/// limit, which [`read_body`] answers with `payload_too_large`).
///
/// An answer given from the head alone (a wrong media type, a missing key)
/// would otherwise leave the body unread: hyper then closes the connection
/// under a client that may be about to reuse it, and a socket closed with
/// unread bytes is reset, which can destroy the answer explaining why.
/// Past `DRAIN_BYTES` over the limit the rest is not worth reading: the
/// answer says `Connection: close`.
async fn read_body_first(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let keep = state.max_body_bytes.saturating_add(1);
    // Room for the declared length (within the limit) at once.
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(keep);
    let mut kept = Vec::with_capacity(declared.min(keep));
    let mut chunks = body.into_data_stream();
    let mut read = 0usize;
    let mut unread = false;
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                return HttpError(ServiceError::invalid("body", format!("could not be read: {e}"))).into_response()
            }
        };
        read = read.saturating_add(chunk.len());
        if kept.len() < keep {
            let room = keep - kept.len();
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if state.max_body_bytes.saturating_add(DRAIN_BYTES) < read {
            unread = true;
            break;
        }
    }
    let mut response = next.run(Request::from_parts(parts, Body::from(kept))).await;
    if unread {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The request's body, or `payload_too_large` past `max` bytes.
async fn read_body(request: Request, max: usize) -> Result<Bytes, ServiceError> {
    let mut chunks = request.into_body().into_data_stream();
    let mut body = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ServiceError::invalid("body", format!("could not be read: {e}")))?;
        if max < body.len().saturating_add(chunk.len()) {
            return Err(ServiceError {
                code: Code::PayloadTooLarge,
                field: Some("body".into()),
                message: format!("must be at most {max} bytes"),
                reason: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// Parses JSON, naming the field of any error.
pub fn from_json_bytes<T: DeserializeOwned>(body: &Bytes) -> Result<T, ServiceError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(deserializer).map_err(json_error)?;
    Ok(value)
}

/// Reads a JSON value as `T`, naming the field of any error.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ServiceError> {
    serde_path_to_error::deserialize(value).map_err(json_error)
}

fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> ServiceError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ServiceError {
            code: Code::MalformedJson,
            field: Some("body".into()),
            message: format!("is not valid JSON: {inner}"),
            reason: None,
        };
    }
    let message = inner.to_string();
    let message = message.rfind(" at line ").map_or(message.as_str(), |at| &message[..at]).to_owned();
    // The path names the unknown field itself, but only the object that
    // misses a field: name the missing field too.
    let mut field = if path == "." { String::new() } else { path };
    if let Some(missing) = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
        field = if field.is_empty() { missing.to_owned() } else { format!("{field}.{missing}") };
    }
    ServiceError::invalid(if field.is_empty() { "body".to_owned() } else { field }, message)
}

/// Reads an optional non-negative integer query parameter.
fn query_u32(raw: &Option<String>, name: &str) -> Result<Option<u32>, ServiceError> {
    let Some(raw) = raw else { return Ok(None) };
    for pair in raw.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return value
                .parse::<u32>()
                .map(Some)
                .map_err(|_| ServiceError::invalid(name, "must be a non-negative integer"));
        }
    }
    Ok(None)
}

// ------------------------------------------------------------- handlers

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = api::CreateTenant,
    responses((status = 201, description = "The tenant", body = api::TenantAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn create_tenant(
    State(s): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<api::CreateTenant>,
) -> HttpResult<Response> {
    let tenant = s.service.create_tenant(bearer(&headers), body).await?;
    Ok((StatusCode::CREATED, Json(tenant)).into_response())
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}", tag = "tenants", params(("tenant" = String, Path, description = "The tenant id")),
    responses((status = 200, description = "The tenant", body = api::TenantAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_tenant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> HttpResult<Json<api::TenantAnswer>> {
    Ok(Json(s.service.get_tenant(bearer(&headers), &tenant)?))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/keys", tag = "tenants", params(("tenant" = String, Path, description = "The tenant id")), request_body = api::CreateKey,
    responses((status = 201, description = "The key, shown only here", body = api::KeyAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn create_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<api::CreateKey>,
) -> HttpResult<Response> {
    let key = s.service.create_key(bearer(&headers), &tenant, body).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

macro_rules! put_definition {
    ($name:ident, $method:ident, $body:ty, $path:literal, $what:literal) => {
        #[utoipa::path(put, path = $path, tag = "definitions",
            params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = $what)),
            request_body = $body,
            responses((status = 200, description = "The definition with its version", body = DefinitionAnswer<$body>), errors::Errors),
            security(("bearer" = [])))]
        pub(crate) async fn $name(
            State(s): State<AppState>,
            headers: HeaderMap,
            Path((tenant, id)): Path<(String, String)>,
            JsonBody(body): JsonBody<$body>,
        ) -> HttpResult<Json<api::DefinitionAnswer<$body>>> {
            Ok(Json(s.service.$method(bearer(&headers), &tenant, &id, body).await?))
        }
    };
}

put_definition!(
    put_store,
    put_store,
    bazaar_games::catalog::StoreDef,
    "/v1/tenants/{tenant}/stores/{id}",
    "The store id"
);
put_definition!(
    put_campaign,
    put_campaign,
    api::CampaignBody,
    "/v1/tenants/{tenant}/campaigns/{id}",
    "The campaign id"
);
put_definition!(
    put_wheel,
    put_wheel,
    bazaar_games::wheel::WheelDef,
    "/v1/tenants/{tenant}/wheels/{id}",
    "The wheel id"
);
put_definition!(
    put_jackpot,
    put_jackpot,
    bazaar_games::jackpot::JackpotDef,
    "/v1/tenants/{tenant}/jackpots/{id}",
    "The jackpot id"
);
put_definition!(put_mission, put_mission, api::MissionBody, "/v1/tenants/{tenant}/missions/{id}", "The mission id");
put_definition!(
    put_leaderboard,
    put_leaderboard,
    bazaar_games::leaderboard::LeaderboardDef,
    "/v1/tenants/{tenant}/leaderboards/{id}",
    "The leaderboard id"
);

#[utoipa::path(post, path = "/v1/tenants/{tenant}/events", tag = "events", params(("tenant" = String, Path, description = "The tenant id")), request_body = api::EventRequest,
    responses((status = 200, description = "What the event earned, once durable", body = api::EventAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn record_event(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<api::EventRequest>,
) -> HttpResult<Json<api::EventAnswer>> {
    Ok(Json(s.service.record_event(bearer(&headers), &tenant, body).await?))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/events/batch", tag = "events", params(("tenant" = String, Path, description = "The tenant id")), request_body = api::BatchRequest,
    responses((status = 200, description = "One result per event, in order", body = errors::BatchAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn record_batch(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<api::BatchRequest>,
) -> HttpResult<Json<errors::BatchAnswer>> {
    let results = s.service.record_batch(bearer(&headers), &tenant, body).await?;
    let results = results
        .into_iter()
        .map(|result| match result {
            Ok(answer) => errors::BatchResult::Answer(answer),
            Err(error) => errors::BatchResult::Error(errors::ErrorBody::from(&error)),
        })
        .collect();
    Ok(Json(errors::BatchAnswer { results }))
}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/wheels/{id}/spins", tag = "games", params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The wheel id")),
    request_body = api::SpinRequest,
    responses((status = 200, description = "The prize", body = api::SpinAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn spin(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, wheel)): Path<(String, String)>,
    JsonBody(body): JsonBody<api::SpinRequest>,
) -> HttpResult<Json<api::SpinAnswer>> {
    Ok(Json(s.service.spin(bearer(&headers), &tenant, &wheel, body).await?))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/customers/{id}", tag = "customers", params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The customer id")),
    responses((status = 200, description = "The customer", body = api::CustomerAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_customer(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
) -> HttpResult<Json<api::CustomerAnswer>> {
    Ok(Json(s.service.customer(bearer(&headers), &tenant, &id).await?))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/jackpots/{id}", tag = "games", params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The jackpot id")),
    responses((status = 200, description = "The jackpot and its books", body = api::JackpotAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_jackpot(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
) -> HttpResult<Json<api::JackpotAnswer>> {
    Ok(Json(s.service.jackpot(bearer(&headers), &tenant, &id).await?))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/leaderboards/{id}", tag = "games", params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The leaderboard id"),
        ("top" = Option<u32>, Query, description = "Entries, 1-1000 (default: the board's top_size)")),
    responses((status = 200, description = "The top entries", body = api::LeaderboardAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_leaderboard(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> HttpResult<Json<api::LeaderboardAnswer>> {
    let top = query_u32(&query, "top")?;
    Ok(Json(s.service.leaderboard(bearer(&headers), &tenant, &id, top).await?))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/leaderboards/{id}/customers/{customer}", tag = "games",
    params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The leaderboard id"), ("customer" = String, Path, description = "The customer id"),
        ("around" = Option<u32>, Query, description = "Entries above and below, 0-100 (default 2)")),
    responses((status = 200, description = "The customer's rank and neighbours", body = api::AroundAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_around(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id, customer)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> HttpResult<Json<api::AroundAnswer>> {
    let around = query_u32(&query, "around")?;
    Ok(Json(s.service.leaderboard_around(bearer(&headers), &tenant, &id, &customer, around).await?))
}

#[utoipa::path(get, path = "/v1/tenants/{tenant}/audit/{kind}/{id}", tag = "games",
    params(("tenant" = String, Path, description = "The tenant id"), ("kind" = String, Path, description = "wheels or jackpots"), ("id" = String, Path, description = "The wheel or jackpot id"),
        ("after" = Option<u32>, Query, description = "Records after this draw number or cycle"),
        ("limit" = Option<u32>, Query, description = "At most this many, 1-1000 (default 100)")),
    responses((status = 200, description = "Draws or hits with what re-checks them", body = api::AuditAnswer), errors::Errors), security(("bearer" = [])))]
pub(crate) async fn get_audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, kind, id)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> HttpResult<Json<api::AuditAnswer>> {
    let after = query_u32(&query, "after")?;
    let limit = query_u32(&query, "limit")?;
    Ok(Json(s.service.audit(bearer(&headers), &tenant, &kind, &id, after, limit).await?))
}

/// Server-Sent Events of a jackpot: `pool` (coalesced to ten a second) and
/// `hit`, each with an id a reconnecting client sends back as
/// `Last-Event-ID` to get the current state and the hits it missed.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/jackpots/{id}/stream", tag = "streams",
    params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The jackpot id"), ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses((status = 200, description = "Server-Sent Events: `pool` {pool_minor, cycle} and `hit` (a HitAnswer)", content_type = "text/event-stream", body = String), errors::Errors),
    security(("bearer" = [])))]
pub(crate) async fn stream_jackpot(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
) -> HttpResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let events = s.service.watch_jackpot(bearer(&headers), &tenant, &id, last_event_id).await?;
    let stream = ReceiverStream::new(events).map(|event| {
        let id = event.id();
        let sse = match event {
            JackpotEvent::Pool { pool_minor, cycle, .. } => {
                Event::default().event("pool").json_data(serde_json::json!({"pool_minor": pool_minor, "cycle": cycle}))
            }
            JackpotEvent::Hit(hit) => Event::default().event("hit").json_data(hit),
        };
        Ok(sse.map_or_else(|_| Event::default().comment("unencodable event"), |e| e.id(id)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Server-Sent Events of a leaderboard's top entries: `top` now and on
/// every change.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/leaderboards/{id}/stream", tag = "streams",
    params(("tenant" = String, Path, description = "The tenant id"), ("id" = String, Path, description = "The leaderboard id"), ("top" = Option<u32>, Query, description = "Entries, 1-1000")),
    responses((status = 200, description = "Server-Sent Events: `top` (a LeaderboardAnswer) now and on every change", content_type = "text/event-stream", body = String), errors::Errors),
    security(("bearer" = [])))]
pub(crate) async fn stream_leaderboard(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((tenant, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> HttpResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let top = query_u32(&query, "top")?;
    let updates = s.service.watch_leaderboard(bearer(&headers), &tenant, &id, top).await?;
    let mut sequence = 0u64;
    let stream = ReceiverStream::new(updates).map(move |board| {
        sequence += 1;
        Ok(Event::default()
            .event("top")
            .json_data(board)
            .map_or_else(|_| Event::default().comment("unencodable event"), |e| e.id(sequence.to_string())))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The OpenAPI 3.1 document of this API, generated from the handlers.
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(crate::openapi::json);
    ([(header::CONTENT_TYPE, "application/json")], document.clone()).into_response()
}

/// The live display page and its assets, embedded in the binary.
const DISPLAY_HTML: &str = include_str!("../assets/display.html");
const DISPLAY_JS: &str = include_str!("../assets/display.js");
const DISPLAY_CSS: &str = include_str!("../assets/display.css");

/// The headers of the display: nothing but this origin may be loaded or
/// contacted, and no referrer leaves the page.
fn display_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-cache"),
    ]
}

/// `/display/{tenant}?jackpot=J&leaderboard=L#key=K`: the in-store screen.
/// The page needs no key to load; it reads the display key from the URL
/// fragment and sends it as a header to the API.
async fn display_page(Path(_tenant): Path<String>) -> Response {
    (display_headers("text/html; charset=utf-8"), DISPLAY_HTML).into_response()
}

async fn display_asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "display.js" => (display_headers("text/javascript; charset=utf-8"), DISPLAY_JS).into_response(),
        "display.css" => (display_headers("text/css; charset=utf-8"), DISPLAY_CSS).into_response(),
        _ => HttpError(ServiceError::new(Code::NotFound, "no such asset")).into_response(),
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up", content_type = "text/plain", body = String)))]
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Recovered and storage works", content_type = "text/plain", body = String),
    (status = 503, description = "Starting, storage failed, or shutting down", content_type = "text/plain", body = String)))]
pub(crate) async fn readyz(State(s): State<AppState>) -> Response {
    if s.service.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format (docs/metrics.md)", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    let seen = s.service.store.seen.stats();
    let metrics = &s.service.metrics;
    metrics.seen_runs.set(i64::try_from(seen.runs).unwrap_or(i64::MAX));
    metrics.scores_in_flight.set(i64::try_from(s.service.leaderboards.told_pending()).unwrap_or(i64::MAX));
    metrics.seen_records.with_label_values(&["runs"]).set(i64::try_from(seen.run_records).unwrap_or(i64::MAX));
    metrics.seen_records.with_label_values(&["memory"]).set(i64::try_from(seen.memory_records).unwrap_or(i64::MAX));
    metrics.seen_records.with_label_values(&["pending"]).set(i64::try_from(seen.pending_records).unwrap_or(i64::MAX));
    metrics.seen_summarized_runs.set(i64::try_from(seen.summarized_runs).unwrap_or(i64::MAX));
    {
        // The index counts; the counter follows, one scrape at a time.
        static FOLLOW: parking_lot::Mutex<()> = parking_lot::const_mutex(());
        let _one = FOLLOW.lock();
        let probes = &metrics.seen_run_probes;
        probes.inc_by(seen.run_probes.saturating_sub(probes.get()));
        let written = &metrics.seen_run_bytes;
        written.inc_by(seen.written_bytes.saturating_sub(written.get()));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.service.metrics.render()).into_response()
}

async fn not_found() -> HttpError {
    ServiceError::new(Code::NotFound, "no such endpoint; see docs/api.md").into()
}

async fn method_not_allowed() -> Response {
    let error =
        ServiceError::new(Code::InvalidArgument, "this method is not allowed on this endpoint; see docs/api.md");
    let mut response = HttpError(error).into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}
