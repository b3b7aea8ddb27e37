//! What ringflip's driver costs in resident memory, beyond its ring.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! In a fresh process: resident memory (VmRSS) before building a server, once it serves, and
//! after it has accepted 10,000 connections (each closed again); the io_uring mappings'
//! resident size (`anon_inode:[io_uring]` in /proc/self/smaps) is reported apart, since the
//! target is about the driver beyond the ring. The server runs `Server::run` on its own thread
//! and closes each connection as it arrives. `--test` (CI) runs it with 500 connections.

use std::io::Read;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident KiB of the io_uring mappings of this process.
fn ring_rss_kib() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_ring = false;
    let mut total = 0;
    for line in smaps.lines() {
        // A mapping header: "start-end perms offset dev inode [path]".
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        });
        if is_header {
            in_ring = line.contains("io_uring");
        } else if in_ring {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let connections = if quick { 500 } else { 10_000 };
    let before = status_kib("VmRSS:");

    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let server = ringflip::Server::builder()
            .listen_tcp("mem", "127.0.0.1:0".parse().unwrap())
            .drain_timeout(Duration::from_secs(5))
            .build()
            .expect("build");
        tx.send((server.handle(), server.local_addr("mem").unwrap()))
            .unwrap();
        server.run(drop).expect("run")
    });
    let (handle, addr) = rx.recv_timeout(Duration::from_secs(10)).expect("started");
    // One connection through, so the ring and the driver have done everything once.
    let mut c = TcpStream::connect(addr).unwrap();
    let _ = c.read(&mut [0u8; 1]);
    std::thread::sleep(Duration::from_millis(100));
    let serving = status_kib("VmRSS:");
    let ring = ring_rss_kib();

    let t0 = Instant::now();
    for _ in 0..connections {
        let mut c = TcpStream::connect(addr).expect("connect");
        // The server closes it at once: wait for that, so connections do not pile up.
        let _ = c.read(&mut [0u8; 1]);
    }
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let after = status_kib("VmRSS:");
    let ring_after = ring_rss_kib();
    handle.shutdown();
    server.join().unwrap();

    println!("ringflip memory (VmRSS of this process, KiB):");
    println!("  before the server:                {before}");
    println!(
        "  serving (1 connection done):      {serving}  (+{})",
        serving.saturating_sub(before)
    );
    println!("    of which io_uring mappings:     {ring}");
    println!(
        "    driver beyond the ring:         {} KiB (incl. the server thread's stack pages)",
        serving.saturating_sub(before).saturating_sub(ring)
    );
    println!(
        "  after {connections} more connections: {after}  (+{} vs serving; ring mappings {ring_after})",
        after.saturating_sub(serving)
    );
    println!("  ({connections} connections in {took:?})");
}
