//! The inspection and admin API under `/_admin` (documented in docs/teams-sim.md).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::connector::error;
use super::faults::{Latency, Route, Rule};
use super::world::{Bot, Conversation, User, Workflow, World};
use super::{ActivityRecord, Sim, Stats};
use teams_limits::Limits;

pub(super) fn router(sim: Sim) -> Router {
    Router::new()
        .route("/_admin/health", get(|| async { "ok" }))
        .route("/_admin/activities", get(activities))
        .route("/_admin/stats", get(stats))
        .route("/_admin/reset", post(reset))
        .route("/_admin/world", get(world).put(replace_world))
        .route("/_admin/bots/{app_id}", put(put_bot).delete(delete_bot))
        .route("/_admin/users/{user_id}", put(put_user))
        .route("/_admin/workflows/{id}", put(put_workflow).delete(delete_workflow))
        .route("/_admin/conversations/{id}", put(put_conversation).delete(delete_conversation))
        .route("/_admin/conversations/{id}/roster/{app_id}", put(add_to_roster).delete(remove_from_roster))
        .route("/_admin/faults", get(faults).post(add_fault).delete(clear_faults))
        .route("/_admin/latency", put(set_latency))
        .route("/_admin/throttling", get(throttling).put(set_throttling))
        .route("/_admin/tokens", get(tokens).put(set_tokens).delete(revoke_tokens))
        .route("/_admin/clock", post(advance_clock))
        .route("/_admin/sign", post(super::signing::sign_route))
        .with_state(sim)
}

/// Filters of `GET /_admin/activities`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ActivityFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// Only records with a sequence number above this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
}

async fn activities(State(sim): State<Sim>, Query(filter): Query<ActivityFilter>) -> Json<Vec<ActivityRecord>> {
    let state = sim.lock();
    let records = state
        .records
        .iter()
        .filter(|r| filter.conversation_id.as_ref().is_none_or(|c| *c == r.conversation_id))
        .filter(|r| filter.app_id.as_ref().is_none_or(|a| *a == r.app_id))
        .filter(|r| filter.route.is_none_or(|route| route == r.route))
        .filter(|r| filter.after_seq.is_none_or(|seq| r.seq > seq))
        .cloned()
        .collect();
    Json(records)
}

async fn stats(State(sim): State<Sim>) -> Json<Stats> {
    Json(sim.stats())
}

/// Options of `POST /_admin/reset`.
#[derive(Debug, Default, Deserialize)]
struct ResetOptions {
    /// Also forget issued tokens (clients must fetch new ones).
    #[serde(default)]
    tokens: bool,
}

/// Forget records, counters, throttle history, faults and latency; keep the world.
async fn reset(State(sim): State<Sim>, Query(options): Query<ResetOptions>) -> StatusCode {
    {
        let mut state = sim.lock();
        state.records.clear();
        state.activities.clear();
        state.stats = Stats::default();
        state.throttle.clear();
        state.faults.clear();
        if options.tokens {
            state.tokens.clear();
        }
    }
    sim.reset_counters();
    StatusCode::NO_CONTENT
}

async fn world(State(sim): State<Sim>) -> Json<World> {
    Json(sim.lock().world.to_world())
}

async fn replace_world(State(sim): State<Sim>, Json(world): Json<World>) -> StatusCode {
    sim.lock().world = super::world::Index::from_world(world);
    StatusCode::NO_CONTENT
}

fn mismatch(what: &str, path: &str, body: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "BadArgument", format!("{what} id in the path ({path}) differs from the body ({body})"))
}

async fn put_bot(State(sim): State<Sim>, Path(app_id): Path<String>, Json(bot): Json<Bot>) -> Response {
    if bot.app_id != app_id {
        return mismatch("app", &app_id, &bot.app_id);
    }
    sim.lock().world.bots.insert(app_id, bot);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_bot(State(sim): State<Sim>, Path(app_id): Path<String>) -> StatusCode {
    found(sim.lock().world.bots.remove(&app_id).is_some())
}

async fn put_workflow(State(sim): State<Sim>, Path(id): Path<String>, Json(workflow): Json<Workflow>) -> Response {
    if workflow.id != id {
        return mismatch("workflow", &id, &workflow.id);
    }
    sim.lock().world.workflows.insert(id, workflow);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_workflow(State(sim): State<Sim>, Path(id): Path<String>) -> StatusCode {
    found(sim.lock().world.workflows.remove(&id).is_some())
}

async fn put_user(State(sim): State<Sim>, Path(user_id): Path<String>, Json(user): Json<User>) -> Response {
    if user.id != user_id {
        return mismatch("user", &user_id, &user.id);
    }
    sim.lock().world.users.insert(user_id, user);
    StatusCode::NO_CONTENT.into_response()
}

async fn put_conversation(State(sim): State<Sim>, Path(id): Path<String>, Json(conversation): Json<Conversation>) -> Response {
    if conversation.id != id {
        return mismatch("conversation", &id, &conversation.id);
    }
    sim.lock().world.conversations.insert(id, conversation);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_conversation(State(sim): State<Sim>, Path(id): Path<String>) -> StatusCode {
    found(sim.lock().world.conversations.remove(&id).is_some())
}

async fn add_to_roster(State(sim): State<Sim>, Path((id, app_id)): Path<(String, String)>) -> StatusCode {
    match sim.lock().world.conversations.get_mut(&id) {
        Some(conversation) => {
            conversation.roster.insert(app_id);
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

async fn remove_from_roster(State(sim): State<Sim>, Path((id, app_id)): Path<(String, String)>) -> StatusCode {
    let mut state = sim.lock();
    found(state.world.conversations.get_mut(&id).is_some_and(|c| c.roster.remove(&app_id)))
}

fn found(found: bool) -> StatusCode {
    if found { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }
}

async fn faults(State(sim): State<Sim>) -> Json<Vec<Rule>> {
    Json(sim.lock().faults.rules.clone())
}

async fn add_fault(State(sim): State<Sim>, Json(rule): Json<Rule>) -> Response {
    if let Err(reason) = rule.validate() {
        return error(StatusCode::BAD_REQUEST, "BadArgument", reason);
    }
    sim.lock().faults.rules.push(Rule { applied: 0, ..rule });
    StatusCode::CREATED.into_response()
}

async fn clear_faults(State(sim): State<Sim>) -> StatusCode {
    sim.lock().faults.rules.clear();
    StatusCode::NO_CONTENT
}

async fn set_latency(State(sim): State<Sim>, Json(latency): Json<Latency>) -> StatusCode {
    sim.lock().faults.latency = latency;
    StatusCode::NO_CONTENT
}

/// Body of `PUT /_admin/throttling` and answer of `GET`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Throttling {
    pub enabled: bool,
    #[serde(default)]
    pub limits: Option<Limits>,
}

async fn throttling(State(sim): State<Sim>) -> Json<Throttling> {
    let state = sim.lock();
    Json(Throttling { enabled: state.throttle.enabled, limits: Some(state.throttle.limits.clone()) })
}

async fn set_throttling(State(sim): State<Sim>, Json(settings): Json<Throttling>) -> StatusCode {
    let mut state = sim.lock();
    state.throttle.enabled = settings.enabled;
    if let Some(limits) = settings.limits {
        state.throttle.limits = limits;
    }
    state.throttle.clear();
    StatusCode::NO_CONTENT
}

/// One issued token (for tests that check a token never leaks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IssuedToken {
    pub access_token: String,
    pub app_id: String,
    pub authority: String,
    pub expired: bool,
}

async fn tokens(State(sim): State<Sim>) -> Json<Vec<IssuedToken>> {
    let state = sim.lock();
    let now = state.now();
    let mut tokens: Vec<IssuedToken> = state
        .tokens
        .iter()
        .map(|(token, grant)| IssuedToken {
            access_token: token.clone(),
            app_id: grant.app_id.clone(),
            authority: grant.authority.clone(),
            expired: grant.expires_at <= now,
        })
        .collect();
    tokens.sort_by(|a, b| a.access_token.cmp(&b.access_token));
    Json(tokens)
}

/// Body of `PUT /_admin/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSettings {
    /// Lifetime of tokens issued from now on.
    pub ttl_secs: u64,
}

async fn set_tokens(State(sim): State<Sim>, Json(settings): Json<TokenSettings>) -> StatusCode {
    sim.lock().token_ttl = Duration::from_secs(settings.ttl_secs);
    StatusCode::NO_CONTENT
}

/// Every issued token stops working at once (answers 401 from now on). The
/// revoked tokens are still listed by `GET`, so tests can look for them.
async fn revoke_tokens(State(sim): State<Sim>) -> StatusCode {
    let mut state = sim.lock();
    let now = state.now();
    let past = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    for grant in state.tokens.values_mut() {
        grant.expires_at = grant.expires_at.min(past);
    }
    StatusCode::NO_CONTENT
}

/// Body of `POST /_admin/clock`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockAdvance {
    pub advance_secs: u64,
}

/// Move the simulator's clock forward: tokens expire, throttle windows pass.
async fn advance_clock(State(sim): State<Sim>, Json(advance): Json<ClockAdvance>) -> StatusCode {
    sim.lock().clock_offset += Duration::from_secs(advance.advance_secs);
    StatusCode::NO_CONTENT
}
