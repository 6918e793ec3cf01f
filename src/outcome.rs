//! What happens to a job: the dead-letter vocabulary, the one classifier of
//! delivery errors, and the retry schedule (pure functions, unit-tested).

use std::fmt;
use std::time::Duration;

use crate::job::InvalidJob;
use crate::mongo::StoreError;
use crate::teams::TeamsError;

/// The fixed vocabulary of `x-herald-reason` (documented in docs/tenancy.md
/// and docs/operations.md). A new reason is a documented, versioned change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    InvalidJob,
    MissingOrganization,
    JobExpired,
    OrgIntegrationNotFound,
    OrgIntegrationDisabled,
    OrgIntegrationMisconfigured,
    RecipientNotInOrganization,
    ConversationQuarantined,
    ServiceUrlNotAllowed,
    PayloadTooLarge,
    TeamsBadRequest,
    TeamsUnauthorized,
    TeamsForbidden,
    TeamsNotFound,
    TeamsServerError,
    TeamsUnexpectedStatus,
    RetriesExhausted,
    DeliveryLimitExceeded,
    // Reasons of retries (they only become dead letters as `retries_exhausted`).
    TeamsThrottled,
    TeamsUnavailable,
    StoreUnavailable,
    StoreFailed,
    /// herald's own per-conversation / per-tenant rate limit said "later".
    RateLimited,
    /// Another delivery of the same job id is being sent right now.
    InProgress,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::InvalidJob,
        Reason::MissingOrganization,
        Reason::JobExpired,
        Reason::OrgIntegrationNotFound,
        Reason::OrgIntegrationDisabled,
        Reason::OrgIntegrationMisconfigured,
        Reason::RecipientNotInOrganization,
        Reason::ConversationQuarantined,
        Reason::ServiceUrlNotAllowed,
        Reason::PayloadTooLarge,
        Reason::TeamsBadRequest,
        Reason::TeamsUnauthorized,
        Reason::TeamsForbidden,
        Reason::TeamsNotFound,
        Reason::TeamsServerError,
        Reason::TeamsUnexpectedStatus,
        Reason::RetriesExhausted,
        Reason::DeliveryLimitExceeded,
        Reason::TeamsThrottled,
        Reason::TeamsUnavailable,
        Reason::StoreUnavailable,
        Reason::StoreFailed,
        Reason::RateLimited,
        Reason::InProgress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJob => "invalid_job",
            Reason::MissingOrganization => "missing_organization",
            Reason::JobExpired => "job_expired",
            Reason::OrgIntegrationNotFound => "org_integration_not_found",
            Reason::OrgIntegrationDisabled => "org_integration_disabled",
            Reason::OrgIntegrationMisconfigured => "org_integration_misconfigured",
            Reason::RecipientNotInOrganization => "recipient_not_in_organization",
            Reason::ConversationQuarantined => "conversation_quarantined",
            Reason::ServiceUrlNotAllowed => "service_url_not_allowed",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::TeamsBadRequest => "teams_bad_request",
            Reason::TeamsUnauthorized => "teams_unauthorized",
            Reason::TeamsForbidden => "teams_forbidden",
            Reason::TeamsNotFound => "teams_not_found",
            Reason::TeamsServerError => "teams_server_error",
            Reason::TeamsUnexpectedStatus => "teams_unexpected_status",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::DeliveryLimitExceeded => "delivery_limit_exceeded",
            Reason::TeamsThrottled => "teams_throttled",
            Reason::TeamsUnavailable => "teams_unavailable",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::StoreFailed => "store_failed",
            Reason::RateLimited => "rate_limited",
            Reason::InProgress => "in_progress",
        }
    }

    /// Whether a delayed retry for this reason uses up one of the job's
    /// `retry.max_hops`. A MongoDB outage or herald's own rate limit is no
    /// fault of the job: such jobs wait, however long it takes, and are then
    /// delivered (or expire by their `expires_at`).
    pub fn consumes_retry_budget(self) -> bool {
        !matches!(self, Reason::StoreUnavailable | Reason::RateLimited | Reason::InProgress)
    }

    pub fn parse(text: &str) -> Option<Self> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can stop a job from being delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("invalid job: {0}")]
    Invalid(#[from] InvalidJob),
    #[error("the job expired at {0}")]
    Expired(chrono::DateTime<chrono::Utc>),
    #[error("no org_integration for organization {organization_id} and integration {integration_id}")]
    OrgIntegrationNotFound { organization_id: String, integration_id: String },
    #[error("the org_integration of organization {organization_id} and integration {integration_id} is disabled")]
    OrgIntegrationDisabled { organization_id: String, integration_id: String },
    #[error("the org_integration is misconfigured: {0}")]
    OrgIntegrationMisconfigured(String),
    #[error("{0}")]
    RecipientNotInOrganization(String),
    #[error("conversation {conversation_id} is quarantined for this org_integration: {reason}")]
    ConversationQuarantined { conversation_id: String, reason: String },
    #[error("herald's own rate limit for this bot and conversation says wait {0:?}")]
    RateLimited(Duration),
    #[error("another delivery of this job id is being sent right now")]
    InProgress,
    #[error(transparent)]
    Teams(#[from] TeamsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do about one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again. `quick`: within the worker (after `after` if given);
    /// otherwise through a delayed-retry tier at or above `after`.
    Retry { reason: Reason, quick: bool, after: Option<Duration> },
    /// Retrying cannot fix it.
    DeadLetter(Reason),
}

/// The one classifier (contract §7). Exhaustive over our own variants, so a
/// new variant forces a decision; what is not known to be transient is never
/// retried forever.
pub fn classify(err: &DeliveryError, max_in_process_wait: Duration) -> Verdict {
    use Verdict::{DeadLetter, Retry};
    match err {
        DeliveryError::Invalid(InvalidJob::Invalid(_)) => DeadLetter(Reason::InvalidJob),
        DeliveryError::Invalid(InvalidJob::MissingOrganization(_)) => DeadLetter(Reason::MissingOrganization),
        DeliveryError::Expired(_) => DeadLetter(Reason::JobExpired),
        DeliveryError::OrgIntegrationNotFound { .. } => DeadLetter(Reason::OrgIntegrationNotFound),
        DeliveryError::OrgIntegrationDisabled { .. } => DeadLetter(Reason::OrgIntegrationDisabled),
        DeliveryError::OrgIntegrationMisconfigured(_) => DeadLetter(Reason::OrgIntegrationMisconfigured),
        DeliveryError::RecipientNotInOrganization(_) => DeadLetter(Reason::RecipientNotInOrganization),
        DeliveryError::ConversationQuarantined { .. } => DeadLetter(Reason::ConversationQuarantined),
        DeliveryError::RateLimited(wait) => Retry { reason: Reason::RateLimited, quick: false, after: Some(*wait) },
        DeliveryError::InProgress => Retry { reason: Reason::InProgress, quick: false, after: None },
        DeliveryError::Store(err) if err.is_transient() => Retry { reason: Reason::StoreUnavailable, quick: true, after: None },
        // Not known to be transient: a few delayed retries, then retries_exhausted.
        DeliveryError::Store(_) => Retry { reason: Reason::StoreFailed, quick: false, after: None },
        DeliveryError::Teams(err) => classify_teams(err, max_in_process_wait),
    }
}

fn classify_teams(err: &TeamsError, max_in_process_wait: Duration) -> Verdict {
    use Verdict::{DeadLetter, Retry};
    let unavailable = Retry { reason: Reason::TeamsUnavailable, quick: true, after: None };
    match err {
        TeamsError::ServiceUrlNotAllowed { .. } => DeadLetter(Reason::ServiceUrlNotAllowed),
        TeamsError::PayloadTooLarge { .. } => DeadLetter(Reason::PayloadTooLarge),
        TeamsError::Transport { .. } | TeamsError::TokenTransport { .. } => unavailable,
        // The identity platform refused the bot's credentials (wrong secret,
        // unknown app, wrong authority): an operator must fix the record.
        TeamsError::TokenRejected { status, .. } if *status >= 500 || *status == 429 => unavailable,
        TeamsError::TokenRejected { .. } => DeadLetter(Reason::TeamsUnauthorized),
        TeamsError::Api { status, retry_after, .. } => match status {
            400 => DeadLetter(Reason::TeamsBadRequest),
            // Already after one forced token refresh (see teams::Teams::send).
            401 => DeadLetter(Reason::TeamsUnauthorized),
            403 => DeadLetter(Reason::TeamsForbidden),
            404 => DeadLetter(Reason::TeamsNotFound),
            413 => DeadLetter(Reason::PayloadTooLarge),
            412 | 502 | 503 | 504 => Retry { reason: Reason::TeamsUnavailable, quick: true, after: *retry_after },
            429 => {
                let after = retry_after.unwrap_or(Duration::from_secs(1));
                Retry { reason: Reason::TeamsThrottled, quick: after <= max_in_process_wait, after: Some(after) }
            }
            // Microsoft's table: a 500 is not retried.
            500 => DeadLetter(Reason::TeamsServerError),
            _ => DeadLetter(Reason::TeamsUnexpectedStatus),
        },
    }
}

/// Teams codes that mean this bot cannot post into this conversation until
/// someone acts: the conversation is quarantined for the org_integration.
pub fn quarantines(err: &DeliveryError) -> bool {
    match err {
        DeliveryError::Teams(TeamsError::Api { status, code, .. }) => matches!(
            (status, code.as_deref()),
            (403, Some("BotNotInConversationRoster" | "ConversationBlockedByUser" | "BotDisabledByAdmin"))
                | (404, Some("ConversationNotFound"))
        ),
        _ => false,
    }
}

/// The delayed-retry tier for the next hop: the hop's own tier in the
/// schedule, raised to the first tier at or above `retry_after` when Teams
/// asked for a longer wait. Past the last tier, the last tier.
pub fn retry_tier(hop: u32, retry_after: Option<Duration>, tiers: &[Duration]) -> Duration {
    assert!(!tiers.is_empty(), "settings validation guarantees at least one tier");
    let scheduled = tiers[(hop as usize).min(tiers.len() - 1)];
    match retry_after {
        Some(wait) if wait > scheduled => tiers.iter().copied().find(|t| *t >= wait).unwrap_or(tiers[tiers.len() - 1]),
        _ => scheduled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: Option<&str>, retry_after: Option<u64>) -> DeliveryError {
        DeliveryError::Teams(TeamsError::Api {
            status,
            code: code.map(str::to_owned),
            message: String::new(),
            correlation_id: None,
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn microsofts_table() {
        for (status, reason) in [
            (400, Reason::TeamsBadRequest),
            (401, Reason::TeamsUnauthorized),
            (403, Reason::TeamsForbidden),
            (404, Reason::TeamsNotFound),
            (413, Reason::PayloadTooLarge),
            (500, Reason::TeamsServerError),
            (418, Reason::TeamsUnexpectedStatus),
        ] {
            assert_eq!(classify(&api(status, None, None), WAIT), Verdict::DeadLetter(reason), "{status}");
        }
        for status in [412, 502, 503, 504] {
            assert!(matches!(classify(&api(status, None, None), WAIT), Verdict::Retry { quick: true, .. }), "{status}");
        }
    }

    #[test]
    fn throttling_waits_in_process_when_short_and_in_a_tier_when_long() {
        assert_eq!(
            classify(&api(429, Some("Throttled"), Some(2)), WAIT),
            Verdict::Retry { reason: Reason::TeamsThrottled, quick: true, after: Some(Duration::from_secs(2)) }
        );
        assert_eq!(
            classify(&api(429, Some("Throttled"), Some(60)), WAIT),
            Verdict::Retry { reason: Reason::TeamsThrottled, quick: false, after: Some(Duration::from_secs(60)) }
        );
    }

    #[test]
    fn quarantine_codes() {
        assert!(quarantines(&api(403, Some("BotNotInConversationRoster"), None)));
        assert!(quarantines(&api(403, Some("ConversationBlockedByUser"), None)));
        assert!(quarantines(&api(403, Some("BotDisabledByAdmin"), None)));
        assert!(quarantines(&api(404, Some("ConversationNotFound"), None)));
        assert!(!quarantines(&api(403, Some("Forbidden"), None)));
        assert!(!quarantines(&api(404, Some("ActivityNotFound"), None)));
    }

    #[test]
    fn token_rejections_are_not_retried_but_outages_are() {
        let rejected =
            |status| DeliveryError::Teams(TeamsError::TokenRejected { status, error: "invalid_client".into(), description: String::new() });
        assert_eq!(classify(&rejected(401), WAIT), Verdict::DeadLetter(Reason::TeamsUnauthorized));
        assert_eq!(classify(&rejected(400), WAIT), Verdict::DeadLetter(Reason::TeamsUnauthorized));
        assert!(matches!(classify(&rejected(503), WAIT), Verdict::Retry { .. }));
    }

    #[test]
    fn the_tier_follows_the_schedule_and_honours_retry_after() {
        let tiers: Vec<Duration> = [5, 30, 120, 600].map(Duration::from_secs).to_vec();
        assert_eq!(retry_tier(0, None, &tiers), Duration::from_secs(5));
        assert_eq!(retry_tier(1, None, &tiers), Duration::from_secs(30));
        assert_eq!(retry_tier(9, None, &tiers), Duration::from_secs(600));
        assert_eq!(retry_tier(0, Some(Duration::from_secs(20)), &tiers), Duration::from_secs(30));
        assert_eq!(retry_tier(0, Some(Duration::from_secs(30)), &tiers), Duration::from_secs(30));
        assert_eq!(retry_tier(2, Some(Duration::from_secs(10)), &tiers), Duration::from_secs(120));
        assert_eq!(retry_tier(0, Some(Duration::from_secs(7200)), &tiers), Duration::from_secs(600));
    }

    #[test]
    fn reasons_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
    }
}
