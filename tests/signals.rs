//! SIGHUP, SIGTERM and SIGINT reach the server whatever thread the kernel hands them to: a
//! thread started before `build()` (a multi-thread runtime made first, a logging thread) does
//! not block them, and with the default action a signal delivered there ended the whole
//! process (`src/signals.rs`). Its own test binary: without the fix, the process dies.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringflip::{ExitReason, Server};

const T: Duration = Duration::from_secs(10);

#[test]
fn a_signal_delivered_to_a_thread_started_before_build_reaches_the_server() {
    // Started before build(): it does not block the server's signals.
    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let bystander = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        let _ = stop_rx.recv_timeout(T);
    });
    let bystander_id = rx.recv_timeout(T).unwrap();

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

    // SAFETY: the bystander thread is alive (it waits on stop_rx); SIGTERM to it alone.
    let rc = unsafe { libc::pthread_kill(bystander_id, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let started = Instant::now();
    while !server.is_finished() && started.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.is_finished(), "the server did not stop within {T:?}");
    assert_eq!(server.join().unwrap(), ExitReason::Shutdown);
    stop_tx.send(()).unwrap();
    bystander.join().unwrap();
}
