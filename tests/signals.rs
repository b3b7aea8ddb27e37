//! SIGHUP, SIGTERM and SIGINT reach the server whatever thread the kernel hands them to: a
//! thread started before `build()` (a multi-thread runtime made first, a logging thread) does
//! not block them, and with the default action a signal delivered there ended the whole
//! process (`src/signals.rs`). Its own test binary: without the fix, the process dies.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringflip::{ExitReason, Server};

const T: Duration = Duration::from_secs(10);

/// A server built and run on a thread of its own (started after the caller's threads); back
/// once it serves.
fn serve_on_a_thread() -> std::thread::JoinHandle<ExitReason> {
    let (handle_tx, handle_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("s", "127.0.0.1:0".parse().unwrap())
            .drain_timeout(Duration::from_secs(5))
            .build()
            .expect("build");
        handle_tx.send(server.handle()).unwrap();
        server.run(|_conn| {}).expect("run")
    });
    let _handle = handle_rx.recv_timeout(T).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server
}

/// Waits (bounded) for the server's thread to return, and checks it shut down.
fn assert_shut_down(server: std::thread::JoinHandle<ExitReason>) {
    let started = Instant::now();
    while !server.is_finished() && started.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.is_finished(), "the server did not stop within {T:?}");
    assert_eq!(server.join().unwrap(), ExitReason::Shutdown);
}

/// Signal routing is process-wide (one forwarding target): one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_signal_delivered_to_a_thread_started_before_build_reaches_the_server() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Started before build(): it does not block the server's signals.
    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let bystander = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        let _ = stop_rx.recv_timeout(T);
    });
    let bystander_id = rx.recv_timeout(T).unwrap();

    let server = serve_on_a_thread();

    // SAFETY: the bystander thread is alive (it waits on stop_rx); SIGTERM to it alone.
    let rc = unsafe { libc::pthread_kill(bystander_id, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_shut_down(server);
    stop_tx.send(()).unwrap();
    bystander.join().unwrap();
}

/// The log lines of this test binary, for the test below.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_forwarded_signal_keeps_its_senders_pid() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The driver tells the predecessor's SIGTERM from an operator's by the sender's pid
    // (`ssi_pid`), so forwarding from another thread must keep it: a `tgkill` from the handler
    // made every forwarded signal look sent by this process itself.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    // Started before build(): it does not block the server's signals. A signal sent to this
    // thread alone (not to the process, which the driver's signalfd could read directly) can
    // only reach the driver through the forwarding handler.
    let (tid_tx, tid_rx) = mpsc::channel();
    let bystander = std::thread::spawn(move || {
        // SAFETY: plain syscall.
        tid_tx
            .send(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
            .unwrap();
        let _ = stop_rx.recv_timeout(T);
    });
    let bystander_tid = tid_rx.recv_timeout(T).unwrap();
    let server = serve_on_a_thread();

    // Another process sends SIGTERM to the bystander thread.
    let me = std::process::id() as libc::pid_t;
    // SAFETY: the child only makes two async-signal-safe syscalls and exits.
    let sender = unsafe {
        match libc::fork() {
            0 => {
                let rc = libc::syscall(libc::SYS_tgkill, me, bystander_tid, libc::SIGTERM);
                libc::_exit(if rc == 0 { 0 } else { 1 });
            }
            pid => pid,
        }
    };
    assert!(sender > 0, "fork");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(sender, &mut status, 0) }, sender);
    assert_eq!(status, 0, "tgkill from the child failed");
    assert_shut_down(server);
    stop_tx.send(()).unwrap();
    bystander.join().unwrap();
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains(&format!("sender={sender}")),
        "the shutdown was not logged with the sender's pid {sender} (this process: {}):\n{log}",
        std::process::id()
    );
}
