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

/// One request in a key's history: when, and who made it (`OWN`, or the
/// worker that paced the key before, see `Throttle::import`).
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    origin: u32,
}

/// The origin of the requests this throttle admitted itself.
pub const OWN: u32 = 0;

/// What a key is: a bot's conversation or a bot app's tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Conversation,
    Tenant,
}

/// The recent requests of one key, as one process hands them to the next
/// (`Throttle::export`, `Throttle::import`): `sends` are `(age in ms, how
/// many)` at the time of the export, youngest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub scope: Scope,
    pub app_id: String,
    /// The conversation or the tenant.
    pub id: String,
    pub sends: Vec<(u32, u32)>,
}

/// Ages up to this are carried to the millisecond; older ones (only the hour
/// window holds them) are rounded down to a multiple of `COARSE`, which
/// makes them look younger: the next holder waits a little more, never less.
const EXACT: Duration = Duration::from_secs(64);
const COARSE: Duration = Duration::from_secs(60);

/// A key is carried once its own requests fill a quarter of one of its windows.
const CARRY_FROM: f64 = 0.25;

#[derive(Debug, Default)]
pub struct Throttle {
    pub enabled: bool,
    pub limits: Limits,
    /// Added to every window: a client pacing itself keeps clear of the
    /// server's boundaries, which it sees a little later than it sends.
    pub margin: Duration,
    conversations: HashMap<(String, String), VecDeque<Sent>>,
    tenants: HashMap<(String, String), VecDeque<Sent>>,
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
            move |_: &(String, String), history: &mut VecDeque<Sent>| {
                history.back().is_some_and(|last| now.saturating_duration_since(last.at) < longest)
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
        let newest_own = |history: &mut VecDeque<Sent>| {
            if let Some(i) = history.iter().rposition(|s| s.origin == OWN) {
                history.remove(i);
            }
        };
        if let Some(history) = self.conversations.get_mut(&(app_id.to_owned(), conversation_id.to_owned())) {
            newest_own(history);
        }
        if let Some(history) = self.tenants.get_mut(&(app_id.to_owned(), tenant_id.to_owned())) {
            newest_own(history);
        }
    }

    /// The keys whose own requests fill at least a quarter of one of their
    /// windows, fullest first, at most `cap`: what the next process to pace
    /// them needs to know (requests imported from others are not carried on;
    /// their own process carries them).
    pub fn export(&self, now: Instant, cap: usize) -> Vec<Carried> {
        let mut carried: Vec<(f64, Carried)> = Vec::new();
        let scopes = [
            (Scope::Conversation, &self.conversations, &self.limits.per_conversation),
            (Scope::Tenant, &self.tenants, &self.limits.per_app_tenant),
        ];
        for (scope, keys, windows) in scopes {
            let longest = Duration::from_secs(windows.iter().map(|w| w.per_secs).max().unwrap_or(0)) + self.margin;
            for ((app_id, id), history) in keys {
                let fullest = windows
                    .iter()
                    .map(|w| {
                        let span = Duration::from_secs(w.per_secs) + self.margin;
                        let inside = history
                            .iter()
                            .rev()
                            .take_while(|s| now.saturating_duration_since(s.at) < span)
                            .filter(|s| s.origin == OWN)
                            .count();
                        inside as f64 / w.limit.max(1) as f64
                    })
                    .fold(0.0, f64::max);
                if fullest < CARRY_FROM {
                    continue;
                }
                let mut sends: Vec<(u32, u32)> = Vec::new();
                for sent in history.iter().rev().filter(|s| s.origin == OWN) {
                    let age = now.saturating_duration_since(sent.at);
                    if age >= longest {
                        break;
                    }
                    let age = if age < EXACT { age } else { EXACT + COARSE * ((age - EXACT).as_secs() / COARSE.as_secs()) as u32 };
                    let ms = u32::try_from(age.as_millis()).unwrap_or(u32::MAX);
                    match sends.last_mut() {
                        Some((last, count)) if *last == ms => *count += 1,
                        _ => sends.push((ms, 1)),
                    }
                }
                carried.push((fullest, Carried { scope, app_id: app_id.clone(), id: id.clone(), sends }));
            }
        }
        carried.sort_by(|a, b| b.0.total_cmp(&a.0));
        carried.into_iter().take(cap).map(|(_, c)| c).collect()
    }

    /// Count the requests another process made (`origin`, not `OWN`), as it
    /// exported them at `exported` (by this process's clock), replacing what
    /// an earlier import from the same origin said about the same keys. With
    /// `unaccounted`, the origin may have gone on sending for that long after
    /// its export (it died without a last word): every carried key is
    /// counted as having sent as much as its windows allowed in that time.
    pub fn import(&mut self, origin: u32, carried: &[Carried], exported: Instant, unaccounted: Duration) {
        debug_assert_ne!(origin, OWN);
        for key in carried {
            let (keys, windows) = match key.scope {
                Scope::Conversation => (&mut self.conversations, &self.limits.per_conversation),
                Scope::Tenant => (&mut self.tenants, &self.limits.per_app_tenant),
            };
            let history = keys.entry((key.app_id.clone(), key.id.clone())).or_default();
            history.retain(|s| s.origin != origin);
            for &(age, count) in &key.sends {
                let Some(at) = exported.checked_sub(Duration::from_millis(u64::from(age))) else { continue };
                history.extend(std::iter::repeat_n(Sent { at, origin }, count as usize));
            }
            history.make_contiguous().sort_by_key(|s| s.at);
            // What the origin may have sent unseen: as much as fits, from its
            // export on.
            let mut at = exported;
            let until = exported + unaccounted;
            while at < until {
                match wait_for(history, windows, at, self.margin) {
                    None => {
                        let i = history.partition_point(|s| s.at <= at);
                        history.insert(i, Sent { at, origin });
                    }
                    Some(wait) => at += wait.max(Duration::from_millis(1)),
                }
            }
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
                let sent = Sent { at: now, origin: OWN };
                push_sorted(tenant, sent);
                push_sorted(self.conversations.get_mut(&(app_id.to_owned(), conversation_id.to_owned())).expect("inserted above"), sent);
                Ok(())
            }
        }
    }
}

/// Append `sent`, keeping the history sorted (an import may have put a
/// request of another process after it).
fn push_sorted(history: &mut VecDeque<Sent>, sent: Sent) {
    if history.back().is_none_or(|last| last.at <= sent.at) {
        history.push_back(sent);
    } else {
        let i = history.partition_point(|s| s.at <= sent.at);
        history.insert(i, sent);
    }
}

/// `None` when one more request fits every window, else the wait until it does.
fn wait_for(history: &mut VecDeque<Sent>, windows: &[Window], now: Instant, margin: Duration) -> Option<Duration> {
    let longest = windows.iter().map(|w| w.per_secs).max().unwrap_or(0);
    while let Some(oldest) = history.front() {
        if now.saturating_duration_since(oldest.at) >= Duration::from_secs(longest) + margin {
            history.pop_front();
        } else {
            break;
        }
    }
    let mut wait: Option<Duration> = None;
    for window in windows {
        let span = Duration::from_secs(window.per_secs) + margin;
        // `history` is sorted: the entries inside the window are a suffix.
        let inside = history.len() - history.partition_point(|s| now.saturating_duration_since(s.at) >= span);
        if inside >= window.limit {
            // The request fits once enough of the oldest entries inside leave.
            let leaving = history[history.len() - inside + (inside - window.limit)].at;
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

    /// 60 requests in 28 s: the 30 s window of conversation "c" is full.
    fn busy(start: Instant) -> (Throttle, Instant) {
        let mut t = throttle();
        let mut now = start;
        for i in 0..60 {
            if i % 4 == 0 && i > 0 {
                now += Duration::from_secs(2);
            }
            t.admit("a", "t", "c", now).unwrap();
        }
        (t, now)
    }

    #[test]
    fn the_next_process_waits_as_the_last_one_would_have() {
        let start = Instant::now();
        let (mut last, now) = busy(start);
        let carried = last.export(now, 10);
        assert_eq!(carried.len(), 1, "the conversation; its tenant (4 per second of 50) is quiet: {carried:?}");
        assert_eq!(carried.iter().find(|c| c.scope == Scope::Conversation).unwrap().sends.iter().map(|s| s.1).sum::<u32>(), 60);

        let mut next = throttle();
        next.import(1, &carried, now, Duration::ZERO);
        // Imported twice (every claim reads every worker's record): counted once.
        next.import(1, &carried, now, Duration::ZERO);
        let later = now + Duration::from_millis(500);
        assert_eq!(next.admit("a", "t", "c", later), last.admit("a", "t", "c", later));
        assert!(next.admit("a", "t", "c", later).is_err(), "the 30 s window is as full for the next process");
        next.admit("a", "t", "other", later).unwrap();
        // What it imported is not carried on by it: its own requests only.
        assert!(next.export(later, 10).iter().all(|c| c.id != "c"), "{:?}", next.export(later, 10));
        // Once the first requests leave the window, both admit again.
        let free = start + Duration::from_secs(30);
        assert_eq!(next.admit("a", "t", "c", free), Ok(()));
        assert_eq!(last.admit("a", "t", "c", free), Ok(()));
    }

    #[test]
    fn a_quiet_key_is_not_carried_and_the_fullest_come_first() {
        let mut t = throttle();
        let now = Instant::now();
        t.admit("a", "t1", "quiet", now).unwrap();
        for _ in 0..7 {
            t.admit("a", "t2", "full", now).unwrap();
        }
        for _ in 0..3 {
            t.admit("a", "t3", "half", now).unwrap();
        }
        let carried = t.export(now, 10);
        let ids: Vec<&str> = carried.iter().filter(|c| c.scope == Scope::Conversation).map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["full", "half"]);
        assert_eq!(t.export(now, 1).len(), 1);
    }

    #[test]
    fn what_a_dead_process_may_have_sent_unseen_is_counted_as_sent() {
        let start = Instant::now();
        let (mut last, _) = busy(start);
        // Its last export, just before the first requests leave the 30 s window.
        let now = start + Duration::from_millis(29_900);
        let carried = last.export(now, 10);
        // It goes on for a second after its export, as fast as allowed, then dies.
        let mut unseen = 0;
        let mut at = now;
        while at < now + Duration::from_secs(1) {
            match last.admit("a", "t", "c", at) {
                Ok(()) => unseen += 1,
                Err(wait) => at += wait,
            }
        }
        let mut next = throttle();
        next.import(7, &carried, now, Duration::from_secs(1));
        // The next process never admits before the dead one's history allows.
        let mut at = now + Duration::from_secs(1);
        for _ in 0..20 {
            let ours = next.admit("a", "t", "c", at);
            let theirs = last.room("a", "t", "c", at);
            if ours.is_ok() {
                assert!(theirs.is_ok(), "admitted at {:?} while the dead process's windows were full", at - start);
                last.admit("a", "t", "c", at).unwrap();
            }
            at += ours.err().unwrap_or(Duration::from_millis(1));
        }
        assert_eq!(unseen, 4, "the four that the first to leave the window made room for");
    }

    #[test]
    fn old_requests_are_carried_a_little_younger_never_older() {
        let start = Instant::now();
        let mut last = throttle();
        for i in 0..500 {
            // 500 requests over 250 s: the hour window holds them all.
            last.admit("a", "t", "c", start + Duration::from_millis(500 * i)).unwrap();
        }
        let now = start + Duration::from_secs(300);
        let carried = last.export(now, 10);
        let conversation = carried.iter().find(|c| c.scope == Scope::Conversation).expect("a quarter of 1800 in the hour");
        assert_eq!(conversation.sends.iter().map(|s| s.1).sum::<u32>(), 500);
        assert!(conversation.sends.len() < 200, "older ages are grouped: {} pairs", conversation.sends.len());
        let mut next = throttle();
        next.import(1, &carried, now, Duration::ZERO);
        let hour = Duration::from_secs(3600);
        // The oldest request leaves the last process's hour at start + 1 h;
        // the next one keeps it at least as long.
        let counted = |t: &mut Throttle, at: Instant| {
            t.conversations.get_mut(&("a".to_owned(), "c".to_owned())).map_or(0, |h| {
                wait_for(h, &[Window { limit: usize::MAX, per_secs: 3600 }], at, Duration::ZERO);
                h.len()
            })
        };
        assert_eq!(counted(&mut last, start + hour), 499);
        assert!(counted(&mut next, start + hour) >= 499);
        assert_eq!(counted(&mut next, start + hour + Duration::from_secs(300)), 0);
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
