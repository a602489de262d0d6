//! A watchdog for collectives that have no timeout of their own (NCCL): it aborts the group
//! when one step outlives the distributed timeout, so that a dead or stalled peer fails the
//! others instead of hanging them.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Aborts a group when one step runs longer than the timeout. A thread waits for each step to
/// start, then for it to end; past the timeout it calls `abort` once for that step.
pub(super) struct Watchdog {
    events: Option<mpsc::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

/// Marks a step as running until dropped.
pub(super) struct Armed<'a>(&'a Watchdog);

impl Watchdog {
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(super) fn new(timeout: Duration, abort: impl Fn() + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            // `true`: a step started; `false`: it ended. The channel closes with the runner.
            while let Ok(started) = rx.recv() {
                if !started {
                    continue;
                }
                match rx.recv_timeout(timeout) {
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        tracing::error!(
                            "a step ran past {timeout:?}: aborting the NCCL group (a rank failed or stalled)"
                        );
                        abort();
                        // Wait for the step to end (it now fails) before watching the next.
                        if rx.recv().is_err() {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Watchdog { events: Some(tx), thread: Some(thread) }
    }

    /// Starts timing a step; it ends when the guard drops.
    pub(super) fn arm(&self) -> Armed<'_> {
        if let Some(tx) = &self.events {
            let _ = tx.send(true);
        }
        Armed(self)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Some(tx) = &self.0.events {
            let _ = tx.send(false);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.events = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A step past the timeout is aborted once; steps within it never are.
    #[test]
    fn the_watchdog_aborts_only_a_step_that_outlives_the_timeout() {
        let aborts = Arc::new(AtomicUsize::new(0));
        let counter = aborts.clone();
        let dog = Watchdog::new(Duration::from_millis(100), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..3 {
            let _armed = dog.arm();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(aborts.load(Ordering::SeqCst), 0);
        {
            let _armed = dog.arm();
            std::thread::sleep(Duration::from_millis(400));
        }
        {
            let _armed = dog.arm();
        }
        drop(dog);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }
}
