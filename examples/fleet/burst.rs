//! The burst: how a fleet of workers behaves next to one careful worker.
//! Shared by `tests/it/fleetwide.rs` (4 worker processes, one started, one
//! SIGTERMed and one SIGKILLed during the run) and the bench (1, 2 and 4
//! workers), so that both check the same rules.
//!
//! The mix: `cold` jobs spread over the conversations of 50 tenants (each
//! its own organization, bot app and tenant), plus `hot` jobs split evenly
//! over 5 hot conversations of 2 hot tenants, interleaved at random and published as
//! fast as the broker confirms. Each conversation's jobs are numbered in
//! publish order.
//!
//! What must hold: 429s at most 1% of the Connector requests; every job
//! posted, once, with the ledger agreeing (a job in flight on a worker that
//! was SIGKILLed may be posted twice: docs/producers.md, "Order and
//! duplicates"); per conversation, posts in publish order except for jobs
//! that took a retry tier or were taken over after a kill; every hot
//! conversation finished within 20% of the earliest time Teams' windows
//! allow (computed from the windows, printed beside the measured time).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald::mongo::{DeliveryDoc, DeliveryState};
use serde_json::json;

use super::{INTEGRATION, conversation, organization};

pub const TENANTS: usize = 50;
pub const PER_TENANT: usize = 40;
/// (organization, conversation) of the hot conversations: 3 in one tenant, 2 in another.
pub const HOT: [(usize, usize); 5] = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)];

/// One job of the burst.
pub struct BurstJob {
    pub job_id: String,
    pub conversation: String,
    /// Its place among its conversation's jobs, in publish order.
    pub seq: usize,
    pub body: Vec<u8>,
}

/// The jobs in publish order, over the first `tenants` organizations (50 in
/// the test and the full bench; fewer in the smoke bench's smaller world).
pub fn plan(cold: usize, hot: usize, tenants: usize, seed: u64) -> Vec<BurstJob> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cold_conversations: Vec<(usize, usize)> =
        (0..tenants.max(2)).flat_map(|o| (0..PER_TENANT).map(move |c| (o, c))).filter(|oc| !HOT.contains(oc)).collect();
    let mut next: HashMap<String, usize> = HashMap::new();
    let (mut hot_left, mut cold_left) = (hot, cold);
    let mut jobs = Vec::with_capacity(hot + cold);
    while hot_left + cold_left > 0 {
        let is_hot = rng.usize(..hot_left + cold_left) < hot_left;
        let (org, c) = if is_hot {
            // The same number into each hot conversation (200 each of 1,000).
            hot_left -= 1;
            HOT[hot_left % HOT.len()]
        } else {
            cold_left -= 1;
            cold_conversations[rng.usize(..cold_conversations.len())]
        };
        let conversation = conversation(org, c);
        let seq = next.entry(conversation.clone()).or_insert(0);
        let job_id = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "version": 1, "job_id": job_id, "organization_id": organization(org), "integration_id": INTEGRATION,
            "recipient": {"conversation_id": conversation},
            "message": {"title": format!("burst {job_id}"), "text": format!("#{seq} of this conversation"), "severity": "info"},
            "created_at": Utc::now(),
        });
        jobs.push(BurstJob { job_id, conversation, seq: *seq, body: serde_json::to_vec(&body).expect("JSON") });
        *seq += 1;
    }
    jobs
}

/// The earliest time the `n`-th post into one conversation can be made when
/// the first goes at 0, by Teams' windows (teams-sim's own arithmetic).
pub fn earliest(n: usize, limits: &teams_limits::Limits) -> Duration {
    let mut throttle = teams_limits::Throttle::new(true, limits.clone());
    let start = std::time::Instant::now();
    let mut at = start;
    for _ in 0..n {
        while let Err(wait) = throttle.admit("app", "tenant", "conversation", at) {
            at += wait;
        }
    }
    at - start
}

/// One hot conversation's figures.
#[derive(Debug)]
pub struct Hot {
    pub conversation: String,
    pub jobs: usize,
    /// From the first publish to its last post.
    pub finished: Duration,
    pub bound: Duration,
    /// Pauses of more than 5 s between two posts: (seconds after the start, length).
    pub pauses: Vec<(f64, f64)>,
    /// Times of its posts, in seconds after the start.
    pub posts: Vec<f64>,
}

impl Hot {
    /// Posts in each 10 s from the start (how the conversation's pace went).
    pub fn per_10s(&self) -> Vec<usize> {
        let mut buckets = vec![0; (self.posts.iter().copied().fold(0.0, f64::max) / 10.0) as usize + 1];
        for at in &self.posts {
            buckets[(*at / 10.0) as usize] += 1;
        }
        buckets
    }
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub jobs: usize,
    pub connector_requests: u64,
    pub throttled: u64,
    pub missing: usize,
    /// Jobs posted more than once, and of those the ones not excused by a kill.
    pub posted_twice: usize,
    pub posted_twice_unexcused: usize,
    pub ledger_not_sent: usize,
    pub ledger_disagrees: usize,
    /// Jobs that took a retry tier or were taken over after a kill (may be out of order).
    pub excused: usize,
    pub out_of_order: Vec<String>,
    pub hot: Vec<Hot>,
    /// From the first publish to the last post of a job outside the hot
    /// conversations: while they drain, the hot ones share the machine.
    pub cold_finished: Option<Duration>,
}

impl Verdict {
    pub fn throttled_share(&self) -> f64 {
        self.throttled as f64 / self.connector_requests.max(1) as f64
    }

    /// The rules broken, in words (empty: all hold).
    pub fn broken(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if self.throttled_share() > 0.01 {
            broken.push(format!("{} of {} Connector requests were 429 (more than 1%)", self.throttled, self.connector_requests));
        }
        if self.missing > 0 {
            broken.push(format!("{} jobs never posted", self.missing));
        }
        if self.posted_twice_unexcused > 0 {
            broken.push(format!("{} jobs posted twice that no kill explains", self.posted_twice_unexcused));
        }
        if self.ledger_not_sent > 0 || self.ledger_disagrees > 0 {
            broken.push(format!(
                "ledger: {} not sent, {} with an activity id teams-sim never gave",
                self.ledger_not_sent, self.ledger_disagrees
            ));
        }
        if !self.out_of_order.is_empty() {
            broken.push(format!(
                "{} posts out of order: {:?}",
                self.out_of_order.len(),
                &self.out_of_order[..self.out_of_order.len().min(5)]
            ));
        }
        for hot in &self.hot {
            if hot.finished.as_secs_f64() > hot.bound.as_secs_f64() * 1.2 {
                broken.push(format!(
                    "{} finished after {:.1?}, more than 20% over the earliest {:.1?}",
                    hot.conversation, hot.finished, hot.bound
                ));
            }
        }
        broken
    }

    pub fn summary(&self) -> String {
        let hot: Vec<String> = self
            .hot
            .iter()
            .map(|h| {
                let pauses: Vec<String> = h.pauses.iter().map(|(at, gap)| format!("{gap:.0} s at {at:.0} s")).collect();
                format!(
                    "{} jobs in {:.1} s (earliest {:.1} s, {:.2}×; first post at {:.1} s; posts per 10 s: {:?}; pauses over 5 s: {})",
                    h.jobs,
                    h.finished.as_secs_f64(),
                    h.bound.as_secs_f64(),
                    h.finished.as_secs_f64() / h.bound.as_secs_f64(),
                    h.posts.iter().copied().fold(f64::INFINITY, f64::min),
                    h.per_10s(),
                    if pauses.is_empty() { "none".into() } else { pauses.join(", ") }
                )
            })
            .collect();
        format!(
            "{} jobs ({}); 429: {} of {} Connector requests ({:.2}%); posted twice: {} (killed in flight); excused from order: {}; out of order: {}; hot: {}",
            self.jobs,
            self.cold_finished
                .map_or("no other jobs".into(), |at| format!("the others all posted {:.1} s after the first publish", at.as_secs_f64())),
            self.throttled,
            self.connector_requests,
            100.0 * self.throttled_share(),
            self.posted_twice,
            self.excused,
            self.out_of_order.len(),
            hot.join("; ")
        )
    }
}

/// Check the burst: `records` are teams-sim's posts, `started` the moment
/// the first job was published, `taken_over` the jobs whose claim a worker
/// took over after a kill (from the workers' logs).
pub fn check(
    jobs: &[BurstJob],
    started: DateTime<Utc>,
    records: &[teams_sim::ActivityRecord],
    stats: &teams_sim::Stats,
    ledger: &[DeliveryDoc],
    taken_over: &HashSet<String>,
    limits: &teams_limits::Limits,
) -> Verdict {
    let by_id: HashMap<&str, &BurstJob> = jobs.iter().map(|j| (j.job_id.as_str(), j)).collect();
    let tokens: u64 = stats.tokens_issued.values().sum();
    let mut verdict = Verdict {
        jobs: jobs.len(),
        connector_requests: stats.requests_total.saturating_sub(tokens),
        throttled: stats.throttled_total,
        ..Default::default()
    };
    // A job that went through a retry tier (its ledger history says so) or
    // was taken over after a kill may be posted out of order.
    let mut excused: HashSet<&str> = taken_over.iter().map(String::as_str).collect();
    for record in ledger {
        let tiered = record.history.iter().any(|a| a.outcome == "retrying" && a.reason.as_deref() != Some("retried_in_process"));
        if tiered {
            excused.insert(record.job_id.as_str());
        }
    }
    verdict.excused = excused.iter().filter(|id| by_id.contains_key(*id)).count();

    let mut sorted: Vec<&teams_sim::ActivityRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.seq);
    let mut posts: HashMap<&str, usize> = HashMap::new();
    let mut last_post: HashMap<&str, DateTime<Utc>> = HashMap::new();
    let mut pauses: HashMap<&str, Vec<(f64, f64)>> = HashMap::new();
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut highest: HashMap<&str, usize> = HashMap::new();
    let mut activity_ids = HashSet::new();
    let hot_names: HashSet<String> = HOT.iter().map(|(org, c)| conversation(*org, *c)).collect();
    for record in sorted {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap_or_default();
        let Some(job) = title.strip_prefix("burst ").and_then(|id| by_id.get(id)) else { continue };
        activity_ids.insert(record.activity_id.as_str());
        let count = posts.entry(job.job_id.as_str()).or_insert(0);
        *count += 1;
        if *count > 1 {
            continue;
        }
        let after = (record.received_at - started).to_std().unwrap_or_default();
        if !hot_names.contains(&job.conversation) {
            verdict.cold_finished = verdict.cold_finished.max(Some(after));
        }
        times.entry(job.conversation.as_str()).or_default().push(after.as_secs_f64());
        if let Some(before) = last_post.insert(job.conversation.as_str(), record.received_at) {
            let gap = (record.received_at - before).to_std().unwrap_or_default().as_secs_f64();
            if gap > 5.0 {
                let at = (before - started).to_std().unwrap_or_default().as_secs_f64();
                pauses.entry(job.conversation.as_str()).or_default().push((at, gap));
            }
        }
        if excused.contains(job.job_id.as_str()) {
            continue;
        }
        let high = highest.entry(job.conversation.as_str()).or_insert(0);
        if job.seq < *high {
            verdict.out_of_order.push(format!("{} #{} after #{}", job.conversation, job.seq, *high));
        }
        *high = (*high).max(job.seq);
    }
    verdict.missing = jobs.iter().filter(|j| !posts.contains_key(j.job_id.as_str())).count();
    let twice: Vec<&str> = posts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    verdict.posted_twice = twice.len();
    verdict.posted_twice_unexcused = twice.iter().filter(|id| !taken_over.contains(**id)).count();
    let ledger_ids: HashMap<&str, &DeliveryDoc> = ledger.iter().map(|d| (d.job_id.as_str(), d)).collect();
    verdict.ledger_not_sent =
        jobs.iter().filter(|j| ledger_ids.get(j.job_id.as_str()).is_none_or(|d| d.state != DeliveryState::Sent)).count();
    verdict.ledger_disagrees = ledger
        .iter()
        .filter(|d| by_id.contains_key(d.job_id.as_str()))
        .filter(|d| d.activity_id.as_deref().is_none_or(|a| !activity_ids.contains(a)))
        .count();
    for (org, c) in super::burst::HOT {
        let name = conversation(org, c);
        let n = jobs.iter().filter(|j| j.conversation == name).count();
        let finished = last_post.get(name.as_str()).map_or(Duration::MAX, |at| (*at - started).to_std().unwrap_or_default());
        let pauses = pauses.remove(name.as_str()).unwrap_or_default();
        let posts = times.remove(name.as_str()).unwrap_or_default();
        verdict.hot.push(Hot { conversation: name, jobs: n, finished, bound: earliest(n, limits), pauses, posts });
    }
    verdict
}
