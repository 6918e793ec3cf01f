//! A fleet of organizations, and the poison soak run against it. Shared by
//! the bench (`examples/bench.rs`, full scale) and `tests/it/soak.rs` (a
//! smaller run in `make test`), so that both check the same thing.
//!
//! The soak: jobs of many organizations, a share of them hostile (a 150 KB
//! value in each field, deep JSON nesting, invalid UTF-8, wrong content
//! types and encodings, forged herald headers, recipients of other
//! organizations, oversized producer headers), interleaved with good jobs
//! whose Connector answers include 429s with an HTTP-date `Retry-After`,
//! 503s, hangs, resets and 2xx with broken bodies.
//!
//! What must hold: every good job posted exactly once (or `unconfirmed`
//! where its answer was ambiguous: then dead-lettered once, never resent);
//! every hostile job dead-lettered exactly once, with the reason it earns
//! and a bounded header set; nothing posted for a hostile job.

pub mod burst;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald::dlq::DeadLetter;
use herald::mongo::{BotDoc, ConversationDoc, DeliveryState, OrgIntegrationDoc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use teams_sim::{self as sim, Action, Bot, Conversation, Route, Rule, Tenant, World};

pub const INTEGRATION: &str = "teams-main";
const BIG: usize = 150 * 1024;

pub fn organization(org: usize) -> String {
    format!("org-{org}")
}

pub fn conversation(org: usize, c: usize) -> String {
    format!("19:org{org}-c{c}@thread.tacv2")
}

/// `orgs` organizations on one integration, each with its own bot app,
/// tenant and `per_org` channels: the simulator's world and herald's records.
pub fn fleet(orgs: usize, per_org: usize, service_url: &str) -> (World, Vec<OrgIntegrationDoc>, Vec<ConversationDoc>) {
    let mut world = World::default();
    let mut integrations = Vec::new();
    let mut conversations = Vec::new();
    for org in 0..orgs {
        let (app, tenant, secret) = (format!("app-{org}"), format!("tenant-{org}"), format!("secret-{org}"));
        world.tenants.push(Tenant { id: tenant.clone(), name: None });
        world.bots.push(Bot { app_id: app.clone(), app_secret: secret.clone(), authority: "botframework.com".into(), disabled: false });
        for c in 0..per_org {
            world.conversations.push(Conversation {
                id: conversation(org, c),
                tenant_id: tenant.clone(),
                kind: sim::ConversationKind::Channel,
                roster: [app.clone()].into(),
                blocked: false,
                user_id: None,
            });
            conversations.push(ConversationDoc::channel(&organization(org), INTEGRATION, &conversation(org, c)));
        }
        integrations.push(OrgIntegrationDoc::active(
            &organization(org),
            INTEGRATION,
            &tenant,
            service_url,
            BotDoc::with_secret(&app, &secret),
        ));
    }
    (world, integrations, conversations)
}

/// A good job's body: its title is `soak <job id>`.
pub fn good_job(org: usize, conversation: &str) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "version": 1, "job_id": id, "organization_id": organization(org), "integration_id": INTEGRATION,
        "recipient": {"conversation_id": conversation},
        "message": {"title": format!("soak {id}"), "text": "CPU above 95% for 5 minutes on db-7", "severity": "warning",
                    "facts": [{"name": "host", "value": "db-7"}]},
        "created_at": Utc::now(),
    });
    (id, serde_json::to_vec(&body).expect("JSON"))
}

/// What a job of the soak should come to.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    Good,
    Dead(&'static str),
}

/// One message of the soak, ready to publish.
pub struct Planned {
    pub message_id: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub expect: Expect,
}

fn properties(message_id: &str) -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_message_id(message_id.into())
}

/// A hostile message of kind `kind` (0..15), addressed as if from `org`.
fn hostile(kind: usize, n: usize, org: usize, other: usize) -> Planned {
    let message_id = format!("hostile-{n}");
    let (_, good) = good_job(org, &conversation(org, 0));
    let mut value: serde_json::Value = serde_json::from_slice(&good).expect("JSON");
    let big = "x".repeat(BIG);
    let mut props = properties(&message_id);
    let mut set = |pointer: &str, new: serde_json::Value| *value.pointer_mut(pointer).expect("a field of the job") = new;
    let expect = match kind {
        0 => {
            set("/job_id", json!(big));
            Expect::Dead("invalid_job")
        }
        1 => {
            set("/organization_id", json!(big));
            Expect::Dead("org_integration_not_found")
        }
        2 => {
            set("/integration_id", json!(big));
            Expect::Dead("org_integration_not_found")
        }
        3 => {
            set("/recipient/conversation_id", json!(big));
            Expect::Dead("recipient_not_in_organization")
        }
        4 => {
            set("/message/title", json!(big));
            Expect::Dead("payload_too_large")
        }
        5 => {
            set("/message/text", json!(big));
            Expect::Dead("payload_too_large")
        }
        6 => {
            set("/message/facts/0/value", json!(big));
            Expect::Dead("payload_too_large")
        }
        7 => {
            // 5,000 levels of nesting: past the parser's recursion limit.
            let body = format!("{{\"version\":1,\"organization_id\":\"org-{org}\",\"x\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
            return Planned { message_id, body: body.into_bytes(), properties: props, expect: Expect::Dead("invalid_job") };
        }
        8 => {
            let mut body = serde_json::to_vec(&value).expect("JSON");
            let at = body.windows(4).position(|w| w == b"soak").expect("the title");
            body[at] = 0xff;
            return Planned { message_id, body, properties: props, expect: Expect::Dead("invalid_job") };
        }
        9 => {
            props = props.with_content_type("text/plain".into());
            Expect::Dead("invalid_job")
        }
        10 => {
            props = props.with_content_encoding("gzip".into());
            Expect::Dead("invalid_job")
        }
        11 | 12 => {
            set("/recipient/conversation_id", json!(conversation(other, 0)));
            if kind == 11 {
                let mut forged = FieldTable::default();
                forged.insert("x-herald-attempts".into(), AMQPValue::LongLongInt(i64::MAX));
                forged.insert("x-herald-retry-hops".into(), AMQPValue::LongString("99".into()));
                forged.insert("x-herald-replays".into(), AMQPValue::LongLongInt(-1));
                forged.insert("x-herald-reason".into(), AMQPValue::LongString("teams_forbidden".into()));
                forged.insert("x-herald-organization-id".into(), AMQPValue::LongString(organization(other).into()));
                props = props.with_headers(forged);
            }
            Expect::Dead("recipient_not_in_organization")
        }
        13 => {
            return Planned { message_id, body: b"[1, 2, 3]".to_vec(), properties: props, expect: Expect::Dead("invalid_job") };
        }
        _ => {
            set("/organization_id", json!("org-that-does-not-exist"));
            let mut notes = FieldTable::default();
            notes.insert("x-producer-notes".into(), AMQPValue::LongString("n".repeat(100 * 1024).into()));
            props = props.with_headers(notes);
            Expect::Dead("org_integration_not_found")
        }
    };
    Planned { message_id, body: serde_json::to_vec(&value).expect("JSON"), properties: props, expect }
}

/// `jobs` messages over `orgs` organizations, `hostile_share` of them
/// hostile (each kind in turn), shuffled.
pub fn plan(rng: &mut fastrand::Rng, jobs: usize, hostile_share: f64, orgs: usize, per_org: usize) -> Vec<Planned> {
    let hostile_jobs = (jobs as f64 * hostile_share).round() as usize;
    let mut planned: Vec<Planned> = (0..hostile_jobs)
        .map(|n| {
            let org = rng.usize(..orgs);
            hostile(n % 15, n, org, (org + 1 + rng.usize(..orgs - 1)) % orgs)
        })
        .collect();
    planned.extend((hostile_jobs..jobs).map(|_| {
        let org = rng.usize(..orgs);
        let (id, body) = good_job(org, &conversation(org, rng.usize(..per_org)));
        Planned { properties: properties(&id), message_id: id, body, expect: Expect::Good }
    }));
    rng.shuffle(&mut planned);
    planned
}

/// The Connector answers good jobs meet: 429 with an HTTP-date
/// `Retry-After`, 503, hangs past the request timeout, resets, broken 2xx.
pub fn faults(hang_ms: u64) -> Vec<Rule> {
    let send =
        |probability, action| Rule { route: Route::Send, probability: Some(probability), action: Some(action), ..Default::default() };
    vec![
        send(0.02, Action::RetryAt { status: 429, secs: 1 }),
        send(0.02, Action::Status { status: 503, code: None, retry_after: None }),
        send(0.002, Action::Hang { ms: hang_ms }),
        send(0.002, Action::Reset),
        send(0.002, Action::Garble),
    ]
}

/// What a soak came to.
#[derive(Debug, Default)]
pub struct Verdict {
    pub delivered: usize,
    pub unconfirmed: usize,
    pub hostile_dead_lettered: usize,
    /// Publish-to-receipt latency of the good jobs posted once, in ms, sorted.
    pub latencies_ms: Vec<f64>,
    /// Everything that broke a rule, one line each (empty when all held).
    pub problems: Vec<String>,
}

/// Whether a soak has settled, from the ledger and the dead-letter queue's
/// length: every good job's record is final (sent, or dead-lettered, as an
/// unconfirmed one is), and the queue holds a dead letter for each hostile
/// job and each good one dead-lettered. (A sum of posts and dead letters
/// counts an unconfirmed job twice, and called soaks settled while the worker
/// still held a few jobs.)
pub fn settled(planned: &[Planned], ledger: &[herald::mongo::DeliveryDoc], dead_letters: usize) -> bool {
    let good: std::collections::HashSet<&str> =
        planned.iter().filter(|p| p.expect == Expect::Good).map(|p| p.message_id.as_str()).collect();
    let (mut sent, mut dead) = (0, 0);
    for record in ledger.iter().filter(|d| good.contains(d.job_id.as_str())) {
        match record.state {
            DeliveryState::Sent => sent += 1,
            // Only `Unconfirmed` is expected of a good job; `check` says what else broke.
            DeliveryState::Unconfirmed | DeliveryState::DeadLettered => dead += 1,
            DeliveryState::Sending | DeliveryState::Retrying => {}
        }
    }
    sent + dead == good.len() && dead_letters >= planned.len() - good.len() + dead
}

/// Check a finished soak against the simulator's record, the dead-letter
/// queue and the ledger (job id → state).
pub fn check(
    planned: &[Planned],
    published_at: &HashMap<String, DateTime<Utc>>,
    records: &[sim::ActivityRecord],
    letters: &[DeadLetter],
    ledger: &HashMap<String, DeliveryState>,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut posts: HashMap<&str, Vec<&sim::ActivityRecord>> = HashMap::new();
    for record in records {
        if let Some(id) = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().and_then(|t| t.strip_prefix("soak ")) {
            posts.entry(id).or_default().push(record);
        }
    }
    let mut dead: HashMap<&str, Vec<&DeadLetter>> = HashMap::new();
    for letter in letters {
        dead.entry(letter.message_id.as_deref().unwrap_or_default()).or_default().push(letter);
    }
    for job in planned {
        let id = job.message_id.as_str();
        let (posted, letters) = (posts.get(id).map_or(&[][..], Vec::as_slice), dead.get(id).map_or(&[][..], Vec::as_slice));
        let reasons: Vec<_> = letters.iter().map(|l| l.reason.as_deref().unwrap_or("-")).collect();
        let mut problem = |what: String| verdict.problems.push(format!("{id}: {what}"));
        match &job.expect {
            Expect::Good => match (posted.len(), reasons.as_slice(), ledger.get(id)) {
                (1, [], Some(DeliveryState::Sent)) => {
                    verdict.delivered += 1;
                    if let Some(at) = published_at.get(id) {
                        let ms = (posted[0].received_at - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                        verdict.latencies_ms.push(ms);
                    }
                }
                (0 | 1, ["delivery_unconfirmed"], Some(DeliveryState::Unconfirmed)) => verdict.unconfirmed += 1,
                (n, reasons, state) => problem(format!("a good job posted {n} times, dead letters {reasons:?}, ledger {state:?}")),
            },
            Expect::Dead(reason) => {
                if !posted.is_empty() {
                    problem(format!("a hostile job was posted {} times", posted.len()));
                } else if reasons.as_slice() != [*reason] {
                    problem(format!("a hostile job should be one dead letter {reason}, got {reasons:?}"));
                } else if let Some(too_big) = unbounded(letters[0]) {
                    problem(too_big);
                } else {
                    verdict.hostile_dead_lettered += 1;
                }
            }
        }
    }
    verdict.latencies_ms.sort_by(f64::total_cmp);
    verdict
}

/// Why a dead letter's headers are not bounded, if they are not.
fn unbounded(letter: &DeadLetter) -> Option<String> {
    let total: usize = letter.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if let Some((key, value)) = letter.headers.iter().find(|(_, v)| v.len() > 1024 + 64) {
        return Some(format!("header {key} is {} bytes", value.len()));
    }
    (total >= 16 * 1024).then(|| format!("{total} bytes of headers"))
}

/// The `p`th percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
