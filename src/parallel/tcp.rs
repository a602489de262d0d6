//! Ranks in separate processes (or machines): a star of TCP connections to rank 0, the control
//! plane of a multi-process deployment (and the collectives of CPU ranks).
//!
//! Rank 0 listens only until its world is complete. Every connection must open with a
//! [`Handshake`] within [`HANDSHAKE_TIMEOUT`], checked on a thread of its own so that a silent
//! or garbage connection never blocks the accept loop nor takes a slot: only a handshake of the
//! same protocol, model, world and token claims a rank, and a refused rank is told why. After
//! that, every message is a typed frame of bounded length ([`super::frame`]). Each step rank 0
//! sends every rank the step's inputs and meets them in the collectives: it gathers their
//! buffers, combines them in rank order exactly as the in-process communicator does (so the
//! results are bit-identical to `--tp N` in one process), and sends the result back. Every read
//! is bounded by the timeout, so a dead or stalled rank fails its peers with an error naming it.

use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use super::frame::{self, FrameType};
use super::handshake::Handshake;
use super::rendezvous::WorldSpec;
use super::{concat_cols, sum_in_rank_order, Communicator};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::error::{Error, Result};
use crate::runtime::batch::Batch;
use crate::runtime::batch_wire;

/// How long a new connection has to complete its handshake (at most; less when the distributed
/// timeout is shorter).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake rank 0 checks at once; more wait in the listen queue.
const MAX_PENDING_HANDSHAKES: usize = 64;

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

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A connection whose handshake checked out, or was refused with a reason to send back.
type Checked = (TcpStream, std::result::Result<usize, String>);

/// Reads and checks a new connection's handshake within `deadline`; `None` for anything that
/// is not a handshake (garbage, silence, a stranger), which is then dropped without a word.
fn check_handshake(mut s: TcpStream, ours: &Handshake, deadline: Duration) -> Option<Checked> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(deadline)).ok()?;
    s.set_write_timeout(Some(deadline)).ok()?;
    let bytes = frame::read_frame(&mut s, FrameType::Handshake, FrameType::Handshake.max_len()).ok()?;
    let peer = Handshake::decode(&bytes).ok()?;
    Some((s, ours.admit(&peer)))
}

impl TcpComm {
    /// Rank 0: accepts every other rank on `spec`'s master address within `timeout`, each with
    /// a handshake `ours` admits.
    pub fn accept(spec: &WorldSpec, ours: &Handshake, timeout: Duration) -> Result<Self> {
        let bind = format!("{}:{}", spec.master_addr, spec.master_port);
        let listener =
            TcpListener::bind(&bind).map_err(|e| Error::Backend(format!("rank 0 cannot listen on {bind}: {e}")))?;
        Self::accept_on(&listener, spec.world_size, ours, timeout)
    }

    /// [`TcpComm::accept`] on a bound listener. Each connection's handshake is read on a thread
    /// of its own; the loop only assigns ranks, so nothing a peer sends (or withholds) stalls it.
    pub fn accept_on(listener: &TcpListener, world: usize, ours: &Handshake, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(|e| Error::Backend(format!("rank 0: {e}")))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let (checked_tx, checked_rx) = mpsc::channel::<Option<Checked>>();
        let mut pending = 0usize;
        while slots.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<String> =
                    slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                return Err(Error::Backend(format!(
                    "ranks {} did not join rank 0 within {timeout:?} (check MASTER_ADDR/MASTER_PORT, \
                     --dist-token, and that every rank started)",
                    missing.join(", ")
                )));
            }
            let mut idle = true;
            while let Ok(checked) = checked_rx.try_recv() {
                pending -= 1;
                idle = false;
                if let Some((stream, verdict)) = checked {
                    Self::seat(&mut slots, stream, verdict);
                }
            }
            match listener.accept() {
                Ok((s, _)) if pending < MAX_PENDING_HANDSHAKES => {
                    idle = false;
                    pending += 1;
                    let (tx, ours) = (checked_tx.clone(), ours.clone());
                    let limit = HANDSHAKE_TIMEOUT.min(timeout);
                    std::thread::spawn(move || drop(tx.send(check_handshake(s, &ours, limit))));
                }
                Ok(_) => idle = false, // dropped: too many handshakes in flight
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::Backend(format!("rank 0: accept failed: {e}"))),
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let peers = slots.into_iter().flatten().collect::<Vec<_>>();
        for s in &peers {
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            let _ = s.set_nodelay(true);
        }
        Ok(TcpComm { rank: 0, world, peers: Mutex::new(peers), timeout })
    }

    /// Gives a checked connection its rank, or tells it why not (a refused handshake, or a rank
    /// already taken).
    fn seat(slots: &mut [Option<TcpStream>], mut stream: TcpStream, verdict: std::result::Result<usize, String>) {
        let reason = match verdict {
            Ok(rank) if slots[rank - 1].is_none() => {
                if frame::write_frame(&mut stream, FrameType::Accept, &[]).is_ok() {
                    slots[rank - 1] = Some(stream);
                }
                return;
            }
            Ok(rank) => format!("rank {rank} has already joined"),
            Err(reason) => reason,
        };
        tracing::warn!("rank 0 refused a rank: {reason}");
        let _ = frame::write_frame(&mut stream, FrameType::Reject, reason.as_bytes());
    }

    /// Any other rank: connects to rank 0 (retrying while it starts) and introduces itself with
    /// `ours`, within `timeout`. A refusal is an error saying rank 0's reason.
    pub fn connect(spec: &WorldSpec, ours: &Handshake, timeout: Duration) -> Result<Self> {
        let target = format!("{}:{}", spec.master_addr, spec.master_port);
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = TcpStream::connect(&target).and_then(|mut s| {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                s.set_read_timeout(Some(left))?;
                s.set_nodelay(true)?;
                frame::write_frame(&mut s, FrameType::Handshake, &ours.encode())?;
                let mut header = [0u8; frame::HEADER_BYTES];
                std::io::Read::read_exact(&mut s, &mut header)?;
                Ok((s, header))
            });
            match attempt {
                Ok((s, header)) if header[0] == FrameType::Accept as u8 => {
                    let _ = s.set_read_timeout(Some(timeout));
                    let _ = s.set_write_timeout(Some(timeout));
                    return Ok(TcpComm {
                        rank: spec.rank,
                        world: spec.world_size,
                        peers: Mutex::new(vec![s]),
                        timeout,
                    });
                }
                Ok((mut s, header)) if header[0] == FrameType::Reject as u8 => {
                    let len = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
                    let len = len.min(FrameType::Reject.max_len()) as usize;
                    let reason = frame::read_payload(&mut s, len).unwrap_or_default();
                    return Err(Error::Backend(format!(
                        "rank 0 at {target} refused rank {}: {}",
                        spec.rank,
                        String::from_utf8_lossy(&reason)
                    )));
                }
                Ok(_) => return Err(Error::Backend(format!("{target} is not a tulu rank 0 (it answered garbage)"))),
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

    /// Rank 0: sends every rank a frame (the start-up hello, then each step).
    fn send_all(&self, ty: FrameType, bytes: &[u8], what: &str) -> Result<()> {
        for (i, s) in self.peers()?.iter_mut().enumerate() {
            frame::write_frame(s, ty, bytes).map_err(|e| io_err(what, i + 1, self.timeout, e))?;
        }
        Ok(())
    }

    /// Any other rank: the next `ty` frame from rank 0; `None` when rank 0 has closed
    /// (shutdown). With `idle`, the wait for the frame to start has no timeout (a server may go
    /// hours without a step); its body, once started, must arrive within the timeout.
    fn recv_from_root(&self, ty: FrameType, idle: bool) -> Result<Option<Vec<u8>>> {
        let mut peers = self.peers()?;
        let s = peers.first_mut().ok_or_else(|| Error::Backend("no stream to rank 0".into()))?;
        if idle {
            let _ = s.set_read_timeout(None);
        }
        let header = frame::read_header(s, ty, ty.max_len());
        let _ = s.set_read_timeout(Some(self.timeout));
        match header.and_then(|len| frame::read_payload(s, len)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_err("waiting for rank 0", 0, self.timeout, e)),
        }
    }

    /// Rank 0: tells every rank how to open its own (the rank layer's encoded hello).
    pub fn send_hello(&self, hello: &[u8]) -> Result<()> {
        self.send_all(FrameType::Hello, hello, "hello")
    }

    /// Other ranks: rank 0's hello, as sent.
    pub fn recv_hello(&self) -> Result<Vec<u8>> {
        self.recv_from_root(FrameType::Hello, false)?
            .ok_or_else(|| Error::Backend("rank 0 closed before its hello".into()))
    }

    /// Rank 0: hands every rank the step it is about to run.
    pub fn send_step(&self, batch: &Batch, rows: &[usize]) -> Result<()> {
        self.send_all(FrameType::Step, &batch_wire::encode(batch, rows), "sending the step")
    }

    /// Other ranks: the next step, or `None` once rank 0 has shut down. Waiting for it has no
    /// timeout: rank 0 runs steps only while it has requests.
    pub fn recv_step(&self) -> Result<Option<(Batch, Vec<usize>)>> {
        match self.recv_from_root(FrameType::Step, true)? {
            None => Ok(None),
            Some(bytes) => batch_wire::decode(&bytes).map(Some),
        }
    }

    /// Every rank's `value`, reduced to the smallest, on every rank (the KV blocks that fit on
    /// the fullest GPU).
    pub fn agree_min(&self, value: u64) -> Result<u64> {
        let out = self.exchange_bytes(value.to_le_bytes().to_vec(), 8, |all| {
            let min = all.iter().filter_map(|b| Some(u64::from_le_bytes(b.as_slice().try_into().ok()?))).min();
            min.unwrap_or(0).to_le_bytes().to_vec()
        })?;
        let bytes: [u8; 8] =
            out.as_slice().try_into().map_err(|_| Error::Backend("bad agreement from rank 0".into()))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Rank 0 combines every rank's buffer with `combine` (rank order) into `out_len` values;
    /// everyone gets the result.
    fn exchange(
        &self,
        own: Vec<f32>,
        out_len: usize,
        combine: impl FnOnce(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        let out = self.exchange_bytes(f32_bytes(&own), 4 * out_len, |all| {
            let bufs: Vec<Vec<f32>> = all.iter().map(|b| bytes_f32(b)).collect();
            f32_bytes(&combine(&bufs))
        })?;
        Ok(bytes_f32(&out))
    }

    /// [`Self::exchange`] over raw bytes: every rank's buffer is as long as this one's, and the
    /// result `out_len` bytes long (frames of any other size are refused).
    fn exchange_bytes(
        &self,
        own: Vec<u8>,
        out_len: usize,
        combine: impl FnOnce(&[Vec<u8>]) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        let mut peers = self.peers()?;
        if self.rank == 0 {
            let mut all = vec![own];
            for (i, s) in peers.iter_mut().enumerate() {
                let theirs =
                    frame::read_data(s, all[0].len()).map_err(|e| io_err("collective", i + 1, self.timeout, e))?;
                all.push(theirs);
            }
            let out = combine(&all);
            for (i, s) in peers.iter_mut().enumerate() {
                frame::write_frame(s, FrameType::Data, &out)
                    .map_err(|e| io_err("collective", i + 1, self.timeout, e))?;
            }
            Ok(out)
        } else {
            let s = peers.first_mut().ok_or_else(|| Error::Backend("no stream to rank 0".into()))?;
            frame::write_frame(s, FrameType::Data, &own).map_err(|e| io_err("collective", 0, self.timeout, e))?;
            frame::read_data(s, out_len).map_err(|e| io_err("collective", 0, self.timeout, e))
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
        x.data = self.exchange(std::mem::take(&mut x.data), len, |bufs| sum_in_rank_order(bufs, len))?;
        Ok(())
    }

    fn all_gather_cols(&self, _: &CpuBackend, x: CpuTensor) -> Result<CpuTensor> {
        let (rows, cols, world) = (x.rows, x.cols, self.world);
        let data = self.exchange(x.data, rows * cols * world, |bufs| concat_cols(bufs, rows, cols))?;
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

    /// The handshake of `rank` of a `world`-rank tiny model.
    fn hs(rank: usize, world: usize) -> Handshake {
        Handshake::new(&crate::config::ModelConfig::preset("tiny").unwrap(), &spec(rank, world, 0), None).unwrap()
    }

    /// A server idle for longer than the distributed timeout does not lose its ranks: waiting
    /// for the next step has no timeout (collectives still have one).
    #[test]
    fn an_idle_gap_longer_than_the_timeout_is_not_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let timeout = Duration::from_millis(300);
        let worker = std::thread::spawn(move || {
            let comm = TcpComm::connect(&spec(1, 2, port), &hs(1, 2), timeout).unwrap();
            let step = comm.recv_step().unwrap().expect("a step after the idle gap");
            (step, comm.recv_step().unwrap())
        });
        let root = TcpComm::accept_on(&listener, 2, &hs(0, 2), timeout).unwrap();
        std::thread::sleep(timeout * 3);
        let mut batch = Batch::new(16);
        batch.push(&[1, 2, 3], 0, &[0]).unwrap();
        root.send_step(&batch, &[2]).unwrap();
        drop(root);
        let ((got, rows), after) = worker.join().unwrap();
        assert_eq!((got, rows), (batch, vec![2]));
        assert!(after.is_none(), "rank 0 closing ends the loop");
    }

    /// Three ranks on 127.0.0.1 agree on the smallest value; the hello reaches every rank intact.
    #[test]
    fn ranks_agree_on_the_smallest_value() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let timeout = Duration::from_secs(20);
        let hello: Vec<u8> = (0..=255).collect();
        let workers: Vec<_> = [(1usize, 70u64), (2, 30)]
            .into_iter()
            .map(|(rank, value)| {
                std::thread::spawn(move || {
                    let comm = TcpComm::connect(&spec(rank, 3, port), &hs(rank, 3), timeout).unwrap();
                    let hello = comm.recv_hello().unwrap();
                    (hello, comm.agree_min(value).unwrap())
                })
            })
            .collect();
        let root = TcpComm::accept_on(&listener, 3, &hs(0, 3), timeout).unwrap();
        root.send_hello(&hello).unwrap();
        assert_eq!(root.agree_min(50).unwrap(), 30);
        for w in workers {
            let (got, min) = w.join().unwrap();
            assert_eq!(got, hello);
            assert_eq!(min, 30);
        }
    }
}
