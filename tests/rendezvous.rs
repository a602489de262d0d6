//! The TCP rendezvous between two processes on 127.0.0.1: rank 0 hands rank 1 the group id;
//! a missing or dying peer ends in a clear timeout error, never a hang.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tulu::parallel::rendezvous::{fetch_id, serve_on, WorldSpec, ID_BYTES};

fn spec(rank: usize, port: u16) -> WorldSpec {
    WorldSpec::from_nodes(1, 0, 2, rank, "127.0.0.1", port).unwrap()
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs this test binary again as rank 1 in `role` (see `rank1_child`).
fn spawn_rank1(role: &str, port: u16) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "rank1_child", "--nocapture", "--test-threads=1"])
        .env("TULU_RDZV_ROLE", role)
        .env("TULU_RDZV_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Not a test on its own: the second process of the tests below.
#[test]
#[ignore = "child process of the rendezvous tests"]
fn rank1_child() {
    let port: u16 = std::env::var("TULU_RDZV_PORT").unwrap().parse().unwrap();
    match std::env::var("TULU_RDZV_ROLE").unwrap().as_str() {
        "fetch" => {
            let id = fetch_id(&spec(1, port), Duration::from_secs(20)).unwrap();
            println!("ID={}", hex(&id));
        }
        "die" => {
            // Connects, then dies before saying its rank.
            let _s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::process::exit(3);
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn rank0_hands_rank1_the_id_across_processes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 37 + 11) as u8);
    let child = spawn_rank1("fetch", port);
    serve_on(&listener, 2, &id, Duration::from_secs(30)).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rank 1 failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("ID={}", hex(&id))), "rank 1 printed: {stdout}");
}

#[test]
fn a_missing_or_dying_peer_times_out_with_a_clear_error() {
    let id = [7u8; ID_BYTES];
    // Nobody comes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let err = serve_on(&listener, 2, &id, Duration::from_millis(300)).unwrap_err().to_string();
    assert!(err.contains("ranks 1 did not join"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Rank 1 connects and dies without finishing the exchange.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = spawn_rank1("die", port);
    let err = serve_on(&listener, 2, &id, Duration::from_secs(2)).unwrap_err().to_string();
    assert!(err.contains("ranks 1 did not join"), "{err}");
    let _ = child.wait();
    // Rank 0 is not there: rank 1 gives up on time, naming where it looked.
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let err = fetch_id(&spec(1, free), Duration::from_millis(500)).unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{free}")) && err.contains("rank 1"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}
