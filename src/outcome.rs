//! What can happen to a job: the dead-letter vocabulary, the one classifier of
//! delivery errors, and the retry schedule (pure functions, unit-tested).
//!
//! The worker's step (`worker::step`) classifies each error once, here, and
//! turns the verdict into its one `Disposition`.

use std::fmt;
use std::time::Duration;

use crate::job::InvalidJob;
use crate::mongo::StoreError;
use crate::teams::TeamsError;

/// Declares [`Reason`] and its wire names from one list, so that the list of
/// all reasons, the names and the parser cannot drift apart.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// The fixed vocabulary of `x-herald-reason` (docs/contract.md §6,
        /// docs/tenancy.md). A new reason is a documented, versioned change.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    InvalidJob => "invalid_job",
    MissingOrganization => "missing_organization",
    JobExpired => "job_expired",
    OrgIntegrationNotFound => "org_integration_not_found",
    OrgIntegrationDisabled => "org_integration_disabled",
    OrgIntegrationMisconfigured => "org_integration_misconfigured",
    RecipientNotInOrganization => "recipient_not_in_organization",
    ConversationQuarantined => "conversation_quarantined",
    ServiceUrlNotAllowed => "service_url_not_allowed",
    PayloadTooLarge => "payload_too_large",
    TeamsBadRequest => "teams_bad_request",
    TeamsUnauthorized => "teams_unauthorized",
    TeamsForbidden => "teams_forbidden",
    TeamsNotFound => "teams_not_found",
    TeamsServerError => "teams_server_error",
    TeamsUnexpectedStatus => "teams_unexpected_status",
    /// A Workflows webhook refused the card (400).
    WorkflowBadRequest => "workflow_bad_request",
    /// A Workflows webhook refused the URL's signature (401, 403): the URL
    /// was regenerated or the flow's trigger changed.
    WorkflowUnauthorized => "workflow_unauthorized",
    /// A Workflows webhook does not exist (404, 410): the flow was deleted
    /// or turned off.
    WorkflowNotFound => "workflow_not_found",
    /// The request may have reached Teams but its answer was lost (a timeout
    /// after the request was written, a reset, a 2xx whose body cannot be
    /// read). Never resent automatically: an operator decides.
    DeliveryUnconfirmed => "delivery_unconfirmed",
    /// herald itself failed on this job (a panic): a bug to report.
    InternalError => "internal_error",
    RetriesExhausted => "retries_exhausted",
    DeliveryLimitExceeded => "delivery_limit_exceeded",
    // Reasons of retries (they only become dead letters as `retries_exhausted`).
    TeamsThrottled => "teams_throttled",
    TeamsUnavailable => "teams_unavailable",
    StoreUnavailable => "store_unavailable",
    StoreFailed => "store_failed",
    /// herald's own pacing said "later" (a wait beyond what a job may wait
    /// in process), or the job's conversation already has `worker.max_lane`
    /// jobs waiting in the worker.
    RateLimited => "rate_limited",
    /// Another delivery of the same job id is being sent right now.
    InProgress => "in_progress",
    /// A lookup did not finish within the delivery's claim.
    DeadlinePassed => "deadline_passed",
}

impl Reason {
    /// Whether a delayed retry for this reason uses up one of the job's
    /// `retry.max_hops`. A MongoDB outage or herald's own rate limit is no
    /// fault of the job: such jobs wait, however long it takes, and are then
    /// delivered (or expire by their `expires_at`).
    pub fn consumes_retry_budget(self) -> bool {
        !matches!(self, Reason::StoreUnavailable | Reason::RateLimited | Reason::InProgress)
    }

    pub fn parse(text: &str) -> Option<Self> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == text)
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
    #[error("herald failed while processing the job: {0}")]
    Internal(String),
    #[error("the delivery's claim ran out during {0}")]
    OutOfTime(&'static str),
    #[error("{0} attempts at this job ended without an outcome (their worker died or lost MongoDB mid-send)")]
    CrashedTooOften(u32),
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

/// The one classifier (docs/contract.md §7). Exhaustive over our own variants, so a
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
        DeliveryError::Internal(_) => DeadLetter(Reason::InternalError),
        DeliveryError::CrashedTooOften(_) => DeadLetter(Reason::DeliveryLimitExceeded),
        DeliveryError::RateLimited(wait) => Retry { reason: Reason::RateLimited, quick: false, after: Some(*wait) },
        DeliveryError::InProgress => Retry { reason: Reason::InProgress, quick: false, after: None },
        DeliveryError::OutOfTime(_) => Retry { reason: Reason::DeadlinePassed, quick: false, after: None },
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
        // Nothing reached Teams (no connection, or the token endpoint failed).
        TeamsError::Unsent { .. } | TeamsError::TokenTransport { .. } => unavailable,
        // It may have been posted: resending could post it twice.
        TeamsError::Ambiguous { .. } => DeadLetter(Reason::DeliveryUnconfirmed),
        // The identity platform refused the bot's credentials (wrong secret,
        // unknown app, wrong authority): an operator must fix the record.
        TeamsError::TokenRejected { status, .. } if *status >= 500 || *status == 429 => unavailable,
        TeamsError::TokenRejected { .. } => DeadLetter(Reason::TeamsUnauthorized),
        TeamsError::Workflow { status, retry_after, .. } => match status {
            400 => DeadLetter(Reason::WorkflowBadRequest),
            401 | 403 => DeadLetter(Reason::WorkflowUnauthorized),
            404 | 410 => DeadLetter(Reason::WorkflowNotFound),
            413 => DeadLetter(Reason::PayloadTooLarge),
            408 | 502 | 503 | 504 => Retry { reason: Reason::TeamsUnavailable, quick: true, after: *retry_after },
            429 => {
                let after = retry_after.unwrap_or(Duration::from_secs(1));
                Retry { reason: Reason::TeamsThrottled, quick: after <= max_in_process_wait, after: Some(after) }
            }
            // The flow may have run: as with the Connector, not resent.
            500 => DeadLetter(Reason::TeamsServerError),
            _ => DeadLetter(Reason::TeamsUnexpectedStatus),
        },
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

    fn workflow(status: u16, retry_after: Option<u64>) -> DeliveryError {
        DeliveryError::Teams(TeamsError::Workflow {
            status,
            code: None,
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    #[test]
    fn a_workflows_answer_names_what_the_operator_must_fix() {
        for (status, reason) in [
            (400, Reason::WorkflowBadRequest),
            (401, Reason::WorkflowUnauthorized),
            (403, Reason::WorkflowUnauthorized),
            (404, Reason::WorkflowNotFound),
            (410, Reason::WorkflowNotFound),
            (413, Reason::PayloadTooLarge),
            (500, Reason::TeamsServerError),
            (418, Reason::TeamsUnexpectedStatus),
        ] {
            assert_eq!(classify(&workflow(status, None), WAIT), Verdict::DeadLetter(reason), "{status}");
        }
        assert_eq!(
            classify(&workflow(429, Some(2)), WAIT),
            Verdict::Retry { reason: Reason::TeamsThrottled, quick: true, after: Some(Duration::from_secs(2)) }
        );
        assert!(matches!(classify(&workflow(503, None), WAIT), Verdict::Retry { reason: Reason::TeamsUnavailable, quick: true, .. }));
        assert!(!quarantines(&workflow(404, None)), "a webhook has no conversation to quarantine");
    }

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
    fn what_may_have_been_posted_is_never_retried() {
        let ambiguous = DeliveryError::Teams(TeamsError::Ambiguous { what: "the answer timed out".into() });
        assert_eq!(classify(&ambiguous, WAIT), Verdict::DeadLetter(Reason::DeliveryUnconfirmed));
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
        assert_eq!(retry_tier(u32::MAX, None, &tiers), Duration::from_secs(600));
    }

    #[test]
    fn reasons_round_trip_and_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
            assert!(names.insert(reason.as_str()), "{reason} twice");
        }
        assert_eq!(Reason::parse("teams_forbiden"), None);
    }

    /// docs/contract.md §6 names exactly the reasons of this enum, and
    /// docs/operations.md says what to do about each.
    #[test]
    fn the_contract_and_the_runbook_name_every_reason() {
        let contract = include_str!("../docs/contract.md");
        let section = &contract[contract.find("Reasons of dead letters:").unwrap()..contract.find("## 7.").unwrap()];
        let named: std::collections::BTreeSet<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| word.chars().all(|c| c.is_ascii_lowercase() || c == '_') && word.contains('_'))
            .collect();
        let reasons: std::collections::BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(named, reasons, "docs/contract.md §6 and Reason::ALL differ");
        let runbook = include_str!("../docs/operations.md");
        for reason in Reason::ALL {
            assert!(runbook.contains(&format!("`{reason}`")), "docs/operations.md does not mention `{reason}`");
        }
    }
}
