//! The in-process API: the phase watch, live-connection counting through drain guards, shutdown
//! that waits for the last guard, in the blocking `run` mode and as a task of a tokio runtime.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use ringflip::{Connection, ExitReason, Handle, Phase, Server};

const T: Duration = Duration::from_secs(5);

/// Builds a server on its own thread (build() blocks the upgrade signals in the calling thread)
/// and runs it there with `on_connection`.
fn start(
    on_connection: impl FnMut(Connection) + Send + 'static,
) -> (
    Handle,
    std::net::SocketAddr,
    std::thread::JoinHandle<ExitReason>,
) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("api", "127.0.0.1:0".parse().unwrap())
            .drain_timeout(Duration::from_secs(10))
            .build()
            .expect("build");
        tx.send((server.handle(), server.local_addr("api").unwrap()))
            .unwrap();
        server.run(on_connection).expect("run")
    });
    let (handle, addr) = rx.recv_timeout(T).expect("server started");
    (handle, addr, thread)
}

#[test]
fn shutdown_waits_for_the_last_connection_and_the_watch_sees_each_phase() {
    let (conns_tx, conns_rx) = mpsc::channel::<Connection>();
    let (handle, addr, thread) = start(move |c| conns_tx.send(c).unwrap());
    let mut watch = handle.watch_phase();
    assert_eq!(watch.current(), Phase::Serving);
    // "No limit" (it panicked: `now + Duration::MAX`); the phase is there at once.
    assert_eq!(
        watch.wait_for(Duration::MAX, |p| p == Phase::Serving),
        Some(Phase::Serving)
    );
    assert_eq!(handle.generation(), 0);

    let mut client = TcpStream::connect(addr).unwrap();
    let conn = conns_rx.recv_timeout(T).expect("accepted");
    assert_eq!(conn.listener(), "api");
    assert!(!conn.is_unix());
    assert_eq!(handle.live_connections(), 1);

    handle.shutdown();
    assert_eq!(
        watch.wait_for(T, |p| p == Phase::Draining),
        Some(Phase::Draining)
    );
    // Still draining while the connection lives; the connection still works.
    assert_eq!(watch.changed(Duration::from_millis(200)), None);
    let (mut stream, guard) = conn.into_std().into_parts();
    client.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    stream.read_exact(&mut b).unwrap();
    // New connections are no longer accepted by this process (nothing else listens, so the
    // kernel queues them; none reaches the application).
    let _late = TcpStream::connect(addr);
    assert!(conns_rx.recv_timeout(Duration::from_millis(200)).is_err());

    drop(stream);
    drop(guard);
    assert_eq!(
        watch.wait_for(T, |p| p == Phase::Exited),
        Some(Phase::Exited)
    );
    assert_eq!(thread.join().unwrap(), ExitReason::Shutdown);
    assert_eq!(handle.live_connections(), 0);
}

/// Runs `future` to its end on a current-thread tokio runtime, in a `LocalSet` (`run_async`'s
/// future is not `Send`).
fn block_on_local<F: std::future::Future>(future: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, future)
}

#[test]
fn runs_as_a_task_of_a_tokio_runtime() {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("api", "127.0.0.1:0".parse().unwrap())
            .build()
            .expect("build");
        tx.send((server.handle(), server.local_addr("api").unwrap()))
            .unwrap();
        block_on_local(async move {
            server
                .run_async(|conn| {
                    tokio::task::spawn_local(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut stream = conn.into_tokio().unwrap(); // owns the drain guard
                        let mut buf = [0u8; 64];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                })
                .await
                .expect("run_async")
        })
    });
    let (handle, addr) = rx.recv_timeout(T).unwrap();
    let mut phases = handle.phase_receiver();
    for i in 0..50 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let line = format!("hello {i}\n");
        c.write_all(line.as_bytes()).unwrap();
        let mut got = vec![0u8; line.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, line.as_bytes());
    }
    handle.shutdown();
    assert_eq!(thread.join().unwrap(), ExitReason::Shutdown);
    assert_eq!(*phases.borrow_and_update(), Phase::Exited);
}

#[test]
fn bad_configuration_is_a_clear_error() {
    std::thread::spawn(|| {
        let err = Server::builder().build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: no listener configured"
        );
        let err = Server::builder()
            .listen_tcp("a", "127.0.0.1:0".parse().unwrap())
            .listen_tcp("a", "127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("used twice"), "{err}");
        let err = Server::builder()
            .listen_tcp("ringflip.x", "127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        let tcp = || Server::builder().listen_tcp("a", "127.0.0.1:0".parse().unwrap());
        // "Never" as a timeout: it panicked in the middle of the first upgrade or drain.
        let err = tcp().drain_timeout(Duration::MAX).build().unwrap_err();
        assert!(err.to_string().contains("drain_timeout"), "{err}");
        let err = tcp().ready_timeout(Duration::MAX).build().unwrap_err();
        assert!(err.to_string().contains("ready_timeout"), "{err}");
        let err = tcp().ready_timeout(Duration::ZERO).build().unwrap_err();
        assert!(err.to_string().contains("ready_timeout is zero"), "{err}");
        // Names the handoff cannot carry: refused here, not at every upgrade.
        let long = "n".repeat(256);
        let err = Server::builder()
            .listen_tcp(long.as_str(), "127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("longer than 255 bytes"), "{err}");
        let err = Server::builder()
            .listen_tcp("n".repeat(253), "127.0.0.1:0".parse().unwrap())
            .workers(10) // member 9 is named `…#9`: 255 bytes, fits
            .build()
            .map(drop);
        assert!(err.is_ok(), "{err:?}");
        let err = Server::builder()
            .listen_tcp("n".repeat(253), "127.0.0.1:0".parse().unwrap())
            .workers(11) // `…#10`: 256 bytes
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("worker's suffix"), "{err}");
        let err = tcp()
            .bind_udp(long.as_str(), "127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("longer than 255 bytes"), "{err}");
        // '#' names a per-worker member of a TCP listener: a UDP socket `a#1` was taken for
        // one at an upgrade, and the upgrade failed.
        let err = tcp()
            .bind_udp("a#1", "127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // A port someone else holds: a bind error naming the listener and the address.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Server::builder()
            .listen_tcp("web", addr)
            .build()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("listener \"web\": cannot bind {addr}")),
            "{err}"
        );
    })
    .join()
    .unwrap();
}

/// Calls `handle.upgrade()` on a thread of its own; the answer, or `None` if none came within
/// `T` (the call would block for ever: the thread is left behind).
fn upgrade_answer(handle: &Handle) -> Option<Result<u32, ringflip::UpgradeError>> {
    let (tx, rx) = mpsc::channel();
    let handle = handle.clone();
    std::thread::spawn(move || {
        let _ = tx.send(handle.upgrade());
    });
    rx.recv_timeout(T).ok()
}

/// `Handle::upgrade` once no driver will ever answer: after `run` returned, and for a server
/// dropped without running. Both must say `NotRunning` at once, not block for ever.
#[test]
fn upgrade_without_a_running_server_is_not_running() {
    let (handle, _addr, thread) = start(|_conn| {});
    handle.shutdown();
    assert_eq!(thread.join().unwrap(), ExitReason::Shutdown);
    assert!(
        matches!(
            upgrade_answer(&handle),
            Some(Err(ringflip::UpgradeError::NotRunning))
        ),
        "upgrade after run returned"
    );

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("api", "127.0.0.1:0".parse().unwrap())
            .build()
            .expect("build");
        tx.send(server.handle()).unwrap();
        // Dropped here, never run.
    })
    .join()
    .unwrap();
    let handle = rx.recv().unwrap();
    assert!(
        matches!(
            upgrade_answer(&handle),
            Some(Err(ringflip::UpgradeError::NotRunning))
        ),
        "upgrade on a server dropped unrun"
    );
}

/// The blocking `Handle::upgrade` on the server's own thread would wait for an answer only
/// that thread can give: it is `OnServerThread` at once, in `run` (from the connection
/// callback) and in `run_async` (from a task of the same current-thread runtime). On another
/// thread it is still a normal upgrade request.
#[test]
fn blocking_upgrade_on_the_servers_own_thread_is_an_error_not_a_deadlock() {
    // `run`: the callback runs on the ring's thread.
    let (answers_tx, answers) = mpsc::channel();
    let handle_slot = std::sync::Arc::new(std::sync::OnceLock::<Handle>::new());
    let slot = handle_slot.clone();
    let (handle, addr, thread) = start(move |_conn| {
        if let Some(handle) = slot.get() {
            let _ = answers_tx.send(handle.upgrade());
        }
    });
    handle_slot.set(handle.clone()).unwrap();
    let _client = TcpStream::connect(addr).unwrap();
    let answer = answers
        .recv_timeout(T)
        .expect("upgrade() on the ring thread did not return (deadlock)");
    assert_eq!(answer, Err(ringflip::UpgradeError::OnServerThread));
    handle.shutdown();
    assert_eq!(thread.join().unwrap(), ExitReason::Shutdown);

    // `run_async` on a current-thread runtime: a task beside the ring, on its thread.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("api", "127.0.0.1:0".parse().unwrap())
            .build()
            .expect("build");
        let handle = server.handle();
        block_on_local(async move {
            let h = handle.clone();
            tokio::task::spawn_local(async move {
                let _ = tx.send(h.upgrade());
                h.shutdown();
            });
            server.run_async(|_conn| {}).await.expect("run_async")
        })
    });
    let answer = rx
        .recv_timeout(T)
        .expect("upgrade() on the runtime's thread did not return (deadlock)");
    assert_eq!(answer, Err(ringflip::UpgradeError::OnServerThread));
}

/// `Handle::upgrade_async` awaited on the ring's own thread (a task of the current-thread
/// runtime that runs `run_async`) gets its answer: here the upgrade fails at once (the binary
/// does not exist), and the server serves on.
#[test]
fn upgrade_async_on_the_servers_own_thread_gets_its_answer() {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let server = Server::builder()
            .listen_tcp("api", "127.0.0.1:0".parse().unwrap())
            .binary("/nonexistent/ringflip-test-binary")
            .build()
            .expect("build");
        let handle = server.handle();
        block_on_local(async move {
            let h = handle.clone();
            tokio::task::spawn_local(async move {
                let answer = h.upgrade_async().await;
                let phase = h.phase();
                let _ = tx.send((answer, phase));
                h.shutdown();
            });
            server.run_async(|_conn| {}).await.expect("run_async")
        })
    });
    let (answer, phase) = rx
        .recv_timeout(T)
        .expect("upgrade_async() on the runtime's thread got no answer");
    assert!(
        matches!(
            answer,
            Err(ringflip::UpgradeError::Failed(
                ringflip::UpgradeFailure::Spawn(_)
            ))
        ),
        "{answer:?}"
    );
    assert_eq!(phase, Phase::Serving, "a failed upgrade leaves it serving");
    assert_eq!(thread.join().unwrap(), ExitReason::Shutdown);
}
