//! Injected faults and latency, reproducible from a seed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which requests a fault rule applies to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    #[default]
    Any,
    Token,
    Send,
    Reply,
    Update,
    CreateConversation,
    /// A Workflows webhook's trigger (a rule's `conversation_id` names the workflow id).
    Workflow,
}

/// What an injected fault does to one request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Answer with this status and Microsoft's error body for it.
    Status {
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    /// Hold the request for `ms` (past the client's timeout), then answer 504.
    Hang { ms: u64 },
    /// Reset the TCP connection without answering.
    Reset,
    /// Accept the activity (it is recorded), then hold the answer for `ms`
    /// (past the client's timeout): the post happened, the answer is lost.
    Lose { ms: u64 },
    /// Accept the activity (it is recorded), then answer 201 with a body that
    /// is not JSON: the post happened, the answer cannot be read.
    Garble,
    /// Answer `status` with `Retry-After` as an HTTP-date `secs` from now
    /// (RFC 9110's other form).
    RetryAt { status: u16, secs: u64 },
    /// Accept the activity (it is recorded), send the 201's headers and the
    /// start of its body, then hold the rest for `ms`: a Connector that hangs
    /// after its headers.
    Stall { ms: u64 },
    /// Accept the activity (it is recorded), then answer 201 with a JSON body
    /// of `bytes` bytes (at most 64 MiB): an answer too large to read.
    Flood { bytes: u64 },
    /// Let the request through untouched (a gap in a sequence).
    Pass,
}

/// A rule: either a sequence consumed one action per matching request, or a
/// probability per matching request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub route: Route,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Actions applied in order to the matching requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequence: Vec<Action>,
    /// Start the sequence again after its last action instead of retiring it.
    #[serde(default)]
    pub repeat: bool,
    /// With `action`: the chance that a matching request gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// How many actions the rule has handed out.
    #[serde(default)]
    pub applied: u64,
}

impl Rule {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.probability, &self.action, self.sequence.is_empty()) {
            (Some(p), Some(_), true) if (0.0..=1.0).contains(p) => Ok(()),
            (Some(p), Some(_), true) => Err(format!("probability {p} is not within 0..=1")),
            (None, None, false) => Ok(()),
            _ => Err("a fault rule has either a non-empty `sequence`, or `probability` with `action`".into()),
        }
    }

    fn matches(&self, route: Route, app_id: Option<&str>, conversation_id: Option<&str>) -> bool {
        (self.route == Route::Any || self.route == route)
            && self.app_id.as_deref().is_none_or(|a| Some(a) == app_id)
            && self.conversation_id.as_deref().is_none_or(|c| Some(c) == conversation_id)
    }

    fn spent(&self) -> bool {
        self.probability.is_none() && !self.repeat && self.applied as usize >= self.sequence.len()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Latency {
    #[default]
    None,
    Fixed {
        ms: u64,
    },
    Uniform {
        min_ms: u64,
        max_ms: u64,
    },
}

pub(crate) struct Faults {
    pub rules: Vec<Rule>,
    pub latency: Latency,
    rng: fastrand::Rng,
    seed: u64,
}

impl Faults {
    pub fn new(seed: u64) -> Self {
        Self { rules: Vec::new(), latency: Latency::None, rng: fastrand::Rng::with_seed(seed), seed }
    }

    /// Forget the rules and latency and start the random sequence again.
    pub fn clear(&mut self) {
        *self = Self::new(self.seed);
    }

    /// The action for this request, if a rule hands one out. Rules are tried in
    /// the order they were added; the first that hands out an action wins.
    pub fn next(&mut self, route: Route, app_id: Option<&str>, conversation_id: Option<&str>) -> Option<Action> {
        let mut chosen = None;
        for rule in self.rules.iter_mut().filter(|r| !r.spent()) {
            if !rule.matches(route, app_id, conversation_id) {
                continue;
            }
            if let (Some(p), Some(action)) = (rule.probability, &rule.action) {
                if self.rng.f64() < p {
                    rule.applied += 1;
                    chosen = Some(action.clone());
                    break;
                }
                continue;
            }
            let at = rule.applied as usize % rule.sequence.len();
            rule.applied += 1;
            chosen = Some(rule.sequence[at].clone());
            break;
        }
        self.rules.retain(|r| !r.spent());
        chosen.filter(|a| *a != Action::Pass)
    }

    pub fn delay(&mut self) -> Option<Duration> {
        match self.latency {
            Latency::None => None,
            Latency::Fixed { ms } => Some(Duration::from_millis(ms)),
            Latency::Uniform { min_ms, max_ms } => Some(Duration::from_millis(self.rng.u64(min_ms..=max_ms.max(min_ms)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> Action {
        Action::Status { status, code: None, retry_after: None }
    }

    #[test]
    fn a_sequence_is_consumed_in_order_then_retired() {
        let mut f = Faults::new(1);
        f.rules.push(Rule { route: Route::Send, sequence: vec![status(503), Action::Pass, status(502)], ..Default::default() });
        assert_eq!(f.next(Route::Token, None, None), None, "other routes are untouched");
        assert_eq!(f.next(Route::Send, Some("a"), Some("c")), Some(status(503)));
        assert_eq!(f.next(Route::Send, Some("a"), Some("c")), None);
        assert_eq!(f.next(Route::Send, Some("a"), Some("c")), Some(status(502)));
        assert_eq!(f.next(Route::Send, Some("a"), Some("c")), None);
        assert!(f.rules.is_empty());
    }

    #[test]
    fn rules_can_target_one_conversation_and_repeat() {
        let mut f = Faults::new(1);
        f.rules.push(Rule { conversation_id: Some("c1".into()), sequence: vec![status(500)], repeat: true, ..Default::default() });
        for _ in 0..3 {
            assert_eq!(f.next(Route::Send, Some("a"), Some("c1")), Some(status(500)));
            assert_eq!(f.next(Route::Send, Some("a"), Some("c2")), None);
        }
    }

    #[test]
    fn probabilities_are_reproducible_from_the_seed() {
        let run = |seed| {
            let mut f = Faults::new(seed);
            f.rules.push(Rule { probability: Some(0.3), action: Some(status(429)), ..Default::default() });
            (0..1000).map(|_| f.next(Route::Send, None, None).is_some()).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        let hits = a.iter().filter(|h| **h).count();
        assert!((220..380).contains(&hits), "about 30% of 1000, got {hits}");
    }

    #[test]
    fn invalid_rules_are_refused() {
        assert!(Rule::default().validate().is_err());
        assert!(Rule { probability: Some(1.5), action: Some(Action::Reset), ..Default::default() }.validate().is_err());
        assert!(Rule { sequence: vec![Action::Reset], ..Default::default() }.validate().is_ok());
    }
}
