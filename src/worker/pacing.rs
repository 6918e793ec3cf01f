//! herald's own pacing by Teams' published limits (the `teams_limits`
//! crate), so that a worker rarely meets a 429 and a busy conversation does
//! not hold the slots other conversations need.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

pub(super) struct Pacing {
    windows: Mutex<teams_limits::Throttle>,
    max_wait: Duration,
    /// The workers whose requests were imported, by the number their
    /// requests carry in the windows.
    origins: Mutex<HashMap<String, u32>>,
    /// How long a key's requests are carried: its longest window.
    horizon: Duration,
}

/// The most keys one worker carries to the next (the fullest first).
const CARRIED_KEYS: usize = 256;

/// Why a send may not go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Paced {
    /// Only after this long: more than a job may wait in process.
    Later(Duration),
    /// The wait was cut short by the caller's stop.
    Stopped,
}

impl Pacing {
    /// Bots' pacing: Teams' windows per bot and conversation, and per bot
    /// and tenant.
    pub fn new(settings: &Settings) -> Self {
        let limits = &settings.teams.rate_limits;
        Self::of(
            teams_limits::Limits { per_conversation: limits.per_conversation.clone(), per_app_tenant: limits.per_app_tenant.clone() },
            settings,
        )
    }

    /// Workflows webhooks' pacing: `teams.rate_limits.per_workflow` per
    /// webhook (its key in the conversation's place), nothing shared.
    pub fn for_workflows(settings: &Settings) -> Self {
        let per_workflow = settings.teams.rate_limits.per_workflow.clone();
        Self::of(teams_limits::Limits { per_conversation: per_workflow, per_app_tenant: Vec::new() }, settings)
    }

    fn of(windows: teams_limits::Limits, settings: &Settings) -> Self {
        let limits = &settings.teams.rate_limits;
        let margin = Duration::from_millis(limits.margin_ms);
        let longest = windows.per_conversation.iter().chain(&windows.per_app_tenant).map(|w| w.per_secs).max().unwrap_or(0);
        Self {
            windows: Mutex::new(teams_limits::Throttle::new(true, windows).with_margin(margin)),
            max_wait: Duration::from_millis(limits.max_in_process_wait_ms),
            origins: Mutex::new(HashMap::new()),
            horizon: Duration::from_secs(longest) + margin,
        }
    }

    /// How long what `export` says stays of use to the next worker.
    pub fn horizon(&self) -> Duration {
        self.horizon
    }

    /// This worker's own recent requests in its busiest keys, for the worker
    /// that paces them next (docs/deploy.md, "Fleet-wide pacing").
    pub fn export(&self) -> Vec<teams_limits::Carried> {
        self.windows().export(Instant::now().into_std(), CARRIED_KEYS)
    }

    /// Count the requests worker `origin` exported `behind` ago (by the
    /// MongoDB server's clock), replacing what it said before; `unaccounted`:
    /// how long it may have gone on sending unseen (see `Throttle::import`).
    pub fn import(&self, origin: &str, carried: &[teams_limits::Carried], behind: Duration, unaccounted: Duration) {
        let number = {
            let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
            let next = u32::try_from(origins.len() + 1).unwrap_or(u32::MAX);
            *origins.entry(origin.to_owned()).or_insert(next)
        };
        let Some(exported) = Instant::now().into_std().checked_sub(behind) else { return };
        self.windows().import(number, carried, exported, unaccounted);
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, teams_limits::Throttle> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys (conversations and tenants) tracked right now.
    pub fn tracked(&self) -> usize {
        self.windows().tracked()
    }

    /// Forget conversations and tenants whose windows have passed.
    pub fn sweep(&self) {
        self.windows().sweep(Instant::now().into_std());
    }

    /// Teams answered 429 for this conversation: the request took no room
    /// (Teams does not count it), and nothing more goes into the
    /// conversation for `after`.
    pub fn hold(&self, app: &str, tenant: &str, conversation: &str, after: Duration) {
        let now = Instant::now().into_std();
        let mut windows = self.windows();
        windows.refund(app, tenant, conversation);
        windows.hold(app, conversation, now + after);
    }

    /// Wait until every window of this bot, tenant and conversation has room,
    /// without taking it (`admit` takes it, just before the request, so that
    /// the time herald counts is the time Teams sees); `Ok(true)` when that
    /// took a wait.
    pub async fn room(&self, app: &str, tenant: &str, conversation: &str, stop: &CancellationToken) -> Result<bool, Paced> {
        self.wait(app, tenant, conversation, None, stop, false).await
    }

    /// Wait for room in every window of this bot, tenant and conversation and
    /// take it; `Ok(true)` when that took a wait (the conversation or tenant
    /// is at Teams' pace). `Later` when the wait is longer than a job may wait
    /// in process or, with a `deadline` `(until, reserve)`, would pass `until`
    /// less `reserve` for the send; `Stopped` when `stop` comes first.
    pub async fn admit(
        &self,
        app: &str,
        tenant: &str,
        conversation: &str,
        deadline: Option<(Instant, Duration)>,
        stop: &CancellationToken,
    ) -> Result<bool, Paced> {
        self.wait(app, tenant, conversation, deadline, stop, true).await
    }

    async fn wait(
        &self,
        app: &str,
        tenant: &str,
        conversation: &str,
        deadline: Option<(Instant, Duration)>,
        stop: &CancellationToken,
        take: bool,
    ) -> Result<bool, Paced> {
        let mut waited = false;
        loop {
            let now = Instant::now();
            let verdict = if take {
                self.windows().admit(app, tenant, conversation, now.into_std())
            } else {
                self.windows().room(app, tenant, conversation, now.into_std())
            };
            let wait = match verdict {
                Ok(()) => return Ok(waited),
                Err(wait) => wait,
            };
            let fits = deadline.is_none_or(|(until, reserve)| now.checked_add(wait + reserve).is_some_and(|end| end <= until));
            if wait > self.max_wait || !fits {
                return Err(Paced::Later(wait));
            }
            waited = true;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return Err(Paced::Stopped),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident and peak resident memory of this process, in MiB (Linux).
    fn rss_mib() -> (f64, f64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| {
            status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }

    /// 100,000 distinct conversations in 100,000 distinct tenants are
    /// admitted; once their windows (the longest is an hour) have passed, a
    /// sweep forgets every one of them. The clock is tokio's, paused.
    #[tokio::test(start_paused = true)]
    async fn a_hundred_thousand_conversations_and_tenants_are_forgotten_once_their_windows_pass() {
        let settings = Settings::from_figment(Settings::defaults()).unwrap();
        let pacing = Pacing::new(&settings);
        let until = Instant::now() + Duration::from_secs(60);
        let stop = CancellationToken::new();
        let (rss_before, _) = rss_mib();
        for i in 0..100_000 {
            let (tenant, conversation) = (format!("tenant-{i}"), format!("19:conversation-{i}@thread.tacv2"));
            assert_eq!(pacing.admit("app", &tenant, &conversation, Some((until, Duration::ZERO)), &stop).await, Ok(false));
        }
        let tracked = pacing.tracked();
        assert!(tracked >= 100_000, "{tracked} keys tracked");
        let (rss_full, peak) = rss_mib();

        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        pacing.sweep();
        assert_eq!(pacing.tracked(), 100_000, "the tenants' windows (seconds) passed, the conversations' hour has not");
        tokio::time::advance(Duration::from_secs(31 * 60)).await;
        pacing.sweep();
        assert_eq!(pacing.tracked(), 0, "every window passed: nothing kept");
        let (rss_after, _) = rss_mib();
        eprintln!(
            "pacing, 100,000 conversations and tenants: {tracked} keys; RSS {rss_before:.1} MiB before, {rss_full:.1} MiB full \
             (peak {peak:.1} MiB), {rss_after:.1} MiB after the sweep"
        );
    }
}
