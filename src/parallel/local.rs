//! The in-process communicator: ranks are threads of one process sharing host memory.
//!
//! Each collective has every rank deposit its buffer, meet at a barrier, combine all buffers in
//! rank order (so every rank computes bit-identical results), and meet again before the slots
//! are reused. A rank that fails poisons the group, so its peers return an error instead of
//! waiting forever at the next barrier.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{concat_cols, sum_in_rank_order, Communicator};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::error::{Error, Result};

#[derive(Debug)]
struct State {
    arrived: usize,
    generation: u64,
    poisoned: Option<String>,
    slots: Vec<Vec<f32>>,
}

/// What the ranks of one in-process group share.
#[derive(Debug)]
pub struct LocalGroup {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
    timeout: Duration,
}

impl LocalGroup {
    /// A group of `world` ranks; a collective waiting longer than `timeout` fails.
    pub fn new(world: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(LocalGroup {
            world,
            state: Mutex::new(State { arrived: 0, generation: 0, poisoned: None, slots: vec![Vec::new(); world] }),
            turn: Condvar::new(),
            timeout,
        })
    }

    /// Communicators for every rank, in rank order.
    pub fn communicators(self: &Arc<Self>) -> Vec<LocalComm> {
        (0..self.world).map(|rank| LocalComm { rank, group: self.clone() }).collect()
    }

    /// Fails every pending and future collective with `why`.
    pub fn poison(&self, why: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.poisoned.get_or_insert_with(|| why.to_owned());
        }
        self.turn.notify_all();
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Backend("tensor-parallel group: a rank panicked".into()))
    }

    /// Waits until every rank has arrived; runs `f` on the shared state once all have.
    fn barrier<R>(&self, deposit: impl FnOnce(&mut State), f: impl FnOnce(&State) -> R) -> Result<R> {
        let mut s = self.lock()?;
        deposit(&mut s);
        let gen = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.turn.notify_all();
        } else {
            while s.generation == gen && s.poisoned.is_none() {
                let (next, timed_out) =
                    self.turn.wait_timeout(s, self.timeout).map_err(|_| Error::Backend("rank panicked".into()))?;
                s = next;
                if timed_out.timed_out() && s.generation == gen {
                    let why = format!("a rank did not reach the collective within {:?}", self.timeout);
                    s.poisoned.get_or_insert(why);
                    self.turn.notify_all();
                }
            }
        }
        if let Some(why) = &s.poisoned {
            return Err(Error::Backend(format!("tensor-parallel group failed: {why}")));
        }
        Ok(f(&s))
    }
}

/// One rank's handle on a [`LocalGroup`].
#[derive(Debug, Clone)]
pub struct LocalComm {
    rank: usize,
    group: Arc<LocalGroup>,
}

impl LocalComm {
    /// The group this rank belongs to.
    pub fn group(&self) -> &Arc<LocalGroup> {
        &self.group
    }

    /// Deposits `data`, then combines every rank's deposit with `f` once all are there.
    fn exchange<R>(&self, data: Vec<f32>, f: impl FnOnce(&[Vec<f32>]) -> R) -> Result<R> {
        let g = &self.group;
        let out = g.barrier(|s| s.slots[self.rank] = data, |s| f(&s.slots))?;
        // Nobody may overwrite a slot before every rank has read them all.
        g.barrier(|_| {}, |_| ())?;
        Ok(out)
    }
}

impl Communicator<CpuBackend> for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, _: &CpuBackend, x: &mut CpuTensor) -> Result<()> {
        let len = x.data.len();
        let sum = self.exchange(std::mem::take(&mut x.data), |bufs| sum_in_rank_order(bufs, len))?;
        x.data = sum;
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, x: CpuTensor) -> Result<CpuTensor> {
        let (rows, cols) = (x.rows, x.cols);
        let world = self.group.world;
        let data = self.exchange(x.data, |bufs| concat_cols(bufs, rows, cols))?;
        CpuTensor::new(data, rows, cols * world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_and_gather_across_threads() {
        let group = LocalGroup::new(3, Duration::from_secs(10));
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .communicators()
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank as f32;
                        let mut x = CpuTensor::new(vec![r, 10.0 * r], 1, 2).unwrap();
                        c.all_reduce_sum(&CpuBackend, &mut x).unwrap();
                        let g = c.all_gather_cols(&CpuBackend, CpuTensor::new(vec![r; 2], 2, 1).unwrap()).unwrap();
                        (x.data, g.data)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
        }
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let group = LocalGroup::new(2, Duration::from_millis(100));
        let c = group.communicators().remove(0);
        let mut x = CpuTensor::new(vec![1.0], 1, 1).unwrap();
        let err = c.all_reduce_sum(&CpuBackend, &mut x).unwrap_err();
        assert!(err.to_string().contains("did not reach"), "{err}");
    }
}
