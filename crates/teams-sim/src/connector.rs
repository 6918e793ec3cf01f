//! The token endpoint and the Bot Connector routes, answering as Microsoft does.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use chrono::Utc;
use serde_json::{Value, json};

use super::faults::{Action, Route};
use super::world::{Conversation, ConversationKind, MULTI_TENANT_AUTHORITY};
use super::{ActivityRecord, ConnectionKiller, Grant, Sim};

/// The scope a bot requests for the Connector.
pub const BOT_SCOPE: &str = "https://api.botframework.com/.default";
/// The Connector refuses activities larger than this.
pub const MAX_ACTIVITY_BYTES: usize = 100 * 1024;

const ADAPTIVE_CARD: &str = "application/vnd.microsoft.card.adaptive";

pub(super) fn router(sim: Sim) -> Router {
    // Both families share the first segment's name: the router needs that.
    Router::new()
        .route("/{root}/oauth2/v2.0/token", post(token))
        .route("/{root}/v3/conversations", post(create_conversation))
        .route("/{root}/v3/conversations/{conversation}/activities", post(send))
        .route("/{root}/v3/conversations/{conversation}/activities/{activity}", post(targeted::<false>).put(targeted::<true>))
        .route("/{root}/v3/conversations/{conversation}/activities/{activity}/", put(targeted::<true>))
        .route("/powerautomate/automations/direct/workflows/{workflow}/triggers/manual/paths/invoke", post(workflow))
        .route("/v1/.well-known/openidconfiguration", axum::routing::get(super::signing::openid_configuration))
        .route("/v1/.well-known/keys", axum::routing::get(super::signing::keys))
        .layer(axum::middleware::map_response_with_state(sim.clone(), stamp))
        .with_state(sim)
}

/// Every answer carries a correlation id, and is counted by status.
async fn stamp(State(sim): State<Sim>, mut response: Response) -> Response {
    sim.count_response(response.status().as_u16());
    let id = format!("{:032x}", fastrand::u128(..));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-correlating-operationid", value);
    }
    response
}

/// Microsoft's Connector `ErrorResponse`.
pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    (status, axum::Json(body)).into_response()
}

fn throttled(wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, "Throttled", "The request was throttled. Retry after the given delay.");
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

/// The code Microsoft uses for an injected status without an explicit one.
fn default_code(status: u16) -> &'static str {
    match status {
        400 => "BadArgument",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        412 => "PreconditionFailed",
        413 => "MessageSizeTooBig",
        429 => "Throttled",
        500 => "InternalServerError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "ServiceError",
    }
}

/// What an injected fault does to a request.
enum Injected {
    /// Answer with this instead of handling the request.
    Answer(Response),
    /// Handle the request, then spoil the answer (`Lose`, `Garble`, `Stall`, `Flood`).
    After(Action),
}

impl Sim {
    /// Latency, then any injected fault for this request.
    async fn inject(
        &self,
        route: Route,
        app_id: Option<&str>,
        conversation_id: Option<&str>,
        killer: &ConnectionKiller,
    ) -> Option<Injected> {
        let (delay, action) = {
            let mut state = self.lock();
            (state.faults.delay(), state.faults.next(route, app_id, conversation_id))
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let answer = match action? {
            Action::Pass => return None,
            after @ (Action::Lose { .. } | Action::Garble | Action::Stall { .. } | Action::Flood { .. }) => {
                return Some(Injected::After(after));
            }
            Action::RetryAt { status, secs } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let code = default_code(status.as_u16());
                let mut response = error(status, code, format!("Injected fault: {code}"));
                let at = Utc::now() + chrono::Duration::seconds(secs.min(86_400 * 365) as i64);
                let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                if let Ok(value) = HeaderValue::from_str(&date) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                response
            }
            Action::Status { status, code, retry_after } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let code = code.unwrap_or_else(|| default_code(status.as_u16()).to_owned());
                let mut response = error(status, &code, format!("Injected fault: {code}"));
                if let Some(secs) = retry_after {
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                response
            }
            Action::Hang { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                error(StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout", "The request timed out.")
            }
            Action::Reset => {
                self.lock().stats.connections_reset += 1;
                killer.kill();
                std::future::pending().await
            }
        };
        Some(Injected::Answer(answer))
    }
}

/// Spoil the answer of a request that was handled (`Lose`, `Garble`).
async fn spoil(action: Option<Action>, answer: Response) -> Response {
    match action {
        Some(Action::Lose { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            answer
        }
        Some(Action::Garble) if answer.status().is_success() => {
            (answer.status(), [(header::CONTENT_TYPE, "application/json")], "{\"id\": \"1").into_response()
        }
        Some(Action::Stall { ms }) if answer.status().is_success() => {
            let parts = futures_util::stream::unfold(0u8, move |step| async move {
                match step {
                    0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"{\"id\": ")), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Some((Ok(Bytes::from_static(b"\"stalled\"}")), 2))
                    }
                    _ => None,
                }
            });
            (answer.status(), [(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(parts)).into_response()
        }
        Some(Action::Flood { bytes }) if answer.status().is_success() => {
            let padding = "x".repeat(bytes.min(64 << 20) as usize);
            let body = format!("{{\"id\": \"flood\", \"padding\": \"{padding}\"}}");
            (answer.status(), [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        _ => answer,
    }
}

// ----- token endpoint -------------------------------------------------------

/// An AADSTS-style error as the Microsoft identity platform answers it.
fn aad_error(status: StatusCode, error: &str, aadsts: u32, description: &str) -> Response {
    let trace_id = uuid::Uuid::new_v4();
    let correlation_id = uuid::Uuid::new_v4();
    let timestamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ");
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{aadsts}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [aadsts],
        "timestamp": timestamp.to_string(),
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    });
    (status, axum::Json(body)).into_response()
}

async fn token(
    State(sim): State<Sim>,
    Path(authority): Path<String>,
    Extension(killer): Extension<ConnectionKiller>,
    body: Bytes,
) -> Response {
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let client_id = field("client_id");
    let after = match sim.inject(Route::Token, Some(client_id), None, &killer).await {
        Some(Injected::Answer(response)) => return response,
        Some(Injected::After(action)) => Some(action),
        None => None,
    };
    spoil(after, issue_token(&sim, &authority, &form)).await
}

fn issue_token(sim: &Sim, authority: &str, form: &std::collections::HashMap<String, String>) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let client_id = field("client_id");
    for name in ["grant_type", "client_id", "client_secret", "scope"] {
        if !form.contains_key(name) {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                &format!("The request body must contain the following parameter: '{name}'."),
            );
        }
    }
    if field("grant_type") != "client_credentials" {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{}'.", field("grant_type")),
        );
    }
    let mut state = sim.lock();
    if authority != MULTI_TENANT_AUTHORITY && !state.world.tenants.contains_key(authority) {
        return aad_error(StatusCode::BAD_REQUEST, "invalid_request", 90002, &format!("Tenant '{authority}' not found."));
    }
    let Some(bot) = state.world.bots.get(client_id).filter(|bot| bot.authority == authority) else {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory '{authority}'."),
        );
    };
    if bot.app_secret != field("client_secret") {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        );
    }
    if field("scope") != BOT_SCOPE {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            &format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid: '{}'.",
                field("scope")
            ),
        );
    }
    let token = format!("sim.{:032x}", fastrand::u128(..));
    let ttl = state.token_ttl;
    let grant = Grant { app_id: client_id.to_owned(), authority: authority.to_owned(), expires_at: state.now() + ttl };
    state.tokens.insert(token.clone(), grant);
    *state.stats.tokens_issued.entry(client_id.to_owned()).or_default() += 1;
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "ext_expires_in": ttl.as_secs(),
        "access_token": token,
    }))
    .into_response()
}

// ----- Connector -------------------------------------------------------------

async fn send(
    State(sim): State<Sim>,
    Path((_root, conversation)): Path<(String, String)>,
    Extension(killer): Extension<ConnectionKiller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.activity(Route::Send, conversation, None, &headers, body, &killer).await
}

/// Reply to an activity (`POST`, `UPDATE` false) or replace it (`PUT`).
async fn targeted<const UPDATE: bool>(
    State(sim): State<Sim>,
    Path((_root, conversation, activity)): Path<(String, String, String)>,
    Extension(killer): Extension<ConnectionKiller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = if UPDATE { Route::Update } else { Route::Reply };
    sim.activity(route, conversation, Some(activity), &headers, body, &killer).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

fn unauthorized(message: &str) -> Response {
    error(StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

/// Why an activity body is not one the Connector accepts.
fn invalid_activity(body: &Value) -> Option<String> {
    let Some(activity) = body.as_object() else {
        return Some("The request body is not an Activity object.".into());
    };
    match activity.get("type").and_then(Value::as_str) {
        Some("message") => {}
        Some(other) => {
            return Some(format!("Activity type '{other}' cannot be sent to a conversation."));
        }
        None => return Some("The Activity has no 'type'.".into()),
    }
    let attachments = match activity.get("attachments") {
        None | Some(Value::Null) => &Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => return Some("'attachments' must be an array.".into()),
    };
    let has_text = activity.get("text").and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    if attachments.is_empty() && !has_text {
        return Some("The Activity has neither text nor attachments.".into());
    }
    for (i, attachment) in attachments.iter().enumerate() {
        let Some(content_type) = attachment.get("contentType").and_then(Value::as_str) else {
            return Some(format!("attachments[{i}] has no 'contentType'."));
        };
        if content_type == ADAPTIVE_CARD {
            let content = attachment.get("content");
            if content.and_then(|c| c.get("type")).and_then(Value::as_str) != Some("AdaptiveCard") {
                return Some(format!("attachments[{i}] is an Adaptive Card without 'type: AdaptiveCard'."));
            }
            if content.and_then(|c| c.get("version")).and_then(Value::as_str).is_none() {
                return Some(format!("attachments[{i}] is an Adaptive Card without a 'version'."));
            }
        }
    }
    None
}

impl Sim {
    /// The grant behind the request's bearer token, or the 401 Microsoft answers.
    #[allow(clippy::result_large_err, reason = "the error is the HTTP answer itself, built once per refused request")]
    fn authenticate(&self, headers: &HeaderMap) -> Result<Grant, Response> {
        let state = self.lock();
        let Some(token) = bearer(headers) else {
            return Err(unauthorized("Authorization has been denied for this request."));
        };
        let Some(grant) = state.tokens.get(token) else {
            return Err(unauthorized("Authorization has been denied for this request."));
        };
        if grant.expires_at <= state.now() {
            return Err(unauthorized("Authorization has been denied for this request. The token has expired."));
        }
        if state.world.bots.get(&grant.app_id).is_some_and(|bot| bot.disabled) {
            return Err(error(StatusCode::FORBIDDEN, "BotDisabledByAdmin", "The bot is disabled by the tenant admin."));
        }
        Ok(grant.clone())
    }

    fn app_of(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer(headers)?;
        self.lock().tokens.get(token).map(|grant| grant.app_id.clone())
    }

    async fn activity(
        &self,
        route: Route,
        conversation_id: String,
        target: Option<String>,
        headers: &HeaderMap,
        body: Bytes,
        killer: &ConnectionKiller,
    ) -> Response {
        let app = self.app_of(headers);
        let after = match self.inject(route, app.as_deref(), Some(&conversation_id), killer).await {
            Some(Injected::Answer(response)) => return response,
            Some(Injected::After(action)) => Some(action),
            None => None,
        };
        spoil(after, self.accept(route, conversation_id, target, headers, body)).await
    }

    fn accept(&self, route: Route, conversation_id: String, target: Option<String>, headers: &HeaderMap, body: Bytes) -> Response {
        let grant = match self.authenticate(headers) {
            Ok(grant) => grant,
            Err(response) => return response,
        };
        if body.len() > MAX_ACTIVITY_BYTES {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "MessageSizeTooBig",
                format!("The activity of {} bytes exceeds the limit of {MAX_ACTIVITY_BYTES} bytes.", body.len()),
            );
        }
        let activity: Value = match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(err) => {
                return error(StatusCode::BAD_REQUEST, "BadArgument", format!("The request body is not valid JSON: {err}"));
            }
        };
        if let Some(reason) = invalid_activity(&activity) {
            return error(StatusCode::BAD_REQUEST, "BadArgument", reason);
        }

        let mut state = self.lock();
        let now = state.now();
        let Some(conversation) = state.world.conversations.get(&conversation_id) else {
            return error(StatusCode::NOT_FOUND, "ConversationNotFound", "Conversation not found.");
        };
        if conversation.blocked {
            return error(StatusCode::FORBIDDEN, "ConversationBlockedByUser", "User blocked the conversation with the bot.");
        }
        if !conversation.roster.contains(&grant.app_id) {
            return error(StatusCode::FORBIDDEN, "BotNotInConversationRoster", "The bot is not part of the conversation roster.");
        }
        let tenant_id = conversation.tenant_id.clone();
        if let Some(target) = &target
            && state.activities.get(target) != Some(&conversation_id)
        {
            return error(StatusCode::NOT_FOUND, "ActivityNotFound", format!("Activity '{target}' not found in the conversation."));
        }
        if let Err(wait) = state.throttle.admit(&grant.app_id, &tenant_id, &conversation_id, now) {
            state.stats.throttled_total += 1;
            return throttled(wait);
        }
        let (status, activity_id) = match (&route, &target) {
            (Route::Update, Some(target)) => (StatusCode::OK, target.clone()),
            _ => (StatusCode::CREATED, format!("1{:012}", state.next_seq + 1)),
        };
        state.record(ActivityRecord {
            seq: 0,
            route,
            activity_id: activity_id.clone(),
            app_id: grant.app_id,
            authority: grant.authority,
            tenant_id,
            conversation_id,
            target_activity_id: target,
            body: activity,
            received_at: Utc::now(),
        });
        (status, axum::Json(json!({ "id": activity_id }))).into_response()
    }
}

// ----- Workflows --------------------------------------------------------------

/// A Workflows webhook's trigger: the signature in the query, a message with
/// Adaptive Card attachments in the body; 202 once the flow's run is queued,
/// with its run id in `x-ms-workflow-run-id`.
async fn workflow(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    Extension(killer): Extension<ConnectionKiller>,
    body: Bytes,
) -> Response {
    let after = match sim.inject(Route::Workflow, None, Some(&id), &killer).await {
        Some(Injected::Answer(response)) => return response,
        Some(Injected::After(action)) => Some(action),
        None => None,
    };
    spoil(after, sim.trigger(&id, query.get("sig").map(String::as_str), &body)).await
}

impl Sim {
    fn trigger(&self, id: &str, sig: Option<&str>, body: &Bytes) -> Response {
        let Some(workflow) = self.lock().world.workflows.get(id).filter(|w| !w.disabled).cloned() else {
            return error(StatusCode::NOT_FOUND, "WorkflowNotFound", format!("The workflow '{id}' could not be found."));
        };
        match sig {
            None | Some("") => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "DirectApiAuthorizationRequired",
                    "The request must be authenticated only by Shared Access scheme.",
                );
            }
            Some(sig) if sig != workflow.sig => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "DirectApiInvalidAuthorizationSignature",
                    "The provided authorization signature is not valid for this request.",
                );
            }
            Some(_) => {}
        }
        if body.len() > MAX_ACTIVITY_BYTES {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("The request content of {} bytes exceeds the limit of {MAX_ACTIVITY_BYTES} bytes.", body.len()),
            );
        }
        let card: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(err) => {
                return error(StatusCode::BAD_REQUEST, "InvalidRequestContent", format!("The request content is not valid JSON: {err}"));
            }
        };
        if let Some(reason) = invalid_activity(&card) {
            return error(StatusCode::BAD_REQUEST, "InvalidRequestContent", reason);
        }
        let mut state = self.lock();
        let run_id = format!("08584{:015}", state.next_seq + 1);
        state.record(ActivityRecord {
            seq: 0,
            route: Route::Workflow,
            activity_id: run_id.clone(),
            app_id: String::new(),
            authority: String::new(),
            tenant_id: workflow.tenant_id,
            conversation_id: workflow.conversation_id,
            target_activity_id: None,
            body: card,
            received_at: Utc::now(),
        });
        let mut response = StatusCode::ACCEPTED.into_response();
        if let Ok(value) = HeaderValue::from_str(&run_id) {
            response.headers_mut().insert("x-ms-workflow-run-id", value);
        }
        response
    }
}

/// `POST /v3/conversations`: create (or find) the 1:1 chat of a bot and a user.
async fn create_conversation(
    State(sim): State<Sim>,
    Path(_root): Path<String>,
    Extension(killer): Extension<ConnectionKiller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let app = sim.app_of(&headers);
    let after = match sim.inject(Route::CreateConversation, app.as_deref(), None, &killer).await {
        Some(Injected::Answer(response)) => return response,
        Some(Injected::After(action)) => Some(action),
        None => None,
    };
    spoil(after, create_conversation_now(&sim, &headers, &body)).await
}

fn create_conversation_now(sim: &Sim, headers: &HeaderMap, body: &Bytes) -> Response {
    let grant = match sim.authenticate(headers) {
        Ok(grant) => grant,
        Err(response) => return response,
    };
    let params: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(err) => {
            return error(StatusCode::BAD_REQUEST, "BadArgument", format!("The request body is not valid JSON: {err}"));
        }
    };
    if params.get("isGroup").and_then(Value::as_bool) == Some(true) {
        return error(StatusCode::BAD_REQUEST, "BadArgument", "Group conversations cannot be created by a bot in Teams.");
    }
    let members = params.get("members").and_then(Value::as_array).cloned().unwrap_or_default();
    let [member] = members.as_slice() else {
        return error(StatusCode::BAD_REQUEST, "BadArgument", "A 1:1 conversation needs exactly one member.");
    };
    let Some(user_id) = member.get("id").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "BadArgument", "The member has no 'id'.");
    };
    let tenant = params.get("tenantId").or_else(|| params.pointer("/channelData/tenant/id")).and_then(Value::as_str);
    let Some(tenant) = tenant else {
        return error(StatusCode::BAD_REQUEST, "BadArgument", "The tenant id is required (tenantId or channelData.tenant.id).");
    };

    let mut state = sim.lock();
    let user = match state.world.users.get(user_id) {
        Some(user) if user.tenant_id == tenant => user.clone(),
        _ => {
            return error(StatusCode::BAD_REQUEST, "BadArgument", "Invalid user identity in provided tenant.");
        }
    };
    if !user.installed_apps.contains(&grant.app_id) {
        return error(StatusCode::FORBIDDEN, "Forbidden", "The bot is not installed for the user.");
    }
    let conversation_id = match state.world.personal_conversation(user_id, &grant.app_id) {
        Some(existing) => existing.id.clone(),
        None => {
            let id = format!("a:{}", uuid::Uuid::new_v4().simple());
            let conversation = Conversation {
                id: id.clone(),
                tenant_id: tenant.to_owned(),
                kind: ConversationKind::Personal,
                roster: [grant.app_id.clone()].into(),
                blocked: false,
                user_id: Some(user_id.to_owned()),
            };
            state.world.conversations.insert(id.clone(), conversation);
            id
        }
    };
    if state.world.conversations.get(&conversation_id).is_some_and(|c| c.blocked) {
        return error(StatusCode::FORBIDDEN, "ConversationBlockedByUser", "User blocked the conversation with the bot.");
    }
    state.record(ActivityRecord {
        seq: 0,
        route: Route::CreateConversation,
        activity_id: conversation_id.clone(),
        app_id: grant.app_id,
        authority: grant.authority,
        tenant_id: tenant.to_owned(),
        conversation_id: conversation_id.clone(),
        target_activity_id: None,
        body: params,
        received_at: Utc::now(),
    });
    (StatusCode::CREATED, axum::Json(json!({ "id": conversation_id, "activityId": null }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activities_are_checked_like_the_connector_does() {
        let card = |content: Value| json!({"type": "message", "attachments": [{"contentType": ADAPTIVE_CARD, "content": content}]});
        assert_eq!(invalid_activity(&card(json!({"type": "AdaptiveCard", "version": "1.4", "body": []}))), None);
        assert!(invalid_activity(&card(json!({"type": "AdaptiveCard"}))).unwrap().contains("version"));
        assert!(invalid_activity(&card(json!({"version": "1.4"}))).unwrap().contains("AdaptiveCard"));
        assert!(invalid_activity(&json!({"type": "typing"})).is_some());
        assert!(invalid_activity(&json!({"type": "message"})).is_some());
        assert!(invalid_activity(&json!({"type": "message", "attachments": [{"content": {}}]})).unwrap().contains("contentType"));
        assert_eq!(invalid_activity(&json!({"type": "message", "text": "hi"})), None);
        assert!(invalid_activity(&json!([1, 2])).is_some());
    }
}
