//! teams-sim over real HTTP: every status and code it promises, each
//! throttling window, token expiry, faults and the inspection API.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use teams_sim::{
    self as sim, Action, ActivityFilter, Bot, Conversation, ConversationKind, Latency, Route, Rule, Running, Tenant, User, Workflow, World,
};

const CONV: &str = "19:general@thread.tacv2";
const SCOPE: &str = "https://api.botframework.com/.default";

fn world() -> World {
    World {
        tenants: vec![Tenant { id: "t1".into(), name: Some("Contoso".into()) }, Tenant { id: "t2".into(), name: None }],
        bots: vec![
            Bot { app_id: "app1".into(), app_secret: "s1".into(), authority: "botframework.com".into(), disabled: false },
            Bot { app_id: "single".into(), app_secret: "s2".into(), authority: "t1".into(), disabled: false },
            Bot { app_id: "outsider".into(), app_secret: "s3".into(), authority: "botframework.com".into(), disabled: false },
        ],
        users: vec![User { id: "29:alice".into(), tenant_id: "t1".into(), installed_apps: ["app1".to_owned()].into() }],
        conversations: vec![
            Conversation {
                id: CONV.into(),
                tenant_id: "t1".into(),
                kind: ConversationKind::Channel,
                roster: ["app1".to_owned(), "single".to_owned()].into(),
                blocked: false,
                user_id: None,
            },
            Conversation {
                id: "a:blocked".into(),
                tenant_id: "t1".into(),
                kind: ConversationKind::Personal,
                roster: ["app1".to_owned()].into(),
                blocked: true,
                user_id: Some("29:bob".into()),
            },
        ],
        workflows: vec![Workflow {
            id: "wf1".into(),
            sig: "sig1".into(),
            tenant_id: "t1".into(),
            conversation_id: CONV.into(),
            disabled: false,
        }],
    }
}

struct Sim {
    running: Running,
    http: reqwest::Client,
}

fn message() -> Value {
    json!({"type": "message", "attachments": [{
        "contentType": "application/vnd.microsoft.card.adaptive",
        "content": {"type": "AdaptiveCard", "version": "1.4", "body": [{"type": "TextBlock", "text": "hi"}]}
    }]})
}

fn encode(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

impl Sim {
    async fn start() -> Self {
        Self::start_with(sim::Options::default()).await
    }

    /// Post a message into `CONV` with reqwest itself (to see transport errors).
    async fn post_message(&self, token: &str) -> reqwest::Result<reqwest::Response> {
        let url = format!("{}/teams/v3/conversations/{}/activities", self.running.base_url(), encode(CONV));
        self.http.post(url).bearer_auth(token).json(&message()).send().await
    }

    /// A simulator, its admin client, and a token of `app1`.
    async fn with_token() -> (Self, teams_sim::client::SimClient, String) {
        let sim = Self::start().await;
        let client = sim.running.client();
        let token = sim.token("app1", "s1", "botframework.com").await;
        (sim, client, token)
    }

    async fn start_with(options: sim::Options) -> Self {
        let running = Running::start(world(), options).await.unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        Self { running, http }
    }

    async fn token_response(&self, authority: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response =
            self.http.post(format!("{}/{authority}/oauth2/v2.0/token", self.running.base_url())).form(form).send().await.unwrap();
        assert!(response.headers().contains_key("x-correlating-operationid"));
        (response.status(), response.json().await.unwrap())
    }

    async fn token(&self, app: &str, secret: &str, authority: &str) -> String {
        let form = [("grant_type", "client_credentials"), ("client_id", app), ("client_secret", secret), ("scope", SCOPE)];
        let (status, body) = self.token_response(authority, &form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut request = self.http.post(format!("{}/teams{path}", self.running.base_url())).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        (status, response.json().await.unwrap_or(Value::Null), headers)
    }

    /// `n` accepted sends into CONV, `per_step` at a time, the simulator's
    /// clock moved by `step` between steps.
    async fn send_spaced(&self, token: &str, n: usize, per_step: usize, step: Duration) {
        let client = self.running.client();
        for i in 0..n {
            if i % per_step == 0 && i > 0 {
                client.advance_clock(step).await.unwrap();
            }
            assert_eq!(self.send(Some(token), CONV, &message()).await.0, StatusCode::CREATED, "request {i}");
        }
    }

    async fn send(&self, token: Option<&str>, conversation: &str, body: &Value) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        self.post(&format!("/v3/conversations/{}/activities", encode(conversation)), token, body).await
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an ErrorResponse: {body}"))
}

#[tokio::test]
async fn token_endpoint_issues_tokens_and_refuses_like_the_identity_platform() {
    let sim = Sim::start().await;
    let good = [("grant_type", "client_credentials"), ("client_id", "app1"), ("client_secret", "s1"), ("scope", SCOPE)];
    let (status, body) = sim.token_response("botframework.com", &good).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert!(body["access_token"].as_str().unwrap().len() > 20);

    // (authority, form, status, error, AADSTS code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str, u64);
    let form = |client: &'static str, secret: &'static str| {
        vec![("grant_type", "client_credentials"), ("client_id", client), ("client_secret", secret), ("scope", SCOPE)]
    };
    let cases: [Case; 6] = [
        ("botframework.com", form("app1", "wrong"), 401, "invalid_client", 7000215),
        ("botframework.com", form("nobody", "s1"), 400, "unauthorized_client", 700016),
        // A single-tenant bot asking the multi-tenant authority, and a wrong tenant.
        ("botframework.com", form("single", "s2"), 400, "unauthorized_client", 700016),
        ("no-such-tenant", form("single", "s2"), 400, "invalid_request", 90002),
        (
            "botframework.com",
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "app1"),
                ("client_secret", "s1"),
                ("scope", "https://graph.microsoft.com/.default"),
            ],
            400,
            "invalid_scope",
            70011,
        ),
        (
            "botframework.com",
            vec![("grant_type", "password"), ("client_id", "app1"), ("client_secret", "s1"), ("scope", SCOPE)],
            400,
            "unsupported_grant_type",
            70003,
        ),
    ];
    for (authority, form, status, error, aadsts) in cases {
        let (got, body) = sim.token_response(authority, &form).await;
        assert_eq!((got.as_u16(), body["error"].as_str().unwrap()), (status, error), "{body}");
        assert_eq!(body["error_codes"][0], aadsts);
        assert!(body["error_description"].as_str().unwrap().starts_with(&format!("AADSTS{aadsts}:")));
    }
    // The single-tenant bot gets its token from its own tenant.
    sim.token("single", "s2", "t1").await;
    let stats = sim.running.client().stats().await.unwrap();
    assert_eq!(stats.tokens_issued.get("app1"), Some(&1));
    assert_eq!(stats.tokens_issued.get("single"), Some(&1));
}

#[tokio::test]
async fn connector_authentication_and_expiry() {
    let sim = Sim::start_with(sim::Options { token_ttl: Duration::from_secs(60), ..Default::default() }).await;
    let (status, body, headers) = sim.send(None, CONV, &message()).await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "Unauthorized"));
    assert!(headers.contains_key("x-correlating-operationid"));
    let (status, _, _) = sim.send(Some("made-up"), CONV, &message()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let token = sim.token("app1", "s1", "botframework.com").await;
    let (status, body, _) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(body["id"].as_str().is_some());

    // Tokens really expire.
    sim.running.client().advance_clock(Duration::from_secs(61)).await.unwrap();
    let (status, body, _) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "Unauthorized"));
    // A TTL set at run time applies to new tokens.
    sim.running.client().set_token_ttl(Duration::from_secs(5)).await.unwrap();
    let form = [("grant_type", "client_credentials"), ("client_id", "app1"), ("client_secret", "s1"), ("scope", SCOPE)];
    assert_eq!(sim.token_response("botframework.com", &form).await.1["expires_in"], 5);
    // Revoking makes every token answer 401.
    let token = sim.token("app1", "s1", "botframework.com").await;
    sim.running.client().revoke_tokens().await.unwrap();
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn connector_statuses_and_codes() {
    let (sim, client, token) = Sim::with_token().await;
    let outsider = sim.token("outsider", "s3", "botframework.com").await;

    let bad = [
        json!({"type": "typing"}),
        json!({"type": "message"}),
        json!({"type": "message", "attachments": [{"content": {}}]}),
        json!({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": {"type": "AdaptiveCard"}}]}),
    ];
    for body in bad {
        let (status, answer, _) = sim.send(Some(&token), CONV, &body).await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "BadArgument"), "{body}");
    }
    let huge = json!({"type": "message", "text": "x".repeat(101 * 1024)});
    let (status, answer, _) = sim.send(Some(&token), CONV, &huge).await;
    assert_eq!((status, code(&answer)), (StatusCode::PAYLOAD_TOO_LARGE, "MessageSizeTooBig"));

    let (status, answer, _) = sim.send(Some(&token), "19:nowhere@thread.tacv2", &message()).await;
    assert_eq!((status, code(&answer)), (StatusCode::NOT_FOUND, "ConversationNotFound"));
    let (status, answer, _) = sim.send(Some(&outsider), CONV, &message()).await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "BotNotInConversationRoster"));
    let (status, answer, _) = sim.send(Some(&token), "a:blocked", &message()).await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "ConversationBlockedByUser"));

    // The roster can change at run time.
    client.add_to_roster(CONV, "outsider").await.unwrap();
    assert_eq!(sim.send(Some(&outsider), CONV, &message()).await.0, StatusCode::CREATED);
    client.remove_from_roster(CONV, "outsider").await.unwrap();
    assert_eq!(sim.send(Some(&outsider), CONV, &message()).await.0, StatusCode::FORBIDDEN);

    // Reply and update.
    let (_, sent, _) = sim.send(Some(&token), CONV, &message()).await;
    let id = sent["id"].as_str().unwrap();
    let path = format!("/v3/conversations/{}/activities/{id}", encode(CONV));
    let (status, reply, _) = sim.post(&path, Some(&token), &message()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(reply["id"], sent["id"]);
    let update = sim
        .http
        .put(format!("{}/teams{path}", sim.running.base_url()))
        .bearer_auth(&token)
        .json(&json!({"type": "message", "text": "edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(update.status(), StatusCode::OK);
    let unknown = format!("/v3/conversations/{}/activities/999", encode(CONV));
    let (status, answer, _) = sim.post(&unknown, Some(&token), &message()).await;
    assert_eq!((status, code(&answer)), (StatusCode::NOT_FOUND, "ActivityNotFound"));

    // A disabled bot.
    client
        .put_bot(&Bot { app_id: "app1".into(), app_secret: "s1".into(), authority: "botframework.com".into(), disabled: true })
        .await
        .unwrap();
    let (status, answer, _) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "BotDisabledByAdmin"));

    let records = client.activities(&ActivityFilter { conversation_id: Some(CONV.into()), ..Default::default() }).await.unwrap();
    let routes: Vec<Route> = records.iter().map(|r| r.route).collect();
    assert_eq!(routes, [Route::Send, Route::Send, Route::Reply, Route::Update]);
    assert_eq!(records[2].target_activity_id.as_deref(), Some(id));
    assert!(records.iter().all(|r| r.tenant_id == "t1"));
}

#[tokio::test]
async fn create_conversation_finds_or_creates_the_personal_chat() {
    let sim = Sim::start().await;
    let token = sim.token("app1", "s1", "botframework.com").await;
    let params =
        |user: &str, tenant: &str| json!({"bot": {"id": "28:app1"}, "members": [{"id": user}], "isGroup": false, "tenantId": tenant});
    let (status, first, _) = sim.post("/v3/conversations", Some(&token), &params("29:alice", "t1")).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = first["id"].as_str().unwrap().to_owned();
    let (_, again, _) = sim.post("/v3/conversations", Some(&token), &params("29:alice", "t1")).await;
    assert_eq!(again["id"], id.as_str(), "the same chat, not a second one");
    assert_eq!(sim.send(Some(&token), &id, &message()).await.0, StatusCode::CREATED);

    let (status, answer, _) = sim.post("/v3/conversations", Some(&token), &params("29:alice", "t2")).await;
    assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "BadArgument"), "wrong tenant");
    let outsider = sim.token("outsider", "s3", "botframework.com").await;
    let (status, _, _) = sim.post("/v3/conversations", Some(&outsider), &params("29:alice", "t1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the app is not installed for the user");
    let world = sim.running.client().world().await.unwrap();
    assert!(world.conversations.iter().any(|c| c.id == id && c.user_id.as_deref() == Some("29:alice")));
}

#[tokio::test]
async fn throttling_per_conversation_windows_over_http() {
    let (sim, client, token) = Sim::with_token().await;
    // 7 per second.
    for _ in 0..7 {
        assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    }
    let (status, body, headers) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!((status, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "Throttled"));
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    // 8 per 2 s: a second later only one more fits.
    client.advance_clock(Duration::from_secs(1)).await.unwrap();
    client.reset().await.unwrap();
    for _ in 0..7 {
        assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    }
    client.advance_clock(Duration::from_secs(1)).await.unwrap();
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED, "the 8th within 2 s");
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::TOO_MANY_REQUESTS, "the 9th within 2 s");

    // 60 per 30 s: 4 every 2 s fit the short windows, the 61st is refused.
    client.reset().await.unwrap();
    sim.send_spaced(&token, 60, 4, Duration::from_secs(2)).await;
    client.advance_clock(Duration::from_secs(1)).await.unwrap();
    let (status, _, headers) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "61 within 30 s");
    assert!(headers.contains_key("retry-after"));
    assert!(client.stats().await.unwrap().throttled_total >= 1);
}

#[tokio::test]
async fn throttling_per_hour_and_per_app_per_tenant_with_configurable_limits() {
    let (sim, client, token) = Sim::with_token().await;
    // The hour window: 2 per second for 900 s fills 1800.
    sim.send_spaced(&token, 1800, 2, Duration::from_secs(1)).await;
    client.advance_clock(Duration::from_secs(1)).await.unwrap();
    let (status, _, headers) = sim.send(Some(&token), CONV, &message()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "1801 within the hour");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(wait > 30, "the hour window decides: {wait}");

    // 50 per second per app per tenant, across conversations.
    client.reset().await.unwrap();
    for i in 0..51 {
        client
            .put_conversation(&Conversation {
                id: format!("19:c{i}@thread.tacv2"),
                tenant_id: "t1".into(),
                kind: ConversationKind::Channel,
                roster: ["app1".to_owned()].into(),
                blocked: false,
                user_id: None,
            })
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert_eq!(sim.send(Some(&token), &format!("19:c{i}@thread.tacv2"), &message()).await.0, StatusCode::CREATED);
    }
    assert_eq!(sim.send(Some(&token), "19:c50@thread.tacv2", &message()).await.0, StatusCode::TOO_MANY_REQUESTS);

    // Limits can be changed at run time.
    let limits = sim::Limits { per_conversation: vec![sim::Window { limit: 2, per_secs: 1 }], per_app_tenant: vec![] };
    client.set_throttling(&sim::Throttling { enabled: true, limits: Some(limits) }).await.unwrap();
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::TOO_MANY_REQUESTS);

    // Switched off (for benchmarks), everything passes.
    client.set_throttling(&sim::Throttling { enabled: false, limits: None }).await.unwrap();
    for _ in 0..20 {
        assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    }
}

#[tokio::test]
async fn injected_statuses_hangs_resets_and_latency() {
    let (sim, client, token) = Sim::with_token().await;
    let status = |status: u16, retry_after: Option<u64>| Action::Status { status, code: None, retry_after };
    let sequence = vec![
        status(412, None),
        status(429, Some(7)),
        status(500, None),
        status(502, None),
        status(503, None),
        status(504, None),
        Action::Pass,
    ];
    client.add_fault(&Rule { route: Route::Send, conversation_id: Some(CONV.into()), sequence, ..Default::default() }).await.unwrap();
    let expected = [
        (412, "PreconditionFailed"),
        (429, "Throttled"),
        (500, "InternalServerError"),
        (502, "BadGateway"),
        (503, "ServiceUnavailable"),
        (504, "GatewayTimeout"),
    ];
    for (want, want_code) in expected {
        let (got, body, headers) = sim.send(Some(&token), CONV, &message()).await;
        assert_eq!((got.as_u16(), code(&body)), (want, want_code));
        if want == 429 {
            assert_eq!(headers["retry-after"], "7");
        }
    }
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED, "a pass, then the rule is spent");
    assert!(client.faults().await.unwrap().is_empty());

    // A hang past the client's timeout, then a connection reset.
    client
        .add_fault(&Rule { route: Route::Send, sequence: vec![Action::Hang { ms: 5_000 }, Action::Reset], ..Default::default() })
        .await
        .unwrap();
    let err = sim.post_message(&token).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let err = sim.post_message(&token).await.unwrap_err();
    assert!(!err.is_timeout() && (err.is_request() || err.is_connect() || err.is_body()), "a transport error: {err:?}");
    assert_eq!(client.stats().await.unwrap().connections_reset, 1);

    // Token endpoint faults.
    client.add_fault(&Rule { route: Route::Token, sequence: vec![status(503, None)], ..Default::default() }).await.unwrap();
    let form = [("grant_type", "client_credentials"), ("client_id", "app1"), ("client_secret", "s1"), ("scope", SCOPE)];
    assert_eq!(sim.token_response("botframework.com", &form).await.0, StatusCode::SERVICE_UNAVAILABLE);

    // Fixed latency.
    client.set_latency(Latency::Fixed { ms: 150 }).await.unwrap();
    let started = Instant::now();
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(150));
    // Invalid rules are refused.
    assert!(client.add_fault(&Rule::default()).await.is_err());
}

/// The Workflows webhook: 202 with a run id for a signed card, the codes a
/// missing or wrong signature, a deleted flow, a refused card and a large
/// body get, and the same fault injection as the Connector's routes.
#[tokio::test]
async fn workflows_webhooks_answer_as_power_automate_does() {
    let sim = Sim::start().await;
    let client = sim.running.client();
    let flow = Workflow { id: "wf1".into(), sig: "sig1".into(), tenant_id: "t1".into(), conversation_id: CONV.into(), disabled: false };
    let url = sim.running.workflow_url(&flow);
    let post = |url: String, body: Value| {
        let http = sim.http.clone();
        async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            let (status, headers) = (response.status(), response.headers().clone());
            (status, response.json::<Value>().await.unwrap_or(Value::Null), headers)
        }
    };
    let (status, _, headers) = post(url.clone(), message()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let run = headers["x-ms-workflow-run-id"].to_str().unwrap().to_owned();
    let records = client.activities(&ActivityFilter::default()).await.unwrap();
    let record = records.last().unwrap();
    assert_eq!((record.route, record.activity_id.as_str(), record.conversation_id.as_str()), (Route::Workflow, run.as_str(), CONV));

    let (status, body, _) = post(url.replace("sig=sig1", "sig=forged"), message()).await;
    assert_eq!((status.as_u16(), code(&body)), (401, "DirectApiInvalidAuthorizationSignature"));
    let (status, body, _) = post(url.replace("&sig=sig1", ""), message()).await;
    assert_eq!((status.as_u16(), code(&body)), (401, "DirectApiAuthorizationRequired"));
    let (status, body, _) = post(url.clone(), json!({"type": "message"})).await;
    assert_eq!((status.as_u16(), code(&body)), (400, "InvalidRequestContent"));
    let mut big = message();
    big["attachments"][0]["content"]["body"][0]["text"] = json!("x".repeat(200 * 1024));
    let (status, body, _) = post(url.clone(), big).await;
    assert_eq!((status.as_u16(), code(&body)), (413, "RequestEntityTooLarge"));

    let throttled = Action::Status { status: 429, code: None, retry_after: Some(3) };
    let rule = Rule { route: Route::Workflow, conversation_id: Some("wf1".into()), sequence: vec![throttled], ..Default::default() };
    client.add_fault(&rule).await.unwrap();
    let (status, _, headers) = post(url.clone(), message()).await;
    assert_eq!((status.as_u16(), headers["retry-after"].to_str().unwrap()), (429, "3"));

    client.put_workflow(&Workflow { disabled: true, ..flow.clone() }).await.unwrap();
    let (status, body, _) = post(url.clone(), message()).await;
    assert_eq!((status.as_u16(), code(&body)), (404, "WorkflowNotFound"), "a flow turned off");
    client.delete_workflow("wf1").await.unwrap();
    let (status, _, _) = post(url.clone(), message()).await;
    assert_eq!(status.as_u16(), 404, "a deleted flow");
    assert_eq!(client.stats().await.unwrap().activities_total, 1, "only the first post was accepted");
}

#[tokio::test]
async fn probabilistic_faults_are_reproducible_from_the_seed() {
    async fn run(seed: u64) -> Vec<u16> {
        let sim = Sim::start_with(sim::Options { seed, throttling: false, ..Default::default() }).await;
        let rule = Rule {
            route: Route::Send,
            probability: Some(0.3),
            action: Some(Action::Status { status: 503, code: None, retry_after: None }),
            ..Default::default()
        };
        sim.running.client().add_fault(&rule).await.unwrap();
        let token = sim.token("app1", "s1", "botframework.com").await;
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(sim.send(Some(&token), CONV, &message()).await.0.as_u16());
        }
        statuses
    }
    let first = run(42).await;
    assert_eq!(first, run(42).await);
    assert!(first.contains(&503) && first.contains(&201));
}

#[tokio::test]
async fn inspection_and_admin_api() {
    let sim = Sim::start().await;
    let client = sim.running.client();
    client.health().await.unwrap();
    let token = sim.token("app1", "s1", "botframework.com").await;
    let single = sim.token("single", "s2", "t1").await;
    sim.send(Some(&token), CONV, &json!({"type": "message", "text": "from app1"})).await;
    sim.send(Some(&single), CONV, &json!({"type": "message", "text": "from single"})).await;

    let all = client.all_activities().await.unwrap();
    assert_eq!(all.len(), 2);
    let by_single = client.activities(&ActivityFilter { app_id: Some("single".into()), ..Default::default() }).await.unwrap();
    assert_eq!(by_single.len(), 1);
    assert_eq!(by_single[0].authority, "t1");
    assert_eq!(by_single[0].body["text"], "from single");
    let after = client.activities(&ActivityFilter { after_seq: Some(all[0].seq), ..Default::default() }).await.unwrap();
    assert_eq!(after.len(), 1);

    let stats = client.stats().await.unwrap();
    assert_eq!(stats.activities_total, 2);
    assert_eq!(stats.activities_by_app.get("app1"), Some(&1));
    assert_eq!(stats.responses_by_status.get(&201), Some(&2));

    client.reset().await.unwrap();
    assert!(client.all_activities().await.unwrap().is_empty());
    assert_eq!(client.stats().await.unwrap().requests_total, 0);
    // Tokens survive a plain reset.
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::CREATED);

    // The world can be replaced and read back.
    let mut world = client.world().await.unwrap();
    world.conversations.retain(|c| c.id != CONV);
    client.set_world(&world).await.unwrap();
    assert_eq!(sim.send(Some(&token), CONV, &message()).await.0, StatusCode::NOT_FOUND);
    assert_eq!(client.world().await.unwrap(), world);
    client.put_user(&User { id: "29:carol".into(), tenant_id: "t2".into(), installed_apps: Default::default() }).await.unwrap();
    assert!(client.world().await.unwrap().users.iter().any(|u| u.id == "29:carol"));
}
