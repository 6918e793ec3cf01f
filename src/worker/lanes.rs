//! Order per conversation inside one worker: jobs of one lane (organization,
//! integration, recipient as the job names it) run one after the other, in
//! the order the queue delivered them; jobs of other lanes run beside them.
//!
//! Each job entering a lane takes the previous job's "done" signal and
//! leaves its own for the next; a job waiting for its turn holds no
//! concurrency slot. A lane holds at most `max` jobs: the next one is turned
//! away (the caller sends it to a retry tier), so that a flood into one
//! conversation cannot fill the prefetch the shard's other lanes need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::sync::oneshot;

#[derive(Default)]
struct Lane {
    pending: usize,
    tail: Option<oneshot::Receiver<()>>,
}

pub(super) struct Lanes {
    lanes: Mutex<HashMap<String, Lane>>,
    max: usize,
}

/// A job's place in its lane: `wait` for the jobs before it; dropping it
/// (or `NextGo::go`, once the job's post is done) lets the next one go.
pub(super) struct Turn {
    lanes: Arc<Lanes>,
    key: String,
    before: Option<oneshot::Receiver<()>>,
    done: NextGo,
}

/// Lets the next job of a lane go before this one is settled: once its post
/// is made, recording it and acking it need not hold the lane.
#[derive(Clone, Default)]
pub struct NextGo(Arc<Mutex<Option<oneshot::Sender<()>>>>, bool);

impl NextGo {
    /// Jobs of the same lane were waiting behind this one when it started:
    /// its conversation has a backlog.
    pub fn backlog(&self) -> bool {
        self.1
    }

    pub fn go(&self) {
        if let Some(done) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = done.send(());
        }
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
        let (done, next) = oneshot::channel();
        let before = lane.tail.replace(next);
        lane.pending += 1;
        Ok(Turn { lanes: self.clone(), key, before, done: NextGo(Arc::new(Mutex::new(Some(done))), false) })
    }

    /// Lanes holding at least one job.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.lock().len()
    }
}

impl Turn {
    /// Wait until every job before this one in its lane is done.
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // An error means the one before was dropped: done as well.
            let _ = before.await;
        }
    }

    /// The handle the job's step uses; call after `wait`.
    pub fn next_go(&self) -> NextGo {
        let backlog = self.lanes.lock().get(&self.key).is_some_and(|lane| lane.pending > 1);
        NextGo(self.done.0.clone(), backlog)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.done.go();
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
    #[derive(Deserialize)]
    struct Recipient {
        conversation_id: Option<String>,
        user_id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Head {
        organization_id: Option<String>,
        integration_id: Option<String>,
        recipient: Option<Recipient>,
    }
    let Ok(head) = serde_json::from_slice::<Head>(body) else { return String::new() };
    let (conversation, user) = head.recipient.map_or((None, None), |r| (r.conversation_id, r.user_id));
    let recipient = match (conversation, user) {
        (Some(c), _) => format!("c:{c}"),
        (None, Some(u)) => format!("u:{u}"),
        (None, None) => String::new(),
    };
    format!("{}\n{}\n{recipient}", head.organization_id.unwrap_or_default(), head.integration_id.unwrap_or_default())
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

    #[tokio::test]
    async fn the_next_job_may_go_once_the_one_before_says_so() {
        let lanes = Lanes::new(10);
        let first = lanes.enter("a".into()).unwrap();
        let mut second = lanes.enter("a".into()).unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), second.wait()).await;
        assert!(waiting.is_err(), "the second waits while the first holds the lane");
        first.next_go().go();
        tokio::time::timeout(Duration::from_secs(1), second.wait()).await.expect("the second goes");
        assert_eq!(lanes.enter("a".into()).map(|_| ()).err(), None, "the first still counts until dropped");
        drop(first);
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
}
