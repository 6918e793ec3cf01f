//! Order per conversation inside one worker: jobs of one lane (organization,
//! integration, recipient as the job names it) are posted one after the
//! other, in the order the queue delivered them; jobs of other lanes run
//! beside them.
//!
//! A job hands two signals to the next job of its lane. "Counted": its
//! request is counted against Teams' windows (about to be sent), so the next
//! one may wait for its own room and claim its ledger record while this one
//! posts. "Posted": its post is made, so the next one may send. A job that
//! ends without sending gives both. The claim of the next job thus overlaps
//! the post of this one: a busy conversation goes at the pace of its posts,
//! not of its posts plus MongoDB's answers. A job waiting for its turn holds
//! no concurrency slot. A lane holds at most `max` jobs: the next one is
//! turned away (the caller sends it to a retry tier), so that a flood into
//! one conversation cannot fill the prefetch the shard's other lanes need.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::sync::oneshot;

use crate::job::Job;

/// What the last job of a lane will signal to the one after it.
struct Signals {
    counted: Option<oneshot::Receiver<()>>,
    posted: oneshot::Receiver<()>,
}

#[derive(Default)]
struct Lane {
    pending: usize,
    tail: Option<Signals>,
}

pub(super) struct Lanes {
    lanes: Mutex<HashMap<String, Lane>>,
    max: usize,
}

/// A job's place in its lane: `wait` until the job before it is counted;
/// dropping it (or `Handoff::posted`) lets the next one send.
pub(super) struct Turn {
    lanes: Arc<Lanes>,
    key: String,
    before: Option<Signals>,
    handoff: Handoff,
}

type Slot = Arc<Mutex<Option<oneshot::Sender<()>>>>;

/// The job's side of its lane, for the step: when it may send, and the
/// signals it gives the next job (each given once; a later call does
/// nothing). The default belongs to no lane: nothing to wait for or give.
#[derive(Clone, Default)]
pub struct Handoff {
    counted: Slot,
    posted: Slot,
    /// The job before this one: its post.
    before_posted: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    backlog: bool,
}

fn give(slot: &Slot) {
    if let Some(signal) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = signal.send(());
    }
}

impl Handoff {
    /// Jobs of the same lane were waiting behind this one when it started:
    /// its conversation has a backlog.
    pub fn backlog(&self) -> bool {
        self.backlog
    }

    /// Wait until the job before this one in its lane has posted (or ended
    /// without posting).
    pub async fn previous_posted(&self) {
        let before = self.before_posted.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(before) = before {
            // An error means the one before was dropped: done as well.
            let _ = before.await;
        }
    }

    /// This job's request is counted against Teams' windows: the next job
    /// may take its room and claim.
    pub fn counted(&self) {
        give(&self.counted);
    }

    /// This job's post is made: the next job may send (recording and acking
    /// this one need not hold the lane).
    pub fn posted(&self) {
        give(&self.counted);
        give(&self.posted);
    }
}

/// The lane is full.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Full;

impl Lanes {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { lanes: Mutex::new(HashMap::new()), max: max.max(1) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the next place in `key`'s lane (in the order of the calls).
    pub fn enter(self: &Arc<Self>, key: String) -> Result<Turn, Full> {
        let mut lanes = self.lock();
        let lane = lanes.entry(key.clone()).or_default();
        if lane.pending >= self.max {
            return Err(Full);
        }
        let (counted, counted_rx) = oneshot::channel();
        let (posted, posted_rx) = oneshot::channel();
        let before = lane.tail.replace(Signals { counted: Some(counted_rx), posted: posted_rx });
        lane.pending += 1;
        let handoff = Handoff {
            counted: Arc::new(Mutex::new(Some(counted))),
            posted: Arc::new(Mutex::new(Some(posted))),
            before_posted: Arc::default(),
            backlog: false,
        };
        Ok(Turn { lanes: self.clone(), key, before, handoff })
    }

    /// Lanes holding at least one job.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.lock().len()
    }
}

impl Turn {
    /// Wait until the job before this one in its lane is counted against
    /// Teams' windows (or has ended).
    pub async fn wait(&mut self) {
        if let Some(counted) = self.before.as_mut().and_then(|before| before.counted.take()) {
            // An error means the one before was dropped: done as well.
            let _ = counted.await;
        }
    }

    /// The handle the job's step uses; call after `wait`.
    pub fn handoff(&mut self) -> Handoff {
        let backlog = self.lanes.lock().get(&self.key).is_some_and(|lane| lane.pending > 1);
        let before_posted = self.before.take().map(|before| before.posted);
        Handoff { before_posted: Arc::new(Mutex::new(before_posted)), backlog, ..self.handoff.clone() }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.handoff.posted();
        let mut lanes = self.lanes.lock();
        if let Some(lane) = lanes.get_mut(&self.key) {
            lane.pending -= 1;
            if lane.pending == 0 {
                lanes.remove(&self.key);
            }
        }
    }
}

/// The lane of a job body, read without decoding the rest: organization,
/// integration and the recipient as the job names it. A body that is not a
/// job has the empty lane (it is dead-lettered quickly there).
pub(super) fn lane_of(body: &[u8]) -> String {
    // Borrowed from the body unless a value has escapes.
    #[derive(Deserialize)]
    struct Recipient<'a> {
        #[serde(borrow)]
        conversation_id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        user_id: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        organization_id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        integration_id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        recipient: Option<Recipient<'a>>,
    }
    let Ok(head) = serde_json::from_slice::<Head>(body) else { return String::new() };
    let (conversation, user) = head.recipient.map_or((None, None), |r| (r.conversation_id, r.user_id));
    lane(
        head.organization_id.as_deref().unwrap_or_default(),
        head.integration_id.as_deref().unwrap_or_default(),
        conversation.as_deref(),
        user.as_deref(),
    )
}

/// The lane of a job already decoded: the same as [`lane_of`] its body.
pub(super) fn lane_of_job(job: &Job) -> String {
    let recipient = &job.recipient;
    lane(
        job.organization_id.as_str(),
        job.integration_id.as_str(),
        recipient.conversation_id.as_ref().map(|c| c.as_str()),
        recipient.user_id.as_ref().map(|u| u.as_str()),
    )
}

/// `organization\nintegration\nc:conversation`, or `u:user` when the job
/// names no conversation.
fn lane(organization: &str, integration: &str, conversation: Option<&str>, user: Option<&str>) -> String {
    let (kind, recipient) = match (conversation, user) {
        (Some(c), _) => ("c:", c),
        (None, Some(u)) => ("u:", u),
        (None, None) => ("", ""),
    };
    let mut lane = String::with_capacity(organization.len() + integration.len() + kind.len() + recipient.len() + 2);
    for part in [organization, "\n", integration, "\n", kind, recipient] {
        lane.push_str(part);
    }
    lane
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Jobs of one lane run one at a time in the order they entered; another
    /// lane is not held up; the lane is forgotten once empty.
    #[tokio::test]
    async fn one_lane_runs_in_order_and_others_run_beside_it() {
        let lanes = Lanes::new(10);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5_u64 {
            let mut turn = lanes.enter("a".into()).unwrap();
            let log = log.clone();
            // Later jobs sleep less: without the lane they would finish first.
            tasks.push(tokio::spawn(async move {
                turn.wait().await;
                tokio::time::sleep(Duration::from_millis(50 - i * 10)).await;
                log.lock().unwrap().push(format!("a{i}"));
            }));
        }
        let mut other = lanes.enter("b".into()).unwrap();
        other.wait().await;
        log.lock().unwrap().push("b".into());
        drop(other);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), ["b", "a0", "a1", "a2", "a3", "a4"]);
        assert_eq!(lanes.busy(), 0);
    }

    async fn pending(what: impl std::future::Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), what).await.is_err()
    }

    /// The next job may claim once the one before is counted, and send
    /// once it has posted; a job that ends without either gives both.
    #[tokio::test]
    async fn the_next_job_claims_once_the_one_before_is_counted_and_sends_once_it_posted() {
        let lanes = Lanes::new(10);
        let mut first = lanes.enter("a".into()).unwrap();
        let mut second = lanes.enter("a".into()).unwrap();
        first.wait().await;
        let ahead = first.handoff();
        assert!(ahead.backlog(), "a job waits behind the first");
        assert!(pending(second.wait()).await, "the second waits while the first is not counted");
        ahead.counted();
        tokio::time::timeout(Duration::from_secs(1), second.wait()).await.expect("counted: the second may claim");
        let behind = second.handoff();
        assert!(pending(behind.previous_posted()).await, "but not send before the first has posted");
        ahead.posted();
        tokio::time::timeout(Duration::from_secs(1), behind.previous_posted()).await.expect("posted: the second may send");
        assert_eq!(lanes.enter("a".into()).map(|_| ()).err(), None, "the first still counts until dropped");
        drop(first);

        // A job dropped without a word (it failed, or was handed back) lets the next one claim and send.
        let mut third = lanes.enter("b".into()).unwrap();
        let mut fourth = lanes.enter("b".into()).unwrap();
        third.wait().await;
        assert!(third.handoff().backlog(), "a job was waiting behind the third");
        drop(third);
        tokio::time::timeout(Duration::from_secs(1), fourth.wait()).await.expect("dropped: counted");
        tokio::time::timeout(Duration::from_secs(1), fourth.handoff().previous_posted()).await.expect("dropped: posted");
    }

    #[test]
    fn a_full_lane_turns_the_next_job_away() {
        let lanes = Lanes::new(2);
        let first = lanes.enter("a".into()).unwrap();
        let _second = lanes.enter("a".into()).unwrap();
        assert_eq!(lanes.enter("a".into()).err(), Some(Full));
        assert!(lanes.enter("b".into()).is_ok(), "another lane has room");
        drop(first);
        assert!(lanes.enter("a".into()).is_ok(), "room again once one left");
    }

    #[test]
    fn the_lane_is_the_organization_integration_and_recipient() {
        let job = |recipient: &str| format!(r#"{{"organization_id":"o","integration_id":"i","recipient":{recipient},"message":{{}}}}"#);
        assert_eq!(lane_of(job(r#"{"conversation_id":"19:x"}"#).as_bytes()), "o\ni\nc:19:x");
        assert_eq!(lane_of(job(r#"{"user_id":"u1"}"#).as_bytes()), "o\ni\nu:u1");
        assert_eq!(lane_of(b"not json"), "");
        assert_eq!(lane_of(br#"{"organization_id":7}"#), "");
    }

    /// The consumer finds a small job's lane from the job it decoded, and
    /// any other body's from the body: both must agree.
    #[test]
    fn a_decoded_job_has_the_lane_of_its_body() {
        let body = |recipient: &str| {
            format!(
                r#"{{"version":1,"job_id":"0b8f1f4e-8d3c-4a52-9a55-3f1c1b7a2e10","organization_id":"org \"7\" é","integration_id":"teams\nmain",
                "recipient":{recipient},"message":{{"title":"t","text":"x"}},"created_at":"2026-12-06T00:00:00Z"}}"#
            )
        };
        for recipient in
            [r#"{"conversation_id":"19:a\/b@thread"}"#, r#"{"user_id":"29:u"}"#, r#"{"conversation_id":"19:c","user_id":"29:u"}"#]
        {
            let body = body(recipient);
            let job = Job::decode(body.as_bytes()).expect("a valid job");
            assert_eq!(lane_of_job(&job), lane_of(body.as_bytes()), "{recipient}");
        }
    }
}
