//! Ranks in separate processes (or machines) without GPUs: a star of TCP connections to rank 0.
//!
//! Rank 0 accepts every other rank at start-up (bounded by the distributed timeout), then, each
//! step, sends every rank the step's inputs and meets them in the collectives: it gathers their
//! buffers, combines them in rank order exactly as the in-process communicator does (so the
//! results are bit-identical to `--tp N` in one process), and sends the result back. Every read
//! is bounded by the timeout, so a dead or stalled rank fails its peers with an error naming it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rendezvous::WorldSpec;
use super::{concat_cols, sum_in_rank_order, Communicator};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::engine::KvPolicy;
use crate::error::{Error, Result};
use crate::runtime::batch::Batch;

/// What rank 0 tells every rank before loading, so that every rank opens its runner alike.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// Token slots per KV block.
    pub block_size: usize,
    /// Positions the RoPE tables cover.
    pub max_positions: usize,
    /// How every rank sizes its KV cache; after loading, all take the smallest count
    /// ([`TcpComm::agree_min`]).
    pub kv: KvPolicy,
    /// The NCCL unique id every rank joins with, when rank 0 runs on CUDA (the other ranks
    /// then run on their GPUs too); `None` on CPUs.
    #[serde(default)]
    pub nccl_id: Option<Vec<u8>>,
}

/// One rank's end of the star.
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.. in order. Other ranks: the stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
    timeout: Duration,
}

fn io_err(what: &str, rank: usize, timeout: Duration, e: std::io::Error) -> Error {
    let why = match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("no answer within {timeout:?}"),
        std::io::ErrorKind::UnexpectedEof => "it closed the connection (exited?)".into(),
        _ => e.to_string(),
    };
    Error::Backend(format!("tensor-parallel rank {rank}: {what}: {why}"))
}

fn send_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    s.flush()
}

fn recv_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl TcpComm {
    /// Rank 0: accepts every other rank on `spec`'s master address within `timeout`.
    pub fn accept(spec: &WorldSpec, timeout: Duration) -> Result<Self> {
        let bind = format!("{}:{}", spec.master_addr, spec.master_port);
        let listener =
            TcpListener::bind(&bind).map_err(|e| Error::Backend(format!("rank 0 cannot listen on {bind}: {e}")))?;
        Self::accept_on(&listener, spec.world_size, timeout)
    }

    /// [`TcpComm::accept`] on a bound listener.
    pub fn accept_on(listener: &TcpListener, world: usize, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(|e| Error::Backend(format!("rank 0: {e}")))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<String> =
                    slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                return Err(Error::Backend(format!(
                    "ranks {} did not join rank 0 within {timeout:?} (check MASTER_ADDR/MASTER_PORT and that every rank started)",
                    missing.join(", ")
                )));
            }
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(timeout));
                    let _ = s.set_nodelay(true);
                    let mut rank = [0u8; 8];
                    if s.read_exact(&mut rank).is_err() {
                        continue;
                    }
                    let r = u64::from_le_bytes(rank) as usize;
                    if (1..world).contains(&r) && slots[r - 1].is_none() {
                        slots[r - 1] = Some(s);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(Error::Backend(format!("rank 0: accept failed: {e}"))),
            }
        }
        Ok(TcpComm { rank: 0, world, peers: Mutex::new(slots.into_iter().flatten().collect()), timeout })
    }

    /// Any other rank: connects to rank 0, retrying while it starts, within `timeout`.
    pub fn connect(spec: &WorldSpec, timeout: Duration) -> Result<Self> {
        let target = format!("{}:{}", spec.master_addr, spec.master_port);
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect(&target) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(timeout));
                    let _ = s.set_nodelay(true);
                    s.write_all(&(spec.rank as u64).to_le_bytes())
                        .map_err(|e| Error::Backend(format!("rank {}: rank 0 at {target}: {e}", spec.rank)))?;
                    return Ok(TcpComm {
                        rank: spec.rank,
                        world: spec.world_size,
                        peers: Mutex::new(vec![s]),
                        timeout,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Backend(format!(
                        "rank {} could not reach rank 0 at {target} within {timeout:?}: {e}",
                        spec.rank
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn peers(&self) -> Result<std::sync::MutexGuard<'_, Vec<TcpStream>>> {
        self.peers.lock().map_err(|_| Error::Backend("tensor-parallel streams poisoned".into()))
    }

    /// Rank 0: sends every rank a message (the start-up [`Hello`], then each step).
    fn send_all(&self, bytes: &[u8], what: &str) -> Result<()> {
        for (i, s) in self.peers()?.iter_mut().enumerate() {
            send_frame(s, bytes).map_err(|e| io_err(what, i + 1, self.timeout, e))?;
        }
        Ok(())
    }

    /// Any other rank: the next message from rank 0; `None` when rank 0 has closed (shutdown).
    /// With `idle`, the wait for the message to start has no timeout (a server may go hours
    /// without a step); its body, once started, must arrive within the timeout.
    fn recv_from_root(&self, idle: bool) -> Result<Option<Vec<u8>>> {
        let mut peers = self.peers()?;
        let s = peers.first_mut().ok_or_else(|| Error::Backend("no stream to rank 0".into()))?;
        let received = if idle {
            let _ = s.set_read_timeout(None);
            let mut len = [0u8; 8];
            let started = s.read_exact(&mut len);
            let _ = s.set_read_timeout(Some(self.timeout));
            started.and_then(|()| {
                let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
                s.read_exact(&mut buf).map(|()| buf)
            })
        } else {
            recv_frame(s)
        };
        match received {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_err("waiting for rank 0", 0, self.timeout, e)),
        }
    }

    /// Rank 0: tells every rank how to size its shard.
    pub fn send_hello(&self, hello: &Hello) -> Result<()> {
        self.send_all(&serde_json::to_vec(hello).map_err(|e| Error::Backend(e.to_string()))?, "hello")
    }

    /// Other ranks: rank 0's [`Hello`].
    pub fn recv_hello(&self) -> Result<Hello> {
        let bytes =
            self.recv_from_root(false)?.ok_or_else(|| Error::Backend("rank 0 closed before its hello".into()))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Backend(format!("bad hello from rank 0: {e}")))
    }

    /// Rank 0: hands every rank the step it is about to run.
    pub fn send_step(&self, batch: &Batch, rows: &[usize]) -> Result<()> {
        let bytes = serde_json::to_vec(&(batch, rows)).map_err(|e| Error::Backend(e.to_string()))?;
        self.send_all(&bytes, "sending the step")
    }

    /// Other ranks: the next step, or `None` once rank 0 has shut down. Waiting for it has no
    /// timeout: rank 0 runs steps only while it has requests.
    pub fn recv_step(&self) -> Result<Option<(Batch, Vec<usize>)>> {
        match self.recv_from_root(true)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Backend(format!("bad step from rank 0: {e}"))),
        }
    }

    /// Every rank's `value`, reduced to the smallest, on every rank (the KV blocks that fit on
    /// the fullest GPU).
    pub fn agree_min(&self, value: u64) -> Result<u64> {
        let out = self.exchange_bytes(value.to_le_bytes().to_vec(), |all| {
            let min = all.iter().filter_map(|b| Some(u64::from_le_bytes(b.as_slice().try_into().ok()?))).min();
            min.unwrap_or(0).to_le_bytes().to_vec()
        })?;
        let bytes: [u8; 8] =
            out.as_slice().try_into().map_err(|_| Error::Backend("bad agreement from rank 0".into()))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Rank 0 combines every rank's buffer with `combine` (rank order); everyone gets the result.
    fn exchange(&self, own: Vec<f32>, combine: impl FnOnce(&[Vec<f32>]) -> Vec<f32>) -> Result<Vec<f32>> {
        let out = self.exchange_bytes(f32_bytes(&own), |all| {
            let bufs: Vec<Vec<f32>> = all.iter().map(|b| bytes_f32(b)).collect();
            f32_bytes(&combine(&bufs))
        })?;
        Ok(bytes_f32(&out))
    }

    /// [`Self::exchange`] over raw bytes.
    fn exchange_bytes(&self, own: Vec<u8>, combine: impl FnOnce(&[Vec<u8>]) -> Vec<u8>) -> Result<Vec<u8>> {
        let mut peers = self.peers()?;
        if self.rank == 0 {
            let mut all = vec![own];
            for (i, s) in peers.iter_mut().enumerate() {
                all.push(recv_frame(s).map_err(|e| io_err("collective", i + 1, self.timeout, e))?);
            }
            let out = combine(&all);
            for (i, s) in peers.iter_mut().enumerate() {
                send_frame(s, &out).map_err(|e| io_err("collective", i + 1, self.timeout, e))?;
            }
            Ok(out)
        } else {
            let s = peers.first_mut().ok_or_else(|| Error::Backend("no stream to rank 0".into()))?;
            send_frame(s, &own).map_err(|e| io_err("collective", 0, self.timeout, e))?;
            recv_frame(s).map_err(|e| io_err("collective", 0, self.timeout, e))
        }
    }
}

impl Communicator<CpuBackend> for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, _: &CpuBackend, x: &mut CpuTensor) -> Result<()> {
        let len = x.data.len();
        x.data = self.exchange(std::mem::take(&mut x.data), |bufs| sum_in_rank_order(bufs, len))?;
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, x: CpuTensor) -> Result<CpuTensor> {
        let (rows, cols, world) = (x.rows, x.cols, self.world);
        let data = self.exchange(x.data, |bufs| concat_cols(bufs, rows, cols))?;
        CpuTensor::new(data, rows, cols * world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, world: usize, port: u16) -> WorldSpec {
        WorldSpec {
            world_size: world,
            rank,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    /// A server idle for longer than the distributed timeout does not lose its ranks: waiting
    /// for the next step has no timeout (collectives still have one).
    #[test]
    fn an_idle_gap_longer_than_the_timeout_is_not_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let timeout = Duration::from_millis(300);
        let worker = std::thread::spawn(move || {
            let comm = TcpComm::connect(&spec(1, 2, port), timeout).unwrap();
            let step = comm.recv_step().unwrap().expect("a step after the idle gap");
            (step, comm.recv_step().unwrap())
        });
        let root = TcpComm::accept_on(&listener, 2, timeout).unwrap();
        std::thread::sleep(timeout * 3);
        let mut batch = Batch::new(16);
        batch.push(&[1, 2, 3], 0, &[0]).unwrap();
        root.send_step(&batch, &[2]).unwrap();
        drop(root);
        let ((got, rows), after) = worker.join().unwrap();
        assert_eq!((got, rows), (batch, vec![2]));
        assert!(after.is_none(), "rank 0 closing ends the loop");
    }

    /// Three ranks on 127.0.0.1 agree on the smallest value; the hello (with its optional fields)
    /// reaches every rank intact.
    #[test]
    fn ranks_agree_on_the_smallest_value() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let timeout = Duration::from_secs(20);
        let hello =
            Hello { block_size: 16, max_positions: 64, kv: KvPolicy::DeviceFraction(0.9), nccl_id: Some(vec![7; 128]) };
        let workers: Vec<_> = [(1usize, 70u64), (2, 30)]
            .into_iter()
            .map(|(rank, value)| {
                std::thread::spawn(move || {
                    let comm = TcpComm::connect(&spec(rank, 3, port), timeout).unwrap();
                    let hello = comm.recv_hello().unwrap();
                    (hello, comm.agree_min(value).unwrap())
                })
            })
            .collect();
        let root = TcpComm::accept_on(&listener, 3, timeout).unwrap();
        root.send_hello(&hello).unwrap();
        assert_eq!(root.agree_min(50).unwrap(), 30);
        for w in workers {
            let (got, min) = w.join().unwrap();
            assert_eq!(got, hello);
            assert_eq!(min, 30);
        }
    }
}
