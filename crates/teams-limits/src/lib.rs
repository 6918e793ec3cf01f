//! Sliding-window rate limits as Microsoft publishes them for Teams bots.
//!
//! Per bot per conversation: 7 per 1 s, 8 per 2 s, 60 per 30 s, 1800 per hour.
//! Per bot app per tenant: 50 per second. A request that would exceed any window
//! is refused (and not counted), with the time until the oldest request of the
//! fullest window leaves it.
//!
//! teams-sim enforces these limits as Teams does (429 with `Retry-After`), and
//! the worker applies the same limits to itself before sending, so that it
//! rarely meets a 429 and a busy conversation does not slow the others.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub limit: usize,
    pub per_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub per_conversation: Vec<Window>,
    pub per_app_tenant: Vec<Window>,
}

impl Default for Limits {
    fn default() -> Self {
        let w = |limit, per_secs| Window { limit, per_secs };
        Self { per_conversation: vec![w(7, 1), w(8, 2), w(60, 30), w(1800, 3600)], per_app_tenant: vec![w(50, 1)] }
    }
}

#[derive(Debug, Default)]
pub struct Throttle {
    pub enabled: bool,
    pub limits: Limits,
    /// Added to every window: a client pacing itself keeps clear of the
    /// server's boundaries, which it sees a little later than it sends.
    pub margin: Duration,
    conversations: HashMap<(String, String), VecDeque<Instant>>,
    tenants: HashMap<(String, String), VecDeque<Instant>>,
    /// Conversations held back until a time (a 429's `Retry-After`).
    held: HashMap<(String, String), Instant>,
    /// Admissions since the last sweep of idle keys.
    since_sweep: usize,
}

/// Idle keys are swept once this many admissions happened and the maps hold
/// more keys than that: memory follows the keys in use, not every key seen.
const SWEEP_EVERY: usize = 4096;

impl Throttle {
    pub fn new(enabled: bool, limits: Limits) -> Self {
        Self { enabled, limits, ..Default::default() }
    }

    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    pub fn clear(&mut self) {
        self.conversations.clear();
        self.tenants.clear();
        self.held.clear();
    }

    /// Admit nothing into `conversation_id` of `app_id` before `until` (the
    /// server said so: a 429's `Retry-After`).
    pub fn hold(&mut self, app_id: &str, conversation_id: &str, until: Instant) {
        let held = self.held.entry((app_id.to_owned(), conversation_id.to_owned())).or_insert(until);
        *held = (*held).max(until);
    }

    /// Conversations and tenants tracked right now.
    pub fn tracked(&self) -> usize {
        self.conversations.len() + self.tenants.len() + self.held.len()
    }

    /// Forget every key whose requests have all left the longest window.
    pub fn sweep(&mut self, now: Instant) {
        let keep = |windows: &[Window], margin: Duration| {
            let longest = Duration::from_secs(windows.iter().map(|w| w.per_secs).max().unwrap_or(0)) + margin;
            move |_: &(String, String), history: &mut VecDeque<Instant>| {
                history.back().is_some_and(|last| now.saturating_duration_since(*last) < longest)
            }
        };
        self.conversations.retain(keep(&self.limits.per_conversation, self.margin));
        self.tenants.retain(keep(&self.limits.per_app_tenant, self.margin));
        self.held.retain(|_, until| *until > now);
        self.conversations.shrink_to_fit();
        self.tenants.shrink_to_fit();
        self.since_sweep = 0;
    }

    /// Forget the newest request admitted for this conversation and tenant:
    /// the server refused it (a 429 is not counted), so it takes no room.
    pub fn refund(&mut self, app_id: &str, tenant_id: &str, conversation_id: &str) {
        if let Some(history) = self.conversations.get_mut(&(app_id.to_owned(), conversation_id.to_owned())) {
            history.pop_back();
        }
        if let Some(history) = self.tenants.get_mut(&(app_id.to_owned(), tenant_id.to_owned())) {
            history.pop_back();
        }
    }

    /// Whether one request would be admitted at `now` (`Err`: how long until
    /// it would), without counting it.
    pub fn room(&mut self, app_id: &str, tenant_id: &str, conversation_id: &str, now: Instant) -> Result<(), Duration> {
        self.check(app_id, tenant_id, conversation_id, now, false)
    }

    /// Admit one request of `app_id` into `conversation_id` of `tenant_id` at
    /// `now`, or say how long to wait.
    pub fn admit(&mut self, app_id: &str, tenant_id: &str, conversation_id: &str, now: Instant) -> Result<(), Duration> {
        self.check(app_id, tenant_id, conversation_id, now, true)
    }

    fn check(&mut self, app_id: &str, tenant_id: &str, conversation_id: &str, now: Instant, count: bool) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY && self.tracked() >= SWEEP_EVERY {
            self.sweep(now);
        }
        let conv_key = (app_id.to_owned(), conversation_id.to_owned());
        let held = self.held.get(&conv_key).and_then(|until| until.checked_duration_since(now)).filter(|d| !d.is_zero());
        if let Some(wait) = held {
            return Err(wait);
        }
        let tenant_key = (app_id.to_owned(), tenant_id.to_owned());
        let conv = self.conversations.entry(conv_key).or_default();
        let wait_conv = wait_for(conv, &self.limits.per_conversation, now, self.margin);
        let tenant = self.tenants.entry(tenant_key).or_default();
        let wait_tenant = wait_for(tenant, &self.limits.per_app_tenant, now, self.margin);
        match wait_conv.max(wait_tenant) {
            Some(wait) => Err(wait),
            None if !count => Ok(()),
            None => {
                tenant.push_back(now);
                self.conversations.get_mut(&(app_id.to_owned(), conversation_id.to_owned())).expect("inserted above").push_back(now);
                Ok(())
            }
        }
    }
}

/// `None` when one more request fits every window, else the wait until it does.
fn wait_for(history: &mut VecDeque<Instant>, windows: &[Window], now: Instant, margin: Duration) -> Option<Duration> {
    let longest = windows.iter().map(|w| w.per_secs).max().unwrap_or(0);
    while let Some(&oldest) = history.front() {
        if now.saturating_duration_since(oldest) >= Duration::from_secs(longest) + margin {
            history.pop_front();
        } else {
            break;
        }
    }
    let mut wait: Option<Duration> = None;
    for window in windows {
        let span = Duration::from_secs(window.per_secs) + margin;
        // `history` is sorted: the entries inside the window are a suffix.
        let inside = history.len() - history.partition_point(|&t| now.saturating_duration_since(t) >= span);
        if inside >= window.limit {
            // The request fits once enough of the oldest entries inside leave.
            let leaving = history[history.len() - inside + (inside - window.limit)];
            let until = span.saturating_sub(now.saturating_duration_since(leaving));
            wait = Some(wait.map_or(until, |w| w.max(until)));
        }
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(true, Limits::default())
    }

    #[test]
    fn seven_per_second_per_conversation() {
        let mut t = throttle();
        let now = Instant::now();
        for _ in 0..7 {
            t.admit("a", "t", "c", now).unwrap();
        }
        let wait = t.admit("a", "t", "c", now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // Another conversation of the same bot is not affected.
        t.admit("a", "t", "other", now).unwrap();
        // Another bot in the same conversation is not affected.
        t.admit("b", "t", "c", now).unwrap();
    }

    #[test]
    fn eight_per_two_seconds() {
        let mut t = throttle();
        let start = Instant::now();
        for _ in 0..7 {
            t.admit("a", "t", "c", start).unwrap();
        }
        let later = start + Duration::from_millis(1100);
        t.admit("a", "t", "c", later).unwrap();
        let wait = t.admit("a", "t", "c", later).unwrap_err();
        assert_eq!(wait, Duration::from_millis(900));
    }

    #[test]
    fn sixty_per_thirty_seconds_and_1800_per_hour() {
        let mut t = throttle();
        let start = Instant::now();
        let mut now = start;
        for i in 0..60 {
            // 4 requests every 2 s stay just inside the 1 s and 2 s windows.
            if i % 4 == 0 && i > 0 {
                now += Duration::from_secs(2);
            }
            t.admit("a", "t", "c", now).unwrap_or_else(|w| panic!("request {i} throttled for {w:?}"));
        }
        let wait = t.admit("a", "t", "c", now + Duration::from_secs(1)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1), "the first requests leave the 30 s window at 30 s");

        let mut t = throttle();
        let mut now = start;
        for i in 0..1800 {
            // 2 per second is the most the 30 s window allows for long.
            if i % 2 == 0 && i > 0 {
                now += Duration::from_secs(1);
            }
            t.admit("a", "t", "c", now).unwrap_or_else(|w| panic!("request {i} throttled for {w:?}"));
        }
        let wait = t.admit("a", "t", "c", now + Duration::from_secs(1)).unwrap_err();
        assert!(wait > Duration::from_secs(30), "the hour window dominates: {wait:?}");
    }

    #[test]
    fn fifty_per_second_per_app_and_tenant() {
        let mut t = throttle();
        let now = Instant::now();
        for i in 0..50 {
            t.admit("a", "t", &format!("c{i}"), now).unwrap();
        }
        assert!(t.admit("a", "t", "c-new", now).is_err());
        t.admit("a", "other-tenant", "c-new", now).unwrap();
    }

    #[test]
    fn a_margin_keeps_a_client_clear_of_the_servers_boundary() {
        let mut t = throttle().with_margin(Duration::from_millis(100));
        let start = Instant::now();
        for _ in 0..7 {
            t.admit("a", "t", "c", start).unwrap();
        }
        assert!(
            t.admit("a", "t", "c", start + Duration::from_millis(1050)).is_err(),
            "the server's window has passed, the client's has not"
        );
        t.admit("a", "t", "c", start + Duration::from_millis(1100)).unwrap();
    }

    #[test]
    fn idle_keys_are_forgotten_once_their_windows_passed() {
        let mut t = throttle();
        let start = Instant::now();
        for i in 0..10_000 {
            t.admit("a", &format!("t{}", i % 500), &format!("c{i}"), start).unwrap();
        }
        assert!(t.tracked() >= 10_000);
        // An hour later (the longest window), new traffic sweeps the old keys.
        let later = start + Duration::from_secs(3601);
        for i in 0..SWEEP_EVERY {
            t.admit("a", "t", &format!("new{}", i % 10), later).ok();
        }
        assert!(t.tracked() <= 11 + SWEEP_EVERY, "{} keys kept", t.tracked());
        t.sweep(later + Duration::from_secs(3601));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_held_conversation_waits_out_the_servers_retry_after() {
        let mut t = throttle();
        let now = Instant::now();
        t.hold("a", "c", now + Duration::from_secs(20));
        assert_eq!(t.admit("a", "t", "c", now), Err(Duration::from_secs(20)));
        t.admit("a", "t", "other", now).unwrap();
        t.admit("a", "t", "c", now + Duration::from_secs(20)).unwrap();
        t.sweep(now + Duration::from_secs(21));
        assert!(t.held.is_empty());
    }

    #[test]
    fn a_refused_request_is_refunded() {
        let mut t = throttle();
        let now = Instant::now();
        for _ in 0..7 {
            t.admit("a", "t", "c", now).unwrap();
        }
        t.refund("a", "t", "c");
        t.admit("a", "t", "c", now).unwrap();
        assert!(t.admit("a", "t", "c", now).is_err());
    }

    #[test]
    fn room_says_what_admit_would_without_counting() {
        let mut t = throttle();
        let now = Instant::now();
        for _ in 0..7 {
            t.room("a", "t", "c", now).unwrap();
        }
        for _ in 0..7 {
            t.admit("a", "t", "c", now).unwrap();
        }
        assert_eq!(t.room("a", "t", "c", now), Err(Duration::from_secs(1)));
    }

    #[test]
    fn disabled_admits_everything() {
        let mut t = Throttle::new(false, Limits::default());
        let now = Instant::now();
        for _ in 0..1000 {
            t.admit("a", "t", "c", now).unwrap();
        }
    }
}
