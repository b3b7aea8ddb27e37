//! Listeners of every kind survive an upgrade: TCP over IPv4 and IPv6, Unix stream sockets by
//! path and in the abstract namespace. Each keeps its open connections on the old process and
//! takes new ones on the new process, with nothing refused in between.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::{EchoOpts, EchoServer};

const TIMEOUT: Duration = Duration::from_secs(5);

enum Target {
    Tcp(SocketAddr),
    UnixPath(PathBuf),
    UnixAbstract(String),
}

trait Line: std::io::Read + Write {}
impl Line for TcpStream {}
impl Line for UnixStream {}

fn connect(t: &Target) -> Box<dyn Line> {
    match t {
        Target::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, TIMEOUT).unwrap_or_else(|e| panic!("{a}: {e}"));
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            Box::new(s)
        }
        Target::UnixPath(p) => {
            let s = UnixStream::connect(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            Box::new(s)
        }
        Target::UnixAbstract(n) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(n).unwrap();
            let s = UnixStream::connect_addr(&addr).unwrap_or_else(|e| panic!("@{n}: {e}"));
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            Box::new(s)
        }
    }
}

fn echo_once(conn: &mut Box<dyn Line>, line: &str) {
    conn.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    let mut reader = BufReader::new(conn);
    reader.read_line(&mut reply).unwrap();
    assert_eq!(reply, line);
}

fn ipv6_loopback_port() -> Option<SocketAddr> {
    let l = TcpListener::bind("[::1]:0").ok()?;
    l.local_addr().ok()
}

#[test]
fn every_listener_kind_survives_upgrades() {
    let v6 = ipv6_loopback_port().expect("IPv6 loopback is needed for this test");
    let tag = format!("ringflip-test-{}", std::process::id());
    let opts = EchoOpts {
        extra_args: vec![
            "--listen".into(),
            v6.to_string(),
            "--listen".into(),
            format!("unix:@{tag}"),
        ],
        drain_timeout_ms: Some(20_000),
        ..EchoOpts::default()
    };
    // The Unix path lives in the server's temp dir, which only exists once it starts; so the
    // path listener is given relative to a dir we make now.
    let unix_dir = std::env::temp_dir().join(format!("{tag}-sock"));
    std::fs::create_dir_all(&unix_dir).unwrap();
    let path = unix_dir.join("echo.sock");
    let mut opts = opts;
    opts.extra_args
        .extend(["--listen".into(), format!("unix:{}", path.display())]);
    let server = EchoServer::start(opts);

    let targets = [
        Target::Tcp(server.addr()),
        Target::Tcp(v6),
        Target::UnixAbstract(tag.clone()),
        Target::UnixPath(path.clone()),
    ];
    // One long-lived connection per listener, opened on generation 0.
    let mut long: Vec<Box<dyn Line>> = targets.iter().map(connect).collect();
    for (i, c) in long.iter_mut().enumerate() {
        echo_once(c, &format!("hello {i}\n"));
    }
    let mut pids = vec![server.pid()];
    for round in 0..3 {
        pids.push(server.upgrade());
        for (i, t) in targets.iter().enumerate() {
            // New connections reach the new generation…
            let mut c = connect(t);
            echo_once(&mut c, &format!("round {round} listener {i}\n"));
            // …and the old ones still work on the draining generation.
            echo_once(&mut long[i], &format!("still {round} {i}\n"));
        }
    }
    drop(long);
    server.assert_gone(&pids[..pids.len() - 1], Duration::from_secs(10));
    server.stop();
    let _ = std::fs::remove_dir_all(&unix_dir);
}
