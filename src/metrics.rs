//! One metrics struct with intent-named methods, rendered in the Prometheus
//! text format. Labels stay low-cardinality: outcomes, reasons, status
//! classes, queue kinds; an organization only when the settings name it
//! (`metrics.organizations`, an opt-in list); never a job id.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::outcome::Reason;

/// Latency buckets in seconds (job and request durations).
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];

struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0), sum_micros: AtomicU64::new(0) }
    }

    fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bucket, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bucket}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The outcome of a job, as counted.
#[derive(Debug, Clone, Copy)]
pub enum JobOutcome {
    Delivered,
    AlreadySent,
    Retried,
    DeadLettered,
}

const OUTCOMES: [&str; 4] = ["delivered", "already_sent", "retried", "dead_lettered"];
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "transport"];

/// The queues whose depth is polled.
#[derive(Debug, Clone, Copy)]
pub enum QueueKind {
    Work,
    Retry,
    Dead,
}

const QUEUES: [&str; 3] = ["work", "retry", "dead"];

pub struct Metrics {
    jobs: [AtomicU64; 4],
    /// Messages ready in each queue kind at the last poll (-1: not polled yet).
    queue_depths: [AtomicI64; 3],
    /// The oldest job (by `created_at`) taken in the current and the last
    /// poll window, in milliseconds: the age of the work queue's head.
    oldest_taken_ms: AtomicU64,
    oldest_last_window_ms: AtomicU64,
    /// Outcomes per organization, for the organizations the settings name
    /// (`metrics.organizations`); every other organization counts as "other".
    per_org: Vec<(String, [AtomicU64; 4])>,
    dead_letters: [AtomicU64; Reason::ALL.len()],
    teams_requests: [AtomicU64; 5],
    job_seconds: Histogram,
    request_seconds: Histogram,
    in_flight: AtomicI64,
    recipients_corrected: AtomicU64,
    conversations_quarantined: AtomicU64,
    consumer_active: AtomicBool,
    /// `fleet.shards`, and the router and shards this worker holds.
    fleet_shards: AtomicU64,
    router_held: AtomicBool,
    shards_held: AtomicU64,
    events: [AtomicU64; EVENTS.len()],
}

/// Counters of things that should be rare, each with its name and help.
const EVENTS: [(&str, &str); 8] = [
    (
        "herald_deliveries_unconfirmed_total",
        "Sends whose outcome is unknown (timeout or reset after the request was written, unreadable 2xx): never resent automatically.",
    ),
    ("herald_ledger_takeovers_total", "Claims taken over from a delivery whose lease ran out mid-send (a possible second post)."),
    ("herald_ledger_lease_lost_total", "Sends recorded after another delivery had taken over the claim (a possible second post)."),
    ("herald_ledger_write_failures_total", "Sends Teams accepted that the ledger could not record."),
    ("herald_forged_headers_total", "Messages whose x-herald-* headers herald did not write (ignored)."),
    ("herald_internal_errors_total", "Jobs whose processing panicked (dead-lettered internal_error)."),
    ("herald_publish_retries_total", "Publishes of a job's outcome tried again after healing the channel or topology."),
    ("herald_broker_reconnects_total", "Times the worker lost its broker connection and reconnected."),
];

#[derive(Clone, Copy)]
enum Event {
    Unconfirmed,
    TakenOver,
    LeaseLost,
    LedgerWriteFailed,
    ForgedHeaders,
    InternalError,
    PublishRetried,
    BrokerReconnect,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_organizations(&[])
    }
}

impl Metrics {
    /// Metrics that also count the outcomes of these organizations (and of
    /// "other") by name: an opt-in list, so that labels stay few.
    pub fn with_organizations(organizations: &[String]) -> Self {
        let counters = || std::array::from_fn(|_| AtomicU64::new(0));
        let mut per_org: Vec<(String, [AtomicU64; 4])> = organizations.iter().map(|o| (o.clone(), counters())).collect();
        if !per_org.is_empty() {
            per_org.push(("other".into(), counters()));
        }
        Self {
            queue_depths: std::array::from_fn(|_| AtomicI64::new(-1)),
            oldest_taken_ms: AtomicU64::new(0),
            oldest_last_window_ms: AtomicU64::new(0),
            per_org,
            jobs: std::array::from_fn(|_| AtomicU64::new(0)),
            dead_letters: std::array::from_fn(|_| AtomicU64::new(0)),
            teams_requests: std::array::from_fn(|_| AtomicU64::new(0)),
            job_seconds: Histogram::new(),
            request_seconds: Histogram::new(),
            in_flight: AtomicI64::new(0),
            recipients_corrected: AtomicU64::new(0),
            conversations_quarantined: AtomicU64::new(0),
            consumer_active: AtomicBool::new(false),
            fleet_shards: AtomicU64::new(0),
            router_held: AtomicBool::new(false),
            shards_held: AtomicU64::new(0),
            events: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Values owned elsewhere, read when rendering.
pub struct Gauges {
    pub token_requests: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub mongodb_reads: u64,
    pub mongodb_writes: u64,
}

impl Metrics {
    pub fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn job_finished(&self, outcome: JobOutcome, took: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.jobs[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.job_seconds.observe(took);
    }

    /// The outcome of a job of `organization` (counted by name only for the
    /// organizations of `metrics.organizations`).
    pub fn organization_outcome(&self, organization: Option<&str>, outcome: JobOutcome) {
        let Some((_, other)) = self.per_org.last() else { return };
        let counters = organization.and_then(|o| self.per_org.iter().find(|(name, _)| name == o)).map_or(other, |(_, c)| c);
        counters[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A job was taken whose `created_at` is `age` ago.
    pub fn job_age(&self, age: Duration) {
        self.oldest_taken_ms.fetch_max(u64::try_from(age.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The depths polled from the broker, and the end of an age window.
    pub fn queue_polled(&self, depths: [(QueueKind, Option<u32>); 3]) {
        for (kind, depth) in depths {
            self.queue_depths[kind as usize].store(depth.map_or(-1, i64::from), Ordering::Relaxed);
        }
        self.oldest_last_window_ms.store(self.oldest_taken_ms.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn job_dead_lettered(&self, reason: Reason) {
        self.dead_letters[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One Connector request: its HTTP status, or `None` for a transport error.
    pub fn teams_request(&self, status: Option<u16>, took: Duration) {
        let class = match status {
            Some(200..=299) => 0,
            Some(300..=399) => 1,
            Some(400..=499) => 2,
            Some(_) => 3,
            None => 4,
        };
        self.teams_requests[class].fetch_add(1, Ordering::Relaxed);
        self.request_seconds.observe(took);
    }

    pub fn recipient_corrected(&self) {
        self.recipients_corrected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn conversation_quarantined(&self) {
        self.conversations_quarantined.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, event: Event) {
        self.events[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How often `name` (one of the rare-event counters) happened.
    pub fn event_count(&self, name: &str) -> u64 {
        EVENTS.iter().position(|(n, _)| *n == name).map_or(0, |i| self.events[i].load(Ordering::Relaxed))
    }

    pub fn delivery_unconfirmed(&self) {
        self.count(Event::Unconfirmed);
    }

    pub fn lease_taken_over(&self) {
        self.count(Event::TakenOver);
    }

    pub fn lease_lost(&self) {
        self.count(Event::LeaseLost);
    }

    pub fn ledger_write_failed(&self) {
        self.count(Event::LedgerWriteFailed);
    }

    pub fn forged_headers(&self) {
        self.count(Event::ForgedHeaders);
    }

    pub fn internal_error(&self) {
        self.count(Event::InternalError);
    }

    pub fn publish_retried(&self) {
        self.count(Event::PublishRetried);
    }

    pub fn broker_reconnect(&self) {
        self.count(Event::BrokerReconnect);
    }

    pub fn consumer_active(&self, active: bool) {
        self.consumer_active.store(active, Ordering::Relaxed);
    }

    /// What this worker holds of the fleet's `shards` units, after a heartbeat.
    pub fn fleet_held(&self, shards: u16, router: bool, held: usize) {
        self.fleet_shards.store(u64::from(shards), Ordering::Relaxed);
        self.router_held.store(router, Ordering::Relaxed);
        self.shards_held.store(held as u64, Ordering::Relaxed);
    }

    pub fn is_consuming(&self) -> bool {
        self.consumer_active.load(Ordering::Relaxed)
    }

    pub fn dead_lettered(&self, reason: Reason) -> u64 {
        self.dead_letters[reason as usize].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(&mut out, "herald_jobs_total", "Jobs processed, by outcome.");
        for (outcome, n) in OUTCOMES.iter().zip(&self.jobs) {
            let _ = writeln!(out, "herald_jobs_total{{outcome=\"{outcome}\"}} {}", n.load(Ordering::Relaxed));
        }
        counter(&mut out, "herald_dead_letters_total", "Dead letters published, by x-herald-reason.");
        for (reason, n) in Reason::ALL.iter().zip(&self.dead_letters) {
            let _ = writeln!(out, "herald_dead_letters_total{{reason=\"{reason}\"}} {}", n.load(Ordering::Relaxed));
        }
        counter(&mut out, "herald_teams_requests_total", "Bot Connector requests, by HTTP status class.");
        for (class, n) in CLASSES.iter().zip(&self.teams_requests) {
            let _ = writeln!(out, "herald_teams_requests_total{{class=\"{class}\"}} {}", n.load(Ordering::Relaxed));
        }
        self.job_seconds.render(&mut out, "herald_job_duration_seconds", "Time from taking a job to its disposition.");
        self.request_seconds.render(&mut out, "herald_teams_request_duration_seconds", "Duration of Bot Connector requests.");
        let _ = writeln!(out, "# HELP herald_jobs_in_flight Jobs being processed.\n# TYPE herald_jobs_in_flight gauge");
        let _ = writeln!(out, "herald_jobs_in_flight {}", self.in_flight.load(Ordering::Relaxed));
        counter(&mut out, "herald_token_requests_total", "Requests to the token endpoint.");
        let _ = writeln!(out, "herald_token_requests_total {}", gauges.token_requests);
        counter(&mut out, "herald_resolution_cache_total", "org_integration resolutions, served from the cache or not.");
        let _ = writeln!(out, "herald_resolution_cache_total{{result=\"hit\"}} {}", gauges.cache_hits);
        let _ = writeln!(out, "herald_resolution_cache_total{{result=\"miss\"}} {}", gauges.cache_misses);
        counter(&mut out, "herald_mongodb_operations_total", "MongoDB reads and write statements (a ledger batch's sent marks are one).");
        let _ = writeln!(out, "herald_mongodb_operations_total{{kind=\"read\"}} {}", gauges.mongodb_reads);
        let _ = writeln!(out, "herald_mongodb_operations_total{{kind=\"write\"}} {}", gauges.mongodb_writes);
        counter(
            &mut out,
            "herald_recipients_corrected_total",
            "Stale recipients corrected to the user's conversation in the job's organization.",
        );
        let _ = writeln!(out, "herald_recipients_corrected_total {}", self.recipients_corrected.load(Ordering::Relaxed));
        counter(&mut out, "herald_conversations_quarantined_total", "Conversations quarantined after a Teams refusal.");
        let _ = writeln!(out, "herald_conversations_quarantined_total {}", self.conversations_quarantined.load(Ordering::Relaxed));
        for ((name, help), n) in EVENTS.iter().zip(&self.events) {
            counter(&mut out, name, help);
            let _ = writeln!(out, "{name} {}", n.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP herald_queue_messages Messages ready in the work queue, the retry tiers (together) and the dead-letter queue, polled.\n# TYPE herald_queue_messages gauge"
        );
        for (queue, depth) in QUEUES.iter().zip(&self.queue_depths) {
            let depth = depth.load(Ordering::Relaxed);
            if depth >= 0 {
                let _ = writeln!(out, "herald_queue_messages{{queue=\"{queue}\"}} {depth}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP herald_oldest_job_age_seconds Age (from created_at) of the oldest job taken in the last poll interval: how long the work queue's head waited.\n# TYPE herald_oldest_job_age_seconds gauge"
        );
        let _ = writeln!(out, "herald_oldest_job_age_seconds {}", self.oldest_last_window_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        if !self.per_org.is_empty() {
            counter(
                &mut out,
                "herald_organization_jobs_total",
                "Jobs by outcome, for the organizations of metrics.organizations and \"other\".",
            );
            for (organization, counters) in &self.per_org {
                for (outcome, n) in OUTCOMES.iter().zip(counters) {
                    let _ = writeln!(
                        out,
                        "herald_organization_jobs_total{{organization=\"{organization}\",outcome=\"{outcome}\"}} {}",
                        n.load(Ordering::Relaxed)
                    );
                }
            }
        }
        let _ =
            writeln!(out, "# HELP herald_consumer_active 1 while the worker consumes the work queue.\n# TYPE herald_consumer_active gauge");
        let _ = writeln!(out, "herald_consumer_active {}", u8::from(self.consumer_active.load(Ordering::Relaxed)));
        let shards = self.fleet_shards.load(Ordering::Relaxed);
        if shards > 0 {
            let _ = writeln!(
                out,
                "# HELP herald_fleet_shards fleet.shards: the shard queues the fleet must hold.\n# TYPE herald_fleet_shards gauge"
            );
            let _ = writeln!(out, "herald_fleet_shards {shards}");
            let _ = writeln!(
                out,
                "# HELP herald_fleet_units_held The router (0 or 1) and the shards this worker holds and consumes.\n# TYPE herald_fleet_units_held gauge"
            );
            let _ = writeln!(out, "herald_fleet_units_held{{unit=\"router\"}} {}", u8::from(self.router_held.load(Ordering::Relaxed)));
            let _ = writeln!(out, "herald_fleet_units_held{{unit=\"shard\"}} {}", self.shards_held.load(Ordering::Relaxed));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.job_started();
        m.job_finished(JobOutcome::Delivered, Duration::from_millis(30));
        m.job_dead_lettered(Reason::TeamsForbidden);
        m.teams_request(Some(201), Duration::from_millis(20));
        m.teams_request(Some(503), Duration::from_millis(20));
        m.teams_request(None, Duration::from_secs(2));
        let text = m.render(&Gauges { token_requests: 3, cache_hits: 10, cache_misses: 1, mongodb_reads: 2, mongodb_writes: 5 });
        assert!(text.contains("herald_jobs_total{outcome=\"delivered\"} 1"));
        assert!(text.contains("herald_dead_letters_total{reason=\"teams_forbidden\"} 1"));
        assert!(text.contains("herald_teams_requests_total{class=\"5xx\"} 1"));
        assert!(text.contains("herald_teams_requests_total{class=\"transport\"} 1"));
        assert!(text.contains("herald_job_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("herald_teams_request_duration_seconds_count 3"));
        assert!(text.contains("herald_jobs_in_flight 0"));
        assert!(text.contains("herald_token_requests_total 3"));
        assert!(text.contains("herald_resolution_cache_total{result=\"hit\"} 10"));
        assert!(text.contains("herald_mongodb_operations_total{kind=\"write\"} 5"));
        m.delivery_unconfirmed();
        let text = m.render(&Gauges { token_requests: 0, cache_hits: 0, cache_misses: 0, mongodb_reads: 0, mongodb_writes: 0 });
        assert!(text.contains("herald_deliveries_unconfirmed_total 1"), "{text}");
        assert_eq!(m.event_count("herald_deliveries_unconfirmed_total"), 1);
        for reason in Reason::ALL {
            let before = m.dead_lettered(*reason);
            m.job_dead_lettered(*reason);
            assert_eq!(m.dead_lettered(*reason), before + 1, "{reason}");
        }
    }
}
