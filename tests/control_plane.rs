//! The control plane against strangers: while rank 0 of a three-rank world waits for its ranks,
//! a connection that never speaks, garbage bytes, a frame claiming 2^62 bytes, the old
//! eight-byte rank claim, a rank with the wrong token, a rank of another model and a second
//! claim to a taken rank all try to join. None blocks the accept loop or takes a slot, the
//! refused ranks are told why, and the real ranks join and work.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tulu::unstable::config::ModelConfig;
use tulu::unstable::parallel::handshake::Handshake;
use tulu::unstable::parallel::rendezvous::WorldSpec;
use tulu::unstable::parallel::tcp::{TcpComm, HANDSHAKE_TIMEOUT};

const TOKEN: &str = "s3cret";

fn spec(rank: usize, port: u16) -> WorldSpec {
    WorldSpec::from_nodes(3, rank, 1, 0, "127.0.0.1", port).unwrap()
}

fn handshake(config: &ModelConfig, rank: usize, token: &str) -> Handshake {
    Handshake::new(config, &spec(rank, 0), Some(token)).unwrap()
}

/// Connects and sends `bytes`, keeping the connection open (returned).
fn stranger(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    s
}

#[test]
fn strangers_cannot_break_the_control_plane() {
    let tiny = ModelConfig::preset("tiny").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let timeout = Duration::from_secs(30);
    let started = Instant::now();
    let root = {
        let ours = handshake(&tiny, 0, TOKEN);
        std::thread::spawn(move || {
            let comm = TcpComm::accept_on(&listener, 3, &ours, timeout)?;
            let joined = started.elapsed();
            Ok::<_, tulu::Error>((comm.agree_min(50)?, joined))
        })
    };
    let mut huge = vec![1u8];
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let _strangers = [
        stranger(port, b""),                 // connects and never speaks
        stranger(port, &[0x5a; 300]),        // garbage
        stranger(port, &huge),               // a handshake frame of 2^62 bytes
        stranger(port, &1u64.to_le_bytes()), // the old protocol's bare rank claim
    ];
    let refused = |config: &ModelConfig, rank: usize, token: &str| {
        let e = TcpComm::connect(&spec(rank, port), &handshake(config, rank, token), timeout).unwrap_err();
        e.to_string()
    };
    let e = refused(&tiny, 1, "guess");
    assert!(e.contains("refused rank 1") && e.contains("dist-token"), "{e}");
    let mut other = tiny.clone();
    other.num_hidden_layers = 5;
    let e = refused(&other, 2, TOKEN);
    assert!(e.contains("different model"), "{e}");

    let (joined_tx, joined_rx) = mpsc::channel();
    let real = |rank: usize, value: u64| {
        let (tiny, joined) = (tiny.clone(), joined_tx.clone());
        std::thread::spawn(move || {
            let comm = TcpComm::connect(&spec(rank, port), &handshake(&tiny, rank, TOKEN), timeout)?;
            let _ = joined.send(rank);
            comm.agree_min(value)
        })
    };
    let rank1 = real(1, 70);
    assert_eq!(joined_rx.recv_timeout(timeout), Ok(1));
    let e = refused(&tiny, 1, TOKEN);
    assert!(e.contains("already joined"), "a second claim to rank 1: {e}");
    let rank2 = real(2, 30);
    let (min, joined) = root.join().unwrap().unwrap();
    assert_eq!((min, rank1.join().unwrap().unwrap(), rank2.join().unwrap().unwrap()), (30, 30, 30));
    assert!(joined < HANDSHAKE_TIMEOUT, "the silent connection held up the join ({joined:?})");
}
