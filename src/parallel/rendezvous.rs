//! How ranks on several machines find each other: the variables torchrun and Slurm-style
//! launchers set (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`). The ranks then meet over TCP at rank 0 ([`super::tcp`]), which also hands
//! out the NCCL unique id in its hello.

use crate::error::{Error, Result};

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
