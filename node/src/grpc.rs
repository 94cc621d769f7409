//! The gRPC transport: `bazaar.v1` on tonic, with server reflection and the
//! standard health service.
//!
//! Like [`crate::http`], this module only translates. Requests that carry a
//! definition are turned into the very JSON shape the HTTP API accepts and
//! parsed by the same code, so both transports validate identically and
//! name the same fields; answers are built from the service layer's
//! answers. [`crate::error::Code::grpc_code`] maps every error, and invalid
//! arguments carry a `google.rpc.BadRequest` field violation.

use crate::api;
use crate::error::ServiceError;
use crate::http::from_json_value;
use crate::service::{JackpotEvent, Service};
use bazaar_proto::v1 as pb;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Every gRPC service of the public API, over one service layer.
#[derive(Clone)]
pub struct Grpc {
    pub service: Arc<Service>,
}

type GrpcResult<T> = Result<Response<T>, Status>;

/// Events a stream may have in flight before it stops reading more.
const STREAM_WINDOW: usize = 1024;

/// At most this many events of a stream are recorded together.
const STREAM_CHUNK: usize = 128;

/// Records a chunk of a stream's events, each tenant's run together;
/// answers in the chunk's order.
async fn record_chunk(
    service: &Service,
    key: Option<&str>,
    chunk: Vec<pb::RecordEventRequest>,
) -> Vec<Result<api::EventAnswer, ServiceError>> {
    let mut results = Vec::with_capacity(chunk.len());
    let mut chunk = chunk.into_iter().peekable();
    while let Some(first) = chunk.next() {
        let tenant = first.tenant.clone();
        let mut run = vec![event_request(first)];
        while let Some(next) = chunk.next_if(|next| next.tenant == tenant) {
            run.push(event_request(next));
        }
        results.extend(service.record_events(key, &tenant, run).await);
    }
    results
}

/// The bearer key of a call, from its `authorization` metadata.
fn key<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|k| k.trim().to_owned())
}

/// A service error as a gRPC status with machine-readable details.
pub fn status(error: ServiceError) -> Status {
    let mut details = ErrorDetails::new();
    if error.code.grpc_code() == tonic::Code::InvalidArgument {
        details
            .add_bad_request_violation(error.field.clone().unwrap_or_else(|| "request".into()), error.message.clone());
    }
    let reason = error.reason.unwrap_or(error.code.as_str());
    details.set_error_info(reason, "bazaar", std::collections::HashMap::new());
    let message = match &error.field {
        Some(field) => format!("{field}: {}", error.message),
        None => error.message.clone(),
    };
    Status::with_error_details(error.code.grpc_code(), message, details)
}

fn reply<T>(result: Result<T, ServiceError>) -> GrpcResult<T> {
    result.map(Response::new).map_err(status)
}

// -------------------------------------------------------- conversions in

fn event_request(event: pb::RecordEventRequest) -> api::EventRequest {
    api::EventRequest {
        event_id: event.event_id,
        customer: event.customer,
        store: event.store,
        kind: event.kind,
        amount_minor: event.amount_minor,
        at: event.at,
    }
}

fn prize_json(prize: Option<pb::Prize>) -> Value {
    match prize.and_then(|p| p.kind) {
        Some(pb::prize::Kind::Points(n)) => json!({"points": n}),
        Some(pb::prize::Kind::Spins(n)) => json!({"spins": n}),
        Some(pb::prize::Kind::Coupon(prefix)) => json!({"coupon": prefix}),
        Some(pb::prize::Kind::CashbackMinor(n)) => json!({"cashback_minor": n}),
        Some(pb::prize::Kind::Item(name)) => json!({"item": name}),
        Some(pb::prize::Kind::Nothing(_)) => json!("nothing"),
        None => Value::Null,
    }
}

fn reward_json(reward: Option<pb::Reward>) -> Value {
    match reward {
        None => Value::Null,
        Some(reward) => json!({
            "points": reward.points,
            "spins": reward.spins.map(|s| json!({"wheel": s.wheel, "count": s.count})),
            "coupon": reward.coupon,
        }),
    }
}

fn wheel_json(wheel: &pb::PutWheelRequest) -> Value {
    let mut body = json!({
        "campaign": wheel.campaign,
        "daily_limit": wheel.daily_limit,
        "segments": wheel.segments.iter().map(|s| json!({
            "label": s.label, "weight": s.weight, "prize": prize_json(s.prize.clone()), "stock": s.stock,
        })).collect::<Vec<_>>(),
        "earn": wheel.earn.as_ref().map(|e| json!({"min_purchase_minor": e.min_purchase_minor, "spins": e.spins})),
    });
    match wheel.cost {
        Some(pb::put_wheel_request::Cost::CostEntitlements(n)) => body["cost"] = json!({"entitlements": n}),
        Some(pb::put_wheel_request::Cost::CostPoints(n)) => body["cost"] = json!({"points": n}),
        None => {}
    }
    body
}

fn campaign_json(campaign: &pb::PutCampaignRequest) -> Value {
    let mut body = json!({
        "name": campaign.name,
        "starts_at": campaign.starts_at,
        "ends_at": campaign.ends_at,
        "stores": campaign.stores.as_ref().map(|s| s.ids.clone()),
        "tiers": campaign.tiers.iter().map(|t| json!({"name": t.name, "min_points": t.min_points})).collect::<Vec<_>>(),
    });
    if let Some(earning) = &campaign.earning {
        body["earning"] = json!({
            "points_per_unit_minor": earning.points_per_unit_minor,
            "tier_multipliers_pct": earning.tier_multipliers_pct,
            "store_multipliers_pct": earning.store_multipliers_pct,
            "event_bonus": earning.event_bonus,
        });
    }
    body
}

fn mission_json(mission: &pb::PutMissionRequest) -> Value {
    json!({
        "campaign": mission.campaign,
        "name": mission.name,
        "repeatable": mission.repeatable,
        "steps": mission.steps.iter().map(|s| json!({
            "kind": s.kind, "min_amount_minor": s.min_amount_minor, "store": s.store, "category": s.category,
            "count": s.count.max(1), "distinct_stores": s.distinct_stores, "reward": reward_json(s.reward.clone()),
        })).collect::<Vec<_>>(),
        "reward": reward_json(mission.reward.clone()),
        "starts_at": mission.starts_at,
        "ends_at": mission.ends_at,
    })
}

fn metric_json(metric: i32) -> Value {
    match pb::Metric::try_from(metric) {
        Ok(pb::Metric::Points) => json!("points"),
        Ok(pb::Metric::Spend) => json!("spend"),
        Ok(pb::Metric::Purchases) => json!("purchases"),
        Ok(pb::Metric::Missions) => json!("missions"),
        _ => json!("unspecified"),
    }
}

// ------------------------------------------------------- conversions out

/// An event's answer as gRPC sends it; its ids move into the message
/// (`to_string` copied each through the formatter).
fn event_result(answer: api::EventAnswer) -> pb::EventResult {
    pb::EventResult {
        event_id: answer.event_id.into(),
        duplicate: answer.duplicate,
        points_earned: answer.points_earned,
        points_balance: answer.points_balance,
        tier: answer.tier.unwrap_or_default(),
        spins_granted: answer.spins_granted.into_iter().map(|(w, n)| (w.into(), n)).collect(),
        missions: answer.missions.into_iter().map(mission_progress).collect(),
        coupons: answer.coupons,
        jackpots: answer
            .jackpots
            .into_iter()
            .map(|j| pb::JackpotContribution {
                jackpot: j.jackpot.into(),
                contributed_minor: j.contributed_minor,
                won_minor: j.won_minor,
            })
            .collect(),
    }
}

fn mission_progress(status: bazaar_games::customer::MissionStatus) -> pb::MissionProgress {
    pb::MissionProgress {
        mission: status.mission.into(),
        step: u32::try_from(status.step).unwrap_or(u32::MAX),
        completed: status.completed,
    }
}

fn outcome(result: Result<api::EventAnswer, ServiceError>) -> pb::EventOutcome {
    pb::EventOutcome {
        outcome: Some(match result {
            Ok(answer) => pb::event_outcome::Outcome::Result(event_result(answer)),
            Err(error) => pb::event_outcome::Outcome::Error(pb::Error {
                code: error.code.as_str().to_owned(),
                field: error.field.unwrap_or_default(),
                message: error.message,
                reason: error.reason.unwrap_or_default().to_owned(),
            }),
        }),
    }
}

fn won_prize(prize: bazaar_games::wheel::WonPrize) -> pb::WonPrize {
    use bazaar_games::wheel::WonPrize;
    use pb::won_prize::Kind;
    pb::WonPrize {
        kind: Some(match prize {
            WonPrize::Points(n) => Kind::Points(n),
            WonPrize::Spins(n) => Kind::Spins(n),
            WonPrize::Coupon(code) => Kind::Coupon(code),
            WonPrize::CashbackMinor(n) => Kind::CashbackMinor(n),
            WonPrize::Item(name) => Kind::Item(name),
            WonPrize::Nothing => Kind::Nothing(true),
        }),
    }
}

fn entry(entry: bazaar_games::leaderboard::Entry) -> pb::Entry {
    pb::Entry { rank: entry.rank, customer: entry.customer.to_string(), score: entry.score }
}

fn jackpot(answer: api::JackpotAnswer) -> pb::Jackpot {
    pb::Jackpot {
        jackpot: answer.jackpot.to_string(),
        pool_minor: answer.pool_minor,
        reserve_minor: answer.reserve_minor,
        seed_minor: answer.seed_minor,
        cap_minor: answer.cap_minor,
        cycle: answer.cycle,
        commitment: answer.commitment,
        books: Some(pb::Books {
            seeded_minor: answer.books.seeded_minor,
            contributed_minor: answer.books.contributed_minor,
            paid_minor: answer.books.paid_minor,
        }),
        last_hit: answer.last_hit.map(hit_message),
    }
}

fn hit_message(hit: api::HitAnswer) -> pb::Hit {
    pb::Hit {
        cycle: hit.cycle,
        customer: hit.customer.to_string(),
        amount_minor: hit.amount_minor,
        at: hit.at,
        trigger_minor: hit.trigger_minor,
        salt: hit.salt,
        commitment: hit.commitment,
    }
}

fn leaderboard(answer: api::LeaderboardAnswer) -> pb::Leaderboard {
    pb::Leaderboard {
        leaderboard: answer.leaderboard.to_string(),
        members: answer.members,
        entries: answer.entries.into_iter().map(entry).collect(),
        metric: match answer.metric {
            bazaar_games::leaderboard::Metric::Points => pb::Metric::Points,
            bazaar_games::leaderboard::Metric::Spend => pb::Metric::Spend,
            bazaar_games::leaderboard::Metric::Purchases => pb::Metric::Purchases,
            bazaar_games::leaderboard::Metric::Missions => pb::Metric::Missions,
        }
        .into(),
    }
}

fn customer(answer: api::CustomerAnswer) -> pb::Customer {
    pb::Customer {
        customer: answer.customer.to_string(),
        points_balance: answer.points_balance,
        points_earned: answer.points_earned,
        points_spent: answer.points_spent,
        tier: answer.tier.unwrap_or_default(),
        wallet_minor: answer.wallet_minor,
        spins: answer.spins.into_iter().map(|(w, n)| (w.to_string(), n)).collect(),
        coupons: answer
            .coupons
            .into_iter()
            .map(|c| pb::Coupon { code: c.code, source: c.source.to_string(), at: c.at })
            .collect(),
        items: answer
            .items
            .into_iter()
            .map(|i| pb::Item { item: i.item, wheel: i.wheel.to_string(), draw_id: i.draw_id, at: i.at })
            .collect(),
        missions: answer.missions.into_iter().map(mission_progress).collect(),
        stats: Some(pb::Stats {
            first_purchase_at: answer.stats.first_purchase_at.unwrap_or_default(),
            last_purchase_at: answer.stats.last_purchase_at.unwrap_or_default(),
            purchases: answer.stats.purchases,
            spend_minor: answer.stats.spend_minor,
            visits: answer.stats.visits,
            events: answer.stats.events,
        }),
    }
}

fn tenant(answer: api::TenantAnswer) -> pb::Tenant {
    pb::Tenant { id: answer.id, name: answer.name, currency: answer.currency, created_at: answer.created_at }
}

fn version<T: serde::Serialize>(answer: api::DefinitionAnswer<T>) -> pb::DefinitionVersion {
    pb::DefinitionVersion { id: answer.id, version: answer.version }
}

// -------------------------------------------------------------- services

#[tonic::async_trait]
impl pb::tenant_service_server::TenantService for Grpc {
    async fn create_tenant(&self, request: Request<pb::CreateTenantRequest>) -> GrpcResult<pb::Tenant> {
        let key = key(&request);
        let r = request.into_inner();
        let body = api::CreateTenant { id: r.id, name: r.name, currency: r.currency };
        reply(self.service.create_tenant(key.as_deref(), body).await.map(tenant))
    }

    async fn get_tenant(&self, request: Request<pb::GetTenantRequest>) -> GrpcResult<pb::Tenant> {
        let key = key(&request);
        reply(self.service.get_tenant(key.as_deref(), &request.into_inner().tenant).map(tenant))
    }

    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> GrpcResult<pb::ApiKey> {
        let key = key(&request);
        let r = request.into_inner();
        let created = self.service.create_key(key.as_deref(), &r.tenant, api::CreateKey { role: r.role }).await;
        reply(created.map(|k| pb::ApiKey {
            key: k.key,
            key_id: k.key_id,
            role: k.role,
            tenant: k.tenant.unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl pb::catalog_service_server::CatalogService for Grpc {
    async fn put_store(&self, request: Request<pb::PutStoreRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let body = from_json_value(json!({"name": r.name, "category": r.category}))?;
            self.service.put_store(key.as_deref(), &r.tenant, &r.store, body).await.map(version)
        };
        reply(result.await)
    }

    async fn put_campaign(&self, request: Request<pb::PutCampaignRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let body = from_json_value(campaign_json(&r))?;
            self.service.put_campaign(key.as_deref(), &r.tenant, &r.campaign, body).await.map(version)
        };
        reply(result.await)
    }

    async fn put_wheel(&self, request: Request<pb::PutWheelRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let body = from_json_value(wheel_json(&r))?;
            self.service.put_wheel(key.as_deref(), &r.tenant, &r.wheel, body).await.map(version)
        };
        reply(result.await)
    }

    async fn put_jackpot(&self, request: Request<pb::PutJackpotRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let body = from_json_value(json!({
                "campaign": r.campaign, "seed_minor": r.seed_minor, "cap_minor": r.cap_minor,
                "contribution_bps": r.contribution_bps, "reserve_bps": r.reserve_bps,
                "min_purchase_minor": r.min_purchase_minor,
            }))?;
            self.service.put_jackpot(key.as_deref(), &r.tenant, &r.jackpot, body).await.map(version)
        };
        reply(result.await)
    }

    async fn put_mission(&self, request: Request<pb::PutMissionRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let body = from_json_value(mission_json(&r))?;
            self.service.put_mission(key.as_deref(), &r.tenant, &r.mission, body).await.map(version)
        };
        reply(result.await)
    }

    async fn put_leaderboard(&self, request: Request<pb::PutLeaderboardRequest>) -> GrpcResult<pb::DefinitionVersion> {
        let key = key(&request);
        let r = request.into_inner();
        let result = async {
            let top_size = if r.top_size == 0 { 10 } else { r.top_size };
            let body = from_json_value(
                json!({"campaign": r.campaign, "metric": metric_json(r.metric), "top_size": top_size}),
            )?;
            self.service.put_leaderboard(key.as_deref(), &r.tenant, &r.leaderboard, body).await.map(version)
        };
        reply(result.await)
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for Grpc {
    async fn record_event(&self, request: Request<pb::RecordEventRequest>) -> GrpcResult<pb::EventResult> {
        let key = key(&request);
        let r = request.into_inner();
        let tenant = r.tenant.clone();
        reply(self.service.record_event(key.as_deref(), &tenant, event_request(r)).await.map(event_result))
    }

    async fn record_events(&self, request: Request<pb::RecordEventsRequest>) -> GrpcResult<pb::RecordEventsResponse> {
        let key = key(&request);
        let r = request.into_inner();
        let events: Vec<Value> =
            r.events.into_iter().map(|e| serde_json::to_value(event_request(e)).unwrap_or_default()).collect();
        let results = self.service.record_batch(key.as_deref(), &r.tenant, api::BatchRequest { events }).await;
        reply(results.map(|results| pb::RecordEventsResponse { results: results.into_iter().map(outcome).collect() }))
    }

    type StreamEventsStream = ReceiverStream<Result<pb::EventOutcome, Status>>;

    async fn stream_events(
        &self,
        request: Request<tonic::Streaming<pb::RecordEventRequest>>,
    ) -> GrpcResult<Self::StreamEventsStream> {
        let key = key(&request);
        // Authenticate once, up front: a stream with a bad key ends at once.
        self.service.tenancy.authenticate(key.as_deref()).map_err(status)?;
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) = tokio::sync::mpsc::channel(STREAM_WINDOW / STREAM_CHUNK);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(STREAM_WINDOW);
        let service = self.service.clone();
        let stopped = self.service.live.stopped();
        // Reader: takes every event that has arrived (up to a chunk) and
        // records them together, up to the window in flight; writer:
        // answers them in arrival order.
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut end = None;
            while end.is_none() {
                let mut chunk = Vec::new();
                while chunk.len() < STREAM_CHUNK {
                    tokio::select! {
                        biased;
                        // A stop drains what was read, then ends the
                        // stream: a till's stream would otherwise hold the
                        // stop up for as long as the till stays connected.
                        () = &mut stopped => {
                            end = Some(Err(Status::unavailable(
                                "the node is stopping: every event answered above is recorded; send the others \
                                 again on a new stream (their ids make it safe)",
                            )));
                        }
                        next = inbound.message() => match next {
                            Ok(Some(event)) => chunk.push(event),
                            Ok(None) => end = Some(Ok(())),
                            Err(error) => end = Some(Err(error)),
                        },
                        // Nothing more has arrived: go with what there is,
                        // or wait for the next event if there is nothing.
                        () = std::future::ready(()), if !chunk.is_empty() => break,
                    }
                    if end.is_some() {
                        break;
                    }
                }
                if !chunk.is_empty() {
                    let (service, key) = (service.clone(), key.clone());
                    let task = tokio::spawn(async move { record_chunk(&service, key.as_deref(), chunk).await });
                    if pending_tx.send(Ok(task)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(Err(error)) = end {
                let _ = pending_tx.send(Err(error)).await;
            }
        });
        tokio::spawn(async move {
            while let Some(pending) = pending_rx.recv().await {
                let items = match pending {
                    Ok(task) => match task.await {
                        Ok(results) => results.into_iter().map(|result| Ok(outcome(result))).collect(),
                        Err(error) => vec![Err(Status::internal(format!("event task failed: {error}")))],
                    },
                    Err(error) => vec![Err(error)],
                };
                for item in items {
                    if out_tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

#[tonic::async_trait]
impl pb::game_service_server::GameService for Grpc {
    async fn spin(&self, request: Request<pb::SpinRequest>) -> GrpcResult<pb::SpinResult> {
        let key = key(&request);
        let r = request.into_inner();
        let body = api::SpinRequest { customer: r.customer, request_id: r.request_id };
        let answer = self.service.spin(key.as_deref(), &r.tenant, &r.wheel, body).await;
        reply(answer.map(|a| pb::SpinResult {
            request_id: a.request_id.to_string(),
            duplicate: a.duplicate,
            wheel: a.wheel.to_string(),
            segment: a.segment,
            prize: Some(won_prize(a.prize)),
            draw_id: a.draw_id,
            points_balance: a.points_balance,
        }))
    }

    async fn get_jackpot(&self, request: Request<pb::GetJackpotRequest>) -> GrpcResult<pb::Jackpot> {
        let key = key(&request);
        let r = request.into_inner();
        reply(self.service.jackpot(key.as_deref(), &r.tenant, &r.jackpot).await.map(jackpot))
    }

    async fn get_leaderboard(&self, request: Request<pb::GetLeaderboardRequest>) -> GrpcResult<pb::Leaderboard> {
        let key = key(&request);
        let r = request.into_inner();
        let top = (r.top != 0).then_some(r.top);
        let answer = self.service.leaderboard(key.as_deref(), &r.tenant, &r.leaderboard, top).await;
        reply(answer.map(leaderboard))
    }

    async fn get_rank(&self, request: Request<pb::GetRankRequest>) -> GrpcResult<pb::Rank> {
        let key = key(&request);
        let r = request.into_inner();
        let answer = self
            .service
            .leaderboard_around(key.as_deref(), &r.tenant, &r.leaderboard, &r.customer, Some(r.around))
            .await;
        reply(answer.map(|a| pb::Rank {
            leaderboard: a.leaderboard.to_string(),
            customer: a.customer.to_string(),
            rank: a.rank,
            score: a.score,
            around: a.around.into_iter().map(entry).collect(),
        }))
    }

    type WatchJackpotStream = ReceiverStream<Result<pb::JackpotUpdate, Status>>;

    async fn watch_jackpot(&self, request: Request<pb::WatchJackpotRequest>) -> GrpcResult<Self::WatchJackpotStream> {
        let key = key(&request);
        let r = request.into_inner();
        let last = (!r.last_event_id.is_empty()).then_some(r.last_event_id.as_str());
        let mut events =
            self.service.watch_jackpot(key.as_deref(), &r.tenant, &r.jackpot, last).await.map_err(status)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_WINDOW);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let id = event.id();
                let update = match event {
                    JackpotEvent::Pool { pool_minor, cycle, .. } => {
                        pb::jackpot_update::Update::Pool(pb::Pool { pool_minor, cycle })
                    }
                    JackpotEvent::Hit(hit) => pb::jackpot_update::Update::Hit(hit_message(hit)),
                };
                if sender.send(Ok(pb::JackpotUpdate { id, update: Some(update) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    type WatchLeaderboardStream = ReceiverStream<Result<pb::Leaderboard, Status>>;

    async fn watch_leaderboard(
        &self,
        request: Request<pb::WatchLeaderboardRequest>,
    ) -> GrpcResult<Self::WatchLeaderboardStream> {
        let key = key(&request);
        let r = request.into_inner();
        let top = (r.top != 0).then_some(r.top);
        let mut updates =
            self.service.watch_leaderboard(key.as_deref(), &r.tenant, &r.leaderboard, top).await.map_err(status)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_WINDOW);
        tokio::spawn(async move {
            while let Some(board) = updates.recv().await {
                if sender.send(Ok(leaderboard(board))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn get_audit(&self, request: Request<pb::GetAuditRequest>) -> GrpcResult<pb::AuditRecords> {
        let key = key(&request);
        let r = request.into_inner();
        let after = (r.after != 0).then_some(r.after);
        let limit = (r.limit != 0).then_some(r.limit);
        let answer = self.service.audit(key.as_deref(), &r.tenant, &r.kind, &r.id, after, limit).await;
        reply(answer.map(|a| pb::AuditRecords { records: a.records.iter().map(Value::to_string).collect() }))
    }
}

#[tonic::async_trait]
impl pb::customer_service_server::CustomerService for Grpc {
    async fn get_customer(&self, request: Request<pb::GetCustomerRequest>) -> GrpcResult<pb::Customer> {
        let key = key(&request);
        let r = request.into_inner();
        reply(self.service.customer(key.as_deref(), &r.tenant, &r.customer).await.map(customer))
    }
}

/// The full gRPC router: the five services, server reflection (v1 and
/// v1alpha, for older grpcurl) and the health service.
pub async fn router(service: Arc<Service>) -> Result<tonic::service::Routes, Box<dyn std::error::Error + Send + Sync>> {
    use pb::catalog_service_server::CatalogServiceServer;
    use pb::customer_service_server::CustomerServiceServer;
    use pb::event_service_server::EventServiceServer;
    use pb::game_service_server::GameServiceServer;
    use pb::tenant_service_server::TenantServiceServer;
    let grpc = Grpc { service };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<TenantServiceServer<Grpc>>().await;
    reporter.set_serving::<CatalogServiceServer<Grpc>>().await;
    reporter.set_serving::<EventServiceServer<Grpc>>().await;
    reporter.set_serving::<GameServiceServer<Grpc>>().await;
    reporter.set_serving::<CustomerServiceServer<Grpc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bazaar_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bazaar_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut routes = tonic::service::Routes::new(health);
    routes = routes
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(TenantServiceServer::new(grpc.clone()))
        .add_service(CatalogServiceServer::new(grpc.clone()))
        .add_service(EventServiceServer::new(grpc.clone()))
        .add_service(GameServiceServer::new(grpc.clone()))
        .add_service(CustomerServiceServer::new(grpc));
    Ok(routes)
}

/// Observes every gRPC call in `bazaar_grpc_request_duration_seconds`:
/// from the request's arrival to the response's head, which for a unary
/// call is its answer and for a stream its opening. The code is the
/// response's `grpc-status` (a success's comes in the trailers: 0). Methods
/// the server does not have count as `unknown`, so a client cannot grow the
/// label set.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<bazaar_observability::Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<bazaar_observability::Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<bazaar_observability::Metrics>,
}

impl<S, B, R> tower::Service<tonic::codegen::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let method = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0");
            let method = if code == "12" { "unknown" } else { method.as_str() };
            metrics.grpc_request_duration.with_label_values(&[method, code]).observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn invalid_arguments_carry_a_field_violation() {
        let error = status(ServiceError::invalid("segments[1].weight", "must be between 0 and 10^6"));
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        let details = error.get_error_details();
        let bad_request = details.bad_request().expect("a BadRequest detail");
        assert_eq!(bad_request.field_violations[0].field, "segments[1].weight");
        let refused = status(ServiceError::refused("daily_limit", "come back tomorrow"));
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert_eq!(refused.get_error_details().error_info().map(|i| i.reason.as_str()), Some("daily_limit"));
        assert_eq!(status(ServiceError::new(Code::IdempotencyConflict, "x")).code(), tonic::Code::Aborted);
    }
}
