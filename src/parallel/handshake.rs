//! The first frame every rank sends rank 0, before it may claim a rank: the magic, the protocol
//! version, a hash of the model's config and the world size (ranks of another model or world
//! are refused), the rank, and an optional shared token (`--dist-token` / `TULU_DIST_TOKEN`),
//! compared in constant time. The token is a shared secret against strangers on the network,
//! not encryption: the control plane itself is plain TCP.

use crate::config::ModelConfig;
use crate::error::{Error, Result};

use super::rendezvous::WorldSpec;

/// The first bytes of every handshake.
pub const MAGIC: [u8; 4] = *b"TULU";
/// The control plane's protocol version; ranks of another version are refused.
pub const PROTOCOL_VERSION: u32 = 2;
/// The longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// A rank's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// [`config_hash`] of the model and world the sender runs.
    pub config_hash: u64,
    /// Ranks in the sender's world.
    pub world_size: u32,
    /// The rank it claims.
    pub rank: u32,
    /// The shared token (empty without one).
    pub token: Vec<u8>,
}

/// FNV-1a over the config as `config.json` writes it (keys sorted) and the world size: equal on
/// every rank of one deployment, whatever the machine or build.
pub fn config_hash(config: &ModelConfig, world_size: usize) -> u64 {
    // The quantization too: ranks that quantize differently hold different models.
    let quant = config.quantization.as_ref().map(|q| format!("|{}", q.describe())).unwrap_or_default();
    let text = format!("{}|world={world_size}{quant}", config.to_json());
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Handshake {
    /// The handshake of rank `world.rank` running `config` with `token`.
    pub fn new(config: &ModelConfig, world: &WorldSpec, token: Option<&str>) -> Result<Self> {
        let token = token.unwrap_or("").as_bytes().to_vec();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Error::request("dist-token", format!("is longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let int =
            |x: usize, what: &str| u32::try_from(x).map_err(|_| Error::request(what, format!("{x} is too large")));
        Ok(Handshake {
            version: PROTOCOL_VERSION,
            config_hash: config_hash(config, world.world_size),
            world_size: int(world.world_size, "WORLD_SIZE")?,
            rank: int(world.rank, "RANK")?,
            token,
        })
    }

    /// The frame payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.config_hash.to_le_bytes());
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }

    /// A handshake from a frame payload; why not, for anything that is not one.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut at = 0;
        let mut take = |n: usize| -> std::result::Result<&[u8], String> {
            let part = bytes.get(at..at + n).ok_or("a truncated handshake")?;
            at += n;
            Ok(part)
        };
        if take(4)? != MAGIC {
            return Err("not a tulu handshake (bad magic)".into());
        }
        let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let version = u32_at(take(4)?);
        let config_hash = u64::from_le_bytes(take(8)?.try_into().map_err(|_| "a truncated handshake")?);
        let world_size = u32_at(take(4)?);
        let rank = u32_at(take(4)?);
        let len = take(2)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        if len > MAX_TOKEN_BYTES {
            return Err(format!("a token of {len} bytes"));
        }
        let token = take(len)?.to_vec();
        if at != bytes.len() {
            return Err("trailing bytes after the handshake".into());
        }
        Ok(Handshake { version, config_hash, world_size, rank, token })
    }

    /// Whether rank 0, whose own handshake is `self`, takes `peer` into its group: the rank it
    /// may claim, or why not (sent back to it).
    pub fn admit(&self, peer: &Handshake) -> std::result::Result<usize, String> {
        if peer.version != self.version {
            return Err(format!(
                "protocol version {} (rank 0 speaks {}): run the same tulu",
                peer.version, self.version
            ));
        }
        if !constant_time_eq(&peer.token, &self.token) {
            return Err("wrong --dist-token (TULU_DIST_TOKEN)".into());
        }
        if peer.world_size != self.world_size || peer.config_hash != self.config_hash {
            return Err(format!(
                "a different model or world (config hash {:016x}, WORLD_SIZE {}; rank 0 runs {:016x}, {})",
                peer.config_hash, peer.world_size, self.config_hash, self.world_size
            ));
        }
        if peer.rank == 0 || peer.rank >= self.world_size {
            return Err(format!("rank {} is not one of 1..{}", peer.rank, self.world_size));
        }
        Ok(peer.rank as usize)
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(rank: usize) -> WorldSpec {
        WorldSpec::from_nodes(3, rank, 1, 0, "127.0.0.1", 1).unwrap()
    }

    /// A rank started with `--quantize fp8` holds another model than one without: their
    /// handshakes differ.
    #[test]
    fn quantizing_at_load_changes_the_config_hash() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let mut fp8 = tiny.clone();
        crate::quant::Quantize::Fp8.apply(&mut fp8);
        assert_ne!(config_hash(&tiny, 2), config_hash(&fp8, 2));
    }

    #[test]
    fn handshakes_round_trip_and_rank_0_admits_only_its_own_kind() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let root = Handshake::new(&tiny, &world(0), Some("s3cret")).unwrap();
        let peer = Handshake::new(&tiny, &world(2), Some("s3cret")).unwrap();
        assert_eq!(Handshake::decode(&peer.encode()).unwrap(), peer);
        assert_eq!(root.admit(&peer), Ok(2));
        let wrong_token = Handshake::new(&tiny, &world(2), Some("guess")).unwrap();
        assert!(root.admit(&wrong_token).unwrap_err().contains("dist-token"));
        let mut other = tiny.clone();
        other.num_hidden_layers += 1;
        let other_model = Handshake::new(&other, &world(1), Some("s3cret")).unwrap();
        assert!(root.admit(&other_model).unwrap_err().contains("different model"));
        let two = Handshake::new(&tiny, &WorldSpec::from_nodes(2, 1, 1, 0, "127.0.0.1", 1).unwrap(), Some("s3cret"));
        assert!(root.admit(&two.unwrap()).is_err(), "another world size");
        assert!(root.admit(&Handshake { rank: 0, ..peer.clone() }).is_err(), "nobody else is rank 0");
        assert!(root.admit(&Handshake { version: 1, ..peer.clone() }).unwrap_err().contains("version"));
        // Not handshakes.
        for bad in [&b""[..], b"TULX", b"TULU\x02\x00", &[0xff; 40]] {
            assert!(Handshake::decode(bad).is_err(), "{bad:?}");
        }
        let mut long = peer.encode();
        long.push(0);
        assert!(Handshake::decode(&long).is_err(), "trailing bytes");
    }
}
