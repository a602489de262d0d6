//! How ranks on several machines find each other: the variables torchrun and Slurm-style
//! launchers set (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`), and a TCP rendezvous in which rank 0 hands every other rank the group's
//! unique id (NCCL's `ncclUniqueId`, 128 bytes). Every wait is bounded by a timeout, so a rank
//! that cannot reach rank 0, or a world that never fills, fails with an error naming who is
//! missing instead of hanging.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Bytes of the id handed out (NCCL's unique id size).
pub const ID_BYTES: usize = 128;

/// Where this process sits in a multi-process world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldSpec {
    /// Ranks in the world.
    pub world_size: usize,
    /// This process's rank.
    pub rank: usize,
    /// Its rank among the processes of its machine (selects the GPU).
    pub local_rank: usize,
    /// Processes on its machine.
    pub local_world_size: usize,
    /// Rank 0's address.
    pub master_addr: String,
    /// Rank 0's rendezvous port.
    pub master_port: u16,
}

impl WorldSpec {
    /// Reads the launcher variables through `get` (normally `std::env::var`); `None` when
    /// `WORLD_SIZE` is unset (a single-process run).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let num = |name: &str, default: Option<usize>| -> Result<usize> {
            match get(name) {
                Some(v) => v.trim().parse().map_err(|_| Error::request(name, format!("`{v}` is not a number"))),
                None => default.ok_or_else(|| Error::request(name, "must be set when WORLD_SIZE is")),
            }
        };
        let world_size: usize =
            world.trim().parse().map_err(|_| Error::request("WORLD_SIZE", format!("`{world}` is not a number")))?;
        let rank = num("RANK", None)?;
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let local_world_size = num("LOCAL_WORLD_SIZE", Some(world_size))?;
        let port = num("MASTER_PORT", Some(29500))?;
        let spec = WorldSpec {
            world_size,
            rank,
            local_rank,
            local_world_size,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: u16::try_from(port)
                .map_err(|_| Error::request("MASTER_PORT", format!("{port} is not a port")))?,
        };
        spec.validate()?;
        Ok(Some(spec))
    }

    /// The world of `--nnodes N --node-rank R` with `gpus_per_node` processes per node; this
    /// process is local rank `local_rank`.
    pub fn from_nodes(
        nnodes: usize,
        node_rank: usize,
        gpus_per_node: usize,
        local_rank: usize,
        master_addr: &str,
        master_port: u16,
    ) -> Result<Self> {
        let spec = WorldSpec {
            world_size: nnodes * gpus_per_node,
            rank: node_rank * gpus_per_node + local_rank,
            local_rank,
            local_world_size: gpus_per_node,
            master_addr: master_addr.to_owned(),
            master_port,
        };
        if node_rank >= nnodes {
            return Err(Error::request("node-rank", format!("{node_rank} is not below --nnodes {nnodes}")));
        }
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(Error::request("WORLD_SIZE", "must be at least 1"));
        }
        if self.rank >= self.world_size {
            return Err(Error::request("RANK", format!("{} is not below WORLD_SIZE {}", self.rank, self.world_size)));
        }
        if self.local_rank >= self.local_world_size {
            return Err(Error::request(
                "LOCAL_RANK",
                format!("{} is not below LOCAL_WORLD_SIZE {}", self.local_rank, self.local_world_size),
            ));
        }
        Ok(())
    }
}

/// Rank 0: serves `id` to every other rank, returning once all `world_size - 1` have it, or
/// an error naming the ranks that never came within `timeout`.
pub fn serve_id(spec: &WorldSpec, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    let bind = format!("{}:{}", spec.master_addr, spec.master_port);
    let listener =
        TcpListener::bind(&bind).map_err(|e| Error::Backend(format!("rendezvous: cannot listen on {bind}: {e}")))?;
    serve_on(&listener, spec.world_size, id, timeout)
}

/// [`serve_id`] on an already bound listener (port 0 in tests).
pub fn serve_on(listener: &TcpListener, world_size: usize, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(|e| Error::Backend(format!("rendezvous: {e}")))?;
    let mut joined = vec![false; world_size];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        if Instant::now() >= deadline {
            let missing: Vec<String> =
                joined.iter().enumerate().filter(|(_, j)| !**j).map(|(r, _)| r.to_string()).collect();
            return Err(Error::Backend(format!(
                "rendezvous: ranks {} did not join within {timeout:?} (check MASTER_ADDR/MASTER_PORT and that every rank started)",
                missing.join(", ")
            )));
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                // A peer that connects but never says its rank must not stall the others.
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(
                    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)),
                ));
                let mut rank = [0u8; 8];
                if stream.read_exact(&mut rank).is_err() {
                    continue;
                }
                let r = u64::from_le_bytes(rank) as usize;
                if r == 0 || r >= world_size || joined[r] {
                    continue;
                }
                if stream.write_all(id).and_then(|_| stream.flush()).is_ok() {
                    joined[r] = true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(Error::Backend(format!("rendezvous: accept failed: {e}"))),
        }
    }
    Ok(())
}

/// Any rank but 0: connects to rank 0 (retrying while it starts) and receives the id.
pub fn fetch_id(spec: &WorldSpec, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let target = format!("{}:{}", spec.master_addr, spec.master_port);
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no attempt");
    while Instant::now() < deadline {
        let addrs = target
            .to_socket_addrs()
            .map_err(|e| Error::Backend(format!("rendezvous: cannot resolve {target}: {e}")))?;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(left));
                    let mut id = [0u8; ID_BYTES];
                    let got = s.write_all(&(spec.rank as u64).to_le_bytes()).and_then(|_| s.read_exact(&mut id));
                    match got {
                        Ok(()) => return Ok(id),
                        Err(e) => last_error = format!("rank 0 at {addr} closed the connection: {e}"),
                    }
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Backend(format!(
        "rendezvous: rank {} could not get the group id from rank 0 at {target} within {timeout:?}: {last_error}",
        spec.rank
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(list: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| list.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn launcher_variables_parse_and_are_checked() {
        assert_eq!(WorldSpec::from_vars(vars(&[])).unwrap(), None);
        let spec = WorldSpec::from_vars(vars(&[
            ("WORLD_SIZE", "16"),
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((spec.world_size, spec.rank, spec.local_rank, spec.master_port), (16, 9, 1, 29400));
        assert_eq!(WorldSpec::from_nodes(2, 1, 8, 1, "node0", 29400).unwrap(), spec.clone());
        for (bad, param) in [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (vec![("WORLD_SIZE", "two"), ("RANK", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "70000")], "MASTER_PORT"),
        ] {
            match WorldSpec::from_vars(vars(&bad)) {
                Err(Error::Request { param: p, .. }) => assert_eq!(p, param),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
