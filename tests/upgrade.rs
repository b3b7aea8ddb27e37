//! Process-level tests of zero-downtime upgrades, against `examples/echo.rs`.
//!
//! Run with `cargo test --test upgrade -- --test-threads=1` (each test loads the machine; they
//! are correct in parallel too, just slower and noisier).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

const O_CLOEXEC: u32 = 0o2000000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// No upgrade at all: serves (every listener), survives a burst, stops cleanly on SIGTERM.
/// When this fails, every other test fails for the same reason.
#[test]
fn smoke_echo_and_sigterm() {
    let server = EchoServer::start(EchoOpts {
        listeners: 2,
        ..Default::default()
    });
    for (i, &a) in server.addrs().iter().enumerate() {
        drop(server.open_conn(a, &format!("smoke-{i}\n")));
    }
    let r = burst(server.addr(), 100);
    r.assert_clean();
    let load = Load::start(server.addr(), 2, 4);
    thread::sleep(ms(300));
    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
    server.stop();
}

#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    // Long drain timeout: the long-lived connections keep generation 0 draining for the whole
    // test, and must keep working until the client closes them.
    let server = EchoServer::start(EchoOpts {
        drain_timeout_ms: Some(60_000),
        ..Default::default()
    });
    let mut pids = vec![server.pid()];
    let load = Load::start(server.addr(), 8, 16);
    thread::sleep(ms(200));
    for i in 0..20 {
        let old = server.pid();
        let t = Instant::now();
        let new = server.upgrade();
        assert_ne!(new, old, "upgrade {i}: pid unchanged");
        assert!(
            pid_alive(new),
            "upgrade {i}: new pid {new} not alive\n{}",
            server.log_tail()
        );
        eprintln!("upgrade {i}: {old} -> {new} in {:?}", t.elapsed());
        pids.push(new);
        thread::sleep(ms(100));
    }
    thread::sleep(ms(200));
    let report = load.stop(); // also closes the long-lived connections
    eprintln!("{report}");
    report.assert_clean();
    assert!(
        report.connections_ok > 0 && report.pings_ok > 0,
        "no load went through: {report}"
    );

    let current = *pids.last().unwrap();
    assert_eq!(server.pid(), current);
    server.assert_gone(&pids[..pids.len() - 1], Duration::from_secs(15));
    server.assert_no_strays(Duration::from_secs(2));
    server.stop();
}

#[test]
fn rollback_when_new_binary_exits_1() {
    rolls_back_then_upgrades(EchoOpts::default(), ms(1000), |server| {
        server.replace_binary_with_script("#!/bin/sh\nexit 1\n")
    });
}

#[test]
fn rollback_when_new_binary_never_ready() {
    let opts = EchoOpts {
        ready_timeout_ms: Some(300),
        ..Default::default()
    };
    rolls_back_then_upgrades(opts, ms(1000), |server| {
        server.replace_binary_with_script("#!/bin/sh\nexec sleep 30\n")
    });
}

#[test]
fn rollback_when_new_binary_missing() {
    rolls_back_then_upgrades(EchoOpts::default(), ms(500), EchoServer::remove_binary);
}

/// Under load, `break_binary` makes the next binary fail (exit, never READY, missing): the
/// upgrade rolls back within `bound`, the failed child is killed and reaped (no child of the
/// server, nothing left in its process group, e.g. an orphaned `sleep` re-parented to the
/// test), the server serves on; then the good binary upgrades it, and nothing failed.
fn rolls_back_then_upgrades(
    opts: EchoOpts,
    bound: Duration,
    break_binary: impl FnOnce(&EchoServer),
) {
    let server = EchoServer::start(opts);
    let load = Load::start(server.addr(), 8, 16);
    thread::sleep(ms(200));
    let pid = server.pid();

    break_binary(&server);
    server.upgrade_expect_rollback(bound);
    server.assert_no_children(Duration::from_secs(3));
    server.assert_no_strays(Duration::from_secs(2));
    assert_eq!(server.pid(), pid);

    server.restore_binary();
    let new = server.upgrade();
    assert_ne!(new, pid);
    thread::sleep(ms(200));

    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
    server.assert_gone(&[pid], Duration::from_secs(10));
    server.assert_no_strays(Duration::from_secs(2));
    server.stop();
}

#[test]
fn burst_during_upgrade_loses_nothing() {
    let server = EchoServer::start(EchoOpts::default());
    // Sanity: a burst without an upgrade is clean (otherwise the machine, not the upgrade, is
    // the problem).
    let r = burst(server.addr(), 400);
    eprintln!("baseline {r}");
    r.assert_clean();

    let mut pids = vec![server.pid()];
    // SIGHUP at, or a little after, the moment ~400 clients connect at once, to hit both the
    // "child starting" and the "old one stops accepting" phases.
    for (round, delay) in [0u64, 0, 5, 20, 50].into_iter().enumerate() {
        let mut b = Load::start_with(server.addr(), LoadOpts::burst(400));
        b.release();
        if delay > 0 {
            thread::sleep(ms(delay));
        }
        let new = server.upgrade();
        let r = b.wait();
        eprintln!(
            "round {round} (SIGHUP +{delay} ms): {} -> {new}: {r}",
            pids.last().unwrap()
        );
        assert!(
            r.failures() == 0,
            "round {round}: {r}\n--- server log ---\n{}",
            server.log_tail()
        );
        assert_eq!(r.connections_ok, 400);
        pids.push(new);
        thread::sleep(ms(100));
    }
    server.assert_gone(&pids[..pids.len() - 1], Duration::from_secs(10));
    server.assert_no_strays(Duration::from_secs(2));
    server.stop();
}

/// Every fd above 2 of `pid` must be O_CLOEXEC.
fn assert_all_cloexec(what: &str, pid: i32) {
    let fds = fds_of(pid);
    let bad: Vec<String> = fds
        .iter()
        .filter(|&&(fd, flags)| fd > 2 && flags & O_CLOEXEC == 0)
        .map(|&(fd, flags)| format!("fd {fd} (flags {flags:o}) -> {}", fd_target(pid, fd)))
        .collect();
    let all: Vec<String> = fds
        .iter()
        .map(|&(fd, flags)| format!("{fd}:{flags:o}:{}", fd_target(pid, fd)))
        .collect();
    eprintln!("{what} (pid {pid}) fds: {all:?}");
    assert!(
        bad.is_empty(),
        "{what} (pid {pid}) has fds without O_CLOEXEC: {bad:?}\nall fds: {all:?}"
    );
    assert!(
        fds.iter().any(|&(fd, _)| fd > 2),
        "{what} (pid {pid}) has no fd above 2? {all:?}"
    );
}

#[test]
fn every_fd_is_cloexec() {
    // Two listeners, so that more than one handed-over socket is checked.
    let server = EchoServer::start(EchoOpts {
        listeners: 2,
        ..Default::default()
    });
    // Live connections on both listeners, so accepted sockets are checked too.
    let mut held = Vec::new();
    for (i, &a) in server.addrs().iter().enumerate() {
        held.push(server.open_conn(a, &format!("gen0-{i}\n")));
    }
    let gen0 = server.pid();
    assert_all_cloexec("initial process", gen0);

    let gen1 = server.upgrade();
    for (i, &a) in server.addrs().iter().enumerate() {
        held.push(server.open_conn(a, &format!("gen1-{i}\n")));
    }
    assert_all_cloexec("upgraded process", gen1);
    // The old one is still draining the first two connections.
    if pid_alive(gen0) {
        assert_all_cloexec("draining old process", gen0);
    }
    // And a second-generation upgrade (child of a child).
    let gen2 = server.upgrade();
    assert_all_cloexec("second upgraded process", gen2);

    drop(held);
    server.assert_gone(&[gen0, gen1], Duration::from_secs(10));
    server.stop();
}

/// Slots in `pid`'s fd table (`FDSize:` of /proc/PID/status).
fn fd_table_slots(pid: i32) -> usize {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status of a live pid");
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("an FDSize line")
}

/// This process's soft RLIMIT_NOFILE.
fn nofile() -> u64 {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur as u64
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit (the servers it starts inherit
/// it), so that a test can hold a few thousand connections; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: rlimit is plain data; getrlimit fills it, setrlimit reads it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "raising RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
    }
    nofile()
}

/// Held by the tests that look at a server's fd table size: a child forked while another test
/// holds thousands of sockets starts with a table sized to them.
static FD_TABLE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The fd table a server grows to before it serves: a full accept queue's worth of slots,
/// `min(somaxconn, RLIMIT_NOFILE)` rounded up to a power of two (what the kernel allocates),
/// so a burst does not grow it under load.
fn first_table(nofile: u64) -> usize {
    let somaxconn: u64 = fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    somaxconn.min(nofile).max(128).next_power_of_two() as usize
}

/// A first generation, before any connection, already has a table for a full accept queue
/// (each growth of a multi-threaded process's table waits an RCU grace period: ~19 ms on the
/// serving thread here, twice at the first 512-connection burst before this), and never more
/// than its fd limit allows.
#[test]
fn first_generation_starts_with_a_table_for_a_full_accept_queue() {
    let _one_at_a_time = FD_TABLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let nofile = nofile();
    let server = EchoServer::start(EchoOpts::default());
    let slots = fd_table_slots(server.pid());
    let want = first_table(nofile);
    assert_eq!(
        slots, want,
        "a fresh server's fd slots (somaxconn, nofile {nofile})"
    );
    server.stop();

    let small = EchoServer::start(EchoOpts {
        nofile: Some(1024),
        ..EchoOpts::default()
    });
    let slots = fd_table_slots(small.pid());
    assert_eq!(slots, 1024, "with RLIMIT_NOFILE 1024");
    drop(small.open_conn(small.addr(), "still serving\n"));
    small.stop();
}

/// The new process starts with an fd table as big as the old one's had become, so its first
/// accepts under load do not grow it. The old process's table grows past its start-up size
/// with connections, which then close: a child would otherwise get a table sized to the fds
/// still open, 64 slots (or its own start-up size).
#[test]
fn new_process_starts_with_the_old_fd_table_size() {
    let _one_at_a_time = FD_TABLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let nofile = raise_nofile();
    let grow = first_table(nofile) + 100;
    // The old table can only outgrow its start-up size if the limit lets it: the test holds
    // `grow` client ends and the server as many.
    if nofile < grow as u64 + 200 {
        eprintln!("skipped: RLIMIT_NOFILE {nofile} leaves no room above {grow} connections");
        return;
    }
    let server = EchoServer::start(EchoOpts::default());
    let mut held: Vec<_> = (0..grow)
        .map(|i| server.open_conn(server.addr(), &format!("grow-{i}\n")))
        .collect();
    held.truncate(5);
    let old = server.pid();
    // Until the server has closed its ends too: a child's copied table is sized by the
    // highest open fd, so every fd must be back below the 64 slots of a default table.
    let highest_fd = || fds_of(old).iter().map(|&(fd, _)| fd).max().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while highest_fd() >= 64 && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    assert!(
        highest_fd() < 64,
        "the server kept fds above 63 open: {:?}",
        fds_of(old)
    );
    let old_slots = fd_table_slots(old);
    assert!(
        old_slots > first_table(nofile),
        "{grow} connections grew the table to {old_slots} slots only"
    );
    let new = server.upgrade();
    let new_slots = fd_table_slots(new);
    eprintln!("fd table: old {old} {old_slots} slots, new {new} {new_slots} slots");
    // The same size, not more: a table that doubled with every generation would cost memory
    // and spawn time.
    assert_eq!(
        new_slots, old_slots,
        "the new process's fd table has {new_slots} slots, the old one's {old_slots}"
    );
    // The slot used to grow it was closed before exec.
    let slot = old_slots as i32 / 2;
    assert!(
        !fds_of(new).iter().any(|&(fd, _)| fd == slot),
        "fd {slot} (used to grow the table) is open in the new process"
    );
    assert_all_cloexec("upgraded process", new);
    // And the generation after it.
    let third = server.upgrade();
    assert_eq!(
        fd_table_slots(third),
        old_slots,
        "the third generation's fd table"
    );
    drop(held);
    let r = burst(server.addr(), 50);
    r.assert_clean();
    server.assert_gone(&[old, new], Duration::from_secs(10));
    server.stop();
}

/// A script that records, as `{prefix}.fds`, the fds the shell runs with (and env, fd 3's
/// target), then exits 1. `{prefix}.fds` is written last (rename), as the "done" marker.
fn fd_probe_script(prefix: &str) -> String {
    format!(
        "#!/bin/sh\n\
         env > {prefix}.env\n\
         readlink /proc/$$/fd/3 > {prefix}.fd3 2>&1\n\
         ls /proc/$$/fd > {prefix}.fds.tmp\n\
         mv {prefix}.fds.tmp {prefix}.fds\n\
         exit 1\n"
    )
}

fn read_fd_list(path: &std::path::Path) -> BTreeSet<i32> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .split_whitespace()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| panic!("bad fd {s:?} in {}: {e}", path.display()))
        })
        .collect()
}

fn wait_for_file(path: &std::path::Path, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        thread::sleep(POLL);
    }
    path.exists()
}

#[test]
fn child_inherits_exactly_one_fd() {
    let server = EchoServer::start(EchoOpts {
        listeners: 2,
        ..Default::default()
    });
    let dir = server.dir().to_path_buf();

    // Baseline: which fds does /bin/sh itself hold while running such a script, when started
    // with only 0, 1, 2? (dash keeps the script open on fd 10; bash would use 255.)
    let base_prefix = dir.join("baseline").display().to_string();
    let probe = dir.join("probe.sh");
    replace_file(&probe, fd_probe_script(&base_prefix).as_bytes(), 0o755);
    let child = common::spawn(
        clean_command(&probe)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_remove("RINGFLIP_HANDOFF_FD"),
    )
    .expect("spawn probe");
    let probe_proc = Proc::of(child.id() as i32).expect("probe vanished");
    drop(child);
    let st = wait_exit(probe_proc, Duration::from_secs(10)).expect("probe script did not exit");
    assert_eq!(status_str(st), "exit code 1");
    let baseline = read_fd_list(&dir.join("baseline.fds"));
    let shell_own: BTreeSet<i32> = baseline.iter().copied().filter(|&fd| fd > 2).collect();
    eprintln!(
        "/bin/sh -> {:?}; baseline fds {baseline:?}; the shell's own: {shell_own:?}",
        fs::read_link("/bin/sh").ok()
    );
    assert!(
        baseline.is_superset(&[0, 1, 2].into()),
        "baseline {baseline:?}"
    );
    assert!(
        !baseline.contains(&3),
        "the shell itself uses fd 3?! {baseline:?}"
    );

    // The real thing: the server starts the probe as its "new binary".
    let child_prefix = dir.join("child").display().to_string();
    server.replace_binary_with_script(&fd_probe_script(&child_prefix));
    server.upgrade_expect_rollback(ms(1000));
    assert!(
        wait_for_file(&dir.join("child.fds"), Duration::from_secs(5)),
        "the probe script never ran (no child.fds)\n{}",
        server.log_tail()
    );
    let got = read_fd_list(&dir.join("child.fds"));
    let mut expected: BTreeSet<i32> = [0, 1, 2, 3].into();
    expected.extend(shell_own.iter().copied());
    let fd3 = fs::read_to_string(dir.join("child.fd3")).unwrap_or_default();
    eprintln!(
        "new binary started with fds {got:?} (fd 3 -> {})",
        fd3.trim()
    );
    assert_eq!(
        got, expected,
        "the new binary must inherit exactly 0, 1, 2 and the handoff fd 3 (plus the shell's own {shell_own:?}); \
         fd 3 -> {fd3:?}"
    );
    let env = fs::read_to_string(dir.join("child.env")).expect("child.env");
    assert!(
        env.lines().any(|l| l == "RINGFLIP_HANDOFF_FD=3"),
        "RINGFLIP_HANDOFF_FD=3 not in the new binary's environment:\n{}",
        env.lines()
            .filter(|l| l.starts_with("RINGFLIP"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.assert_no_children(Duration::from_secs(3));

    // And the server is still fine: a real upgrade works.
    server.restore_binary();
    let old = server.pid();
    let new = server.upgrade();
    assert_ne!(new, old);
    let r = burst(server.addr(), 50);
    r.assert_clean();
    server.stop();
}
