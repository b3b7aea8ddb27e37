//! Sockets and fds that are handed over but never accepted on: a UDP socket keeps answering
//! across upgrades (never re-bound), and an application fd arrives in each generation as the
//! same open file.

mod common;

use std::net::UdpSocket;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{EchoOpts, EchoServer};

#[test]
fn udp_socket_answers_across_upgrades() {
    let udp_addr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--udp".into(), udp_addr.to_string()],
        ..EchoOpts::default()
    });
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // Meanwhile, datagrams back to back through every upgrade: each must be answered, also
    // when the old process read it just before its exit.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (mut ok, mut lost) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                i += 1;
                let msg = format!("background {i}");
                sock.send_to(msg.as_bytes(), udp_addr).unwrap();
                let mut buf = [0u8; 256];
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) if &buf[..n] == msg.as_bytes() => ok += 1,
                    other => lost.push(format!("{msg}: {other:?}")),
                }
            }
            (ok, lost)
        })
    };
    let mut answered = 0;
    let mut sent = 0;
    for round in 0..4 {
        if round > 0 {
            server.upgrade();
        }
        for i in 0..25 {
            let msg = format!("round {round} datagram {i}");
            client.send_to(msg.as_bytes(), udp_addr).unwrap();
            sent += 1;
            let mut buf = [0u8; 256];
            let (n, from) = client.recv_from(&mut buf).expect("an answer");
            assert_eq!(from, udp_addr);
            assert_eq!(&buf[..n], msg.as_bytes());
            answered += 1;
        }
    }
    assert_eq!(answered, sent);
    // Two more upgrades under the background datagrams alone.
    for _ in 0..2 {
        server.upgrade();
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, lost) = background.join().unwrap();
    assert!(
        lost.is_empty(),
        "{} of {} background datagrams lost: {lost:?}",
        lost.len(),
        ok as usize + lost.len()
    );
    assert!(ok > 0);
    let log = server.log_tail();
    assert!(!log.contains("cannot bind"), "{log}");
    server.stop();
}

#[test]
fn application_fd_is_handed_over_as_the_same_open_file() {
    let dir = std::env::temp_dir().join(format!("ringflip-passfd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("journal");
    let _ = std::fs::remove_file(&path);
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--pass-file".into(), path.display().to_string()],
        ..EchoOpts::default()
    });
    let inode = std::fs::metadata(&path).unwrap().ino();
    // Move the path away: a successor that reopened the path would create a new file; one that
    // uses the inherited fd keeps writing to this inode.
    let moved = dir.join("journal.moved");
    std::fs::rename(&path, &moved).unwrap();
    let mut pids = vec![server.pid()];
    for _ in 0..3 {
        pids.push(server.upgrade());
    }
    assert!(!path.exists(), "a generation reopened the path");
    assert_eq!(std::fs::metadata(&moved).unwrap().ino(), inode);
    let text = std::fs::read_to_string(&moved).unwrap();
    let expected: String = pids
        .iter()
        .enumerate()
        .map(|(g, pid)| format!("generation {g} pid {pid}\n"))
        .collect();
    assert_eq!(text, expected);
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
