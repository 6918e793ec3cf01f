//! How the kernel schedules the worker's threads (`worker.batch_scheduling`).
//!
//! A job crosses threads several times: tokio's thread hands an ack or a
//! publish to lapin's I/O thread for its connection, which hands deliveries
//! and confirms back. Under Linux's default policy a woken thread usually
//! preempts the one that woke it, so each hand-over costs two context
//! switches and the cache of the thread that was running. `SCHED_BATCH`
//! tells the kernel these threads are throughput work: a woken thread waits
//! for the running one to block or use up its slice, and by then the frames
//! of many jobs are queued for one wake-up. It needs no privilege (it is not
//! a real-time policy; the nice value still applies) and threads started
//! later inherit it, so it is set before the async runtime starts its
//! threads and before any connection starts its I/O thread.

use std::sync::OnceLock;

/// What setting the policy gave, for the worker to log once telemetry runs.
static OUTCOME: OnceLock<Result<(), String>> = OnceLock::new();

/// Put the calling thread, and every thread it starts later, under
/// `SCHED_BATCH`. Call it before the runtime is built; the outcome is kept for
/// [`log_outcome`].
pub fn use_batch_policy() {
    let _ = OUTCOME.set(set_batch());
}

/// Log what [`use_batch_policy`] did, if it ran.
pub fn log_outcome() {
    match OUTCOME.get() {
        Some(Ok(())) => tracing::info!("threads run under SCHED_BATCH (worker.batch_scheduling)"),
        Some(Err(why)) => {
            tracing::warn!(error = %why, "could not run the threads under SCHED_BATCH; going on with the default policy (worker.batch_scheduling)")
        }
        None => {}
    }
}

#[cfg(target_os = "linux")]
fn set_batch() -> Result<(), String> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the
    // call; 0 names the calling thread; SCHED_BATCH requires priority 0.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().to_string()) }
}

#[cfg(not(target_os = "linux"))]
fn set_batch() -> Result<(), String> {
    Err("SCHED_BATCH exists only on Linux".into())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn current_policy_is_batch() -> bool {
        // SAFETY: sched_getscheduler reads the calling thread's policy; 0
        // names the calling thread and no memory is passed.
        unsafe { libc::sched_getscheduler(0) == libc::SCHED_BATCH }
    }

    #[test]
    fn threads_started_after_the_policy_inherit_it() {
        // In a thread of its own, so the test runner's threads keep theirs.
        std::thread::spawn(|| {
            assert!(!current_policy_is_batch());
            assert_eq!(set_batch(), Ok(()));
            assert!(current_policy_is_batch());
            let child = std::thread::spawn(current_policy_is_batch).join().unwrap();
            assert!(child, "a thread started afterwards (tokio's, lapin's) runs under SCHED_BATCH too");
        })
        .join()
        .unwrap();
    }
}
