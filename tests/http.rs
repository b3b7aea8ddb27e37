//! The HTTP example (`examples/http.rs`, `ringflip::http::serve` on a multi-thread runtime)
//! under keep-alive load through upgrades, with hyper's own client: 64 HTTP/1.1 keep-alive
//! clients and 8 HTTP/2 clients send requests back to back through 20 upgrades. No request may
//! fail, and each old process must be gone within 1 s of its successor's READY: its drain
//! ends when its last response is out (`Connection: close`, GOAWAY), not at the drain
//! deadline (20 s here, so a drain that waits for the clients to hang up fails the test).
//!
//! Needs the `axum` feature (and so `http`) and the example built: `cargo build --all-features
//! --examples` (the whole `cargo test --all-features` builds it).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{example_binary, EchoOpts, EchoServer};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const HTTP1_CLIENTS: usize = 64;
const HTTP2_CLIENTS: usize = 8;
const UPGRADES: usize = 20;
/// How long after its successor's READY an old process may still exist.
const GONE_BOUND: Duration = Duration::from_secs(1);
/// The drain deadline: far above `GONE_BOUND`, so only an early drain passes.
const DRAIN_TIMEOUT_MS: u64 = 20_000;
/// One request, from sending it to the whole response.
const REQUEST_BOUND: Duration = Duration::from_secs(5);
/// The whole load, whatever happens.
const RUN_BOUND: Duration = Duration::from_secs(120);

/// What the clients saw, shared with the test thread.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// The first failures, for the message.
    errors: Mutex<Vec<String>>,
    /// Every pid that answered a `GET /`.
    pids: Mutex<HashSet<u32>>,
    /// Requests answered, per client.
    per_client: Vec<AtomicU64>,
}

impl Tally {
    fn fail(&self, client: usize, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(format!("client {client}: {what}"));
        }
    }
}

/// One client: requests back to back on its own keep-alive connection (HTTP/1.1) or HTTP/2
/// connection, alternating `GET /` and `POST /echo`, until `stop`.
async fn client(i: usize, addr: SocketAddr, http2: bool, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_max_idle_per_host(1);
    if http2 {
        builder.http2_only(true);
    }
    let client = builder.build_http::<Full<Bytes>>();
    let deadline = Instant::now() + RUN_BOUND;
    let mut n = 0u64;
    while !stop.load(Relaxed) && Instant::now() < deadline {
        n += 1;
        let echo = n % 2 == 0;
        let body = format!("client {i} request {n}");
        let request = if echo {
            Request::builder()
                .method(Method::POST)
                .uri(format!("http://{addr}/echo"))
                .body(Full::new(Bytes::from(body.clone())))
        } else {
            Request::builder()
                .uri(format!("http://{addr}/"))
                .body(Full::new(Bytes::new()))
        }
        .unwrap();
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            status_and_body(response).await
        };
        match tokio::time::timeout(REQUEST_BOUND, exchange).await {
            Err(_) => tally.fail(
                i,
                format!("request {n}: no response within {REQUEST_BOUND:?}"),
            ),
            Ok(Err(e)) => tally.fail(i, format!("request {n}: {e}")),
            Ok(Ok((status, bytes))) if status != StatusCode::OK => {
                tally.fail(i, format!("request {n}: status {status}: {bytes:?}"))
            }
            Ok(Ok((_, bytes))) if echo && bytes != body.as_bytes() => {
                tally.fail(i, format!("request {n}: echoed {bytes:?}, sent {body:?}"))
            }
            Ok(Ok((_, bytes))) => {
                if !echo {
                    let text = String::from_utf8_lossy(&bytes);
                    match text.trim().strip_prefix("hello from ").map(str::parse) {
                        Some(Ok(pid)) => {
                            tally.pids.lock().unwrap().insert(pid);
                        }
                        _ => tally.fail(i, format!("request {n}: unexpected body {text:?}")),
                    }
                }
                tally.ok.fetch_add(1, Relaxed);
                tally.per_client[i].fetch_add(1, Relaxed);
            }
        }
    }
}

fn start_server(extra_args: &[&str]) -> EchoServer {
    EchoServer::start(EchoOpts {
        binary: Some(example_binary("http")),
        drain_timeout_ms: Some(DRAIN_TIMEOUT_MS),
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..EchoOpts::default()
    })
}

/// Waits (bounded) until the clients have had `more` more answers than `from`.
fn wait_for_progress(tally: &Tally, from: u64, more: u64, server: &EchoServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.ok.load(Relaxed) < from + more {
        assert!(
            Instant::now() < deadline,
            "the clients made no progress ({} answered, {} failed: {:?})\n--- server log ---\n{}",
            tally.ok.load(Relaxed),
            tally.failed.load(Relaxed),
            tally.errors.lock().unwrap(),
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn keep_alive_clients_see_no_failure_and_old_processes_exit_once_answered() {
    upgrades_under_keep_alive_load(&[]);
}

/// The same through `axum::serve` on `ringflip::http::Incoming`, with its layer and signal.
#[test]
fn the_same_through_axum_serve() {
    upgrades_under_keep_alive_load(&["--axum-serve"]);
}

fn upgrades_under_keep_alive_load(server_args: &[&str]) {
    let server = start_server(server_args);
    let addr = server.addr();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = HTTP1_CLIENTS + HTTP2_CLIENTS;
    let tally = Arc::new(Tally {
        per_client: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        ..Tally::default()
    });
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            runtime.spawn(client(
                i,
                addr,
                i >= HTTP1_CLIENTS,
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    wait_for_progress(&tally, 0, 2 * clients as u64, &server);

    let mut lifetimes = Vec::new();
    for round in 0..UPGRADES {
        // Every connection in its steady keep-alive state when the upgrade comes.
        std::thread::sleep(Duration::from_millis(100));
        let old = server.current();
        let new = server.upgrade(); // returns once the pid file names the successor
        let ready = Instant::now();
        // The successor wrote its pid file just before its READY: 1 s from here is at most
        // 1 s (and one poll) from the READY.
        server.assert_gone(&[old.pid], GONE_BOUND);
        lifetimes.push(ready.elapsed());
        assert_ne!(new, old.pid);
        // Load on the new process before the next upgrade, on every kind of client.
        let now = tally.ok.load(Relaxed);
        wait_for_progress(&tally, now, clients as u64, &server);
        assert_eq!(
            tally.failed.load(Relaxed),
            0,
            "after upgrade {round}: {:?}",
            tally.errors.lock().unwrap()
        );
    }
    stop.store(true, Relaxed);
    runtime.block_on(async {
        for task in tasks {
            tokio::time::timeout(REQUEST_BOUND * 2, task)
                .await
                .expect("a client did not stop")
                .expect("a client panicked");
        }
    });
    let failed = tally.failed.load(Relaxed);
    let ok = tally.ok.load(Relaxed);
    let pids = tally.pids.lock().unwrap().len();
    eprintln!(
        "{ok} requests answered by {pids} processes, {failed} failed; old processes lived \
         {:?} after their successor's READY (max)",
        lifetimes.iter().max()
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        tally.errors.lock().unwrap()
    );
    for (i, n) in tally.per_client.iter().enumerate() {
        assert!(n.load(Relaxed) > 0, "client {i} got no answer");
    }
    // Every generation served (the clients saw at least most of them).
    assert!(pids > UPGRADES / 2, "only {pids} processes answered");
    server.stop();
}

/// `Handle::upgrade_async` from a request handler, inside the multi-thread runtime of the
/// server it upgrades (`POST /upgrade`): the answer names the new process, which then serves.
#[test]
fn a_handler_upgrades_its_own_server_with_upgrade_async() {
    let server = start_server(&[]);
    let addr = server.addr();
    let old = server.current();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}/upgrade"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("no answer to POST /upgrade within 10 s")
            .expect("POST /upgrade");
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    assert_eq!(
        answer.0,
        StatusCode::OK,
        "{}\n{}",
        answer.1,
        server.log_tail()
    );
    let new: i32 = answer
        .1
        .trim()
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("answer {:?}", answer.1));
    server.guard().track(new);
    server.assert_gone(&[old.pid], GONE_BOUND);
    assert_eq!(server.pid(), new);
    server.stop();
}

/// `GET path` with `client`: the status, the `Connection` header and the body.
async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, Option<String>, String) {
    let request = Request::builder()
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(REQUEST_BOUND, client.request(request))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {REQUEST_BOUND:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
    let status = response.status();
    let connection = response
        .headers()
        .get(hyper::header::CONNECTION)
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        connection,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Once the successor is READY: idle keep-alive connections (HTTP/1.1 and HTTP/2) are closed
/// (their clients' next requests go to the new process), while a request in flight keeps the
/// old process until it is answered (with `Connection: close`); then it exits at once.
#[test]
fn idle_connections_close_and_an_in_flight_request_is_answered_before_the_exit() {
    let server = start_server(&[]);
    let addr = server.addr();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http1 = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let http2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let old = server.current();
    let hello = format!("hello from {}\n", old.pid);
    for client in [&http1, &http2] {
        let (status, _, body) = runtime.block_on(get(client, addr, "/"));
        assert_eq!((status, body.as_str()), (StatusCode::OK, hello.as_str()));
    }
    // Both connections are idle now. A slow request in flight on a third one:
    let slow_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let slow = runtime.spawn(async move { get(&slow_client, addr, "/sleep/1500").await });
    std::thread::sleep(Duration::from_millis(300));

    let new = server.upgrade();
    // Well past the idle grace, well before the slow answer: the old process still serves it.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        old.alive(),
        "the old process left with a request in flight\n{}",
        server.log_tail()
    );
    let (status, connection, body) = runtime.block_on(slow).unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("slept 1500 ms in {}\n", old.pid));
    assert_eq!(
        connection.as_deref(),
        Some("close"),
        "drained: Connection: close"
    );
    server.assert_gone(&[old.pid], GONE_BOUND);

    // The idle connections were closed: each client's next request reaches the new process.
    let hello = format!("hello from {new}\n");
    for client in [&http1, &http2] {
        let (status, _, body) = runtime.block_on(get(client, addr, "/"));
        assert_eq!((status, body.as_str()), (StatusCode::OK, hello.as_str()));
    }
    server.stop();
}

/// `GET /` on a fresh HTTP/1.1 connection to `addr`: the body (an error unless 200 OK).
async fn get_fresh(addr: SocketAddr) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match get_on(stream).await? {
        (StatusCode::OK, body) => Ok(body),
        (status, body) => Err(format!("status {status}: {body:?}")),
    }
}

/// `axum::serve` on `Incoming`, whose graceful shutdown is one-shot: the successor dies
/// 300 ms after its READY (misbehave's `ready-then-die`), within the idle grace (2 s here), so
/// the old process takes the service back. axum::serve must still be serving it: fresh
/// connections after the grace are answered by the old process (the shutdown signal
/// fired for the drain that resumed made them fail: accepted, then dropped with nobody to
/// take them). A later good upgrade then drains it, and it exits.
#[test]
fn axum_serve_serves_again_when_the_successor_dies_within_the_idle_grace() {
    const IDLE_GRACE: Duration = Duration::from_secs(2);
    let server = start_server(&[
        "--axum-serve",
        "--idle-grace-ms",
        &IDLE_GRACE.as_millis().to_string(),
    ]);
    let addr = server.addr();
    let old = server.current();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hello = format!("hello from {}\n", old.pid);
    assert_eq!(
        runtime.block_on(get_fresh(addr)).as_deref(),
        Ok(hello.as_str())
    );

    server.replace_binary_with_script(&format!(
        "#!/bin/sh\nexec {} ready-then-die\n",
        example_binary("misbehave").display()
    ));
    assert!(common::signal(old, libc::SIGHUP));
    server.wait_for_log(
        "the new process died during the drain; serving again",
        Duration::from_secs(10),
        "the old process did not take the service back",
    );
    // Past the idle grace of the drain that resumed.
    std::thread::sleep(IDLE_GRACE + Duration::from_millis(500));
    for i in 0..5 {
        assert_eq!(
            runtime.block_on(get_fresh(addr)).as_deref(),
            Ok(hello.as_str()),
            "request {i} after the resume\n{}",
            server.log_tail()
        );
    }

    server.restore_binary();
    let new = server.upgrade();
    // The clients' connections stay open (their tasks are not polled between the GETs): the
    // old process closes them one idle grace after the drain began.
    server.assert_gone(&[old.pid], IDLE_GRACE + GONE_BOUND);
    assert_eq!(
        runtime.block_on(get_fresh(addr)),
        Ok(format!("hello from {new}\n"))
    );
    server.stop();
}

/// A response's status and its whole body.
async fn status_and_body(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<(StatusCode, Bytes), String> {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok((status, body))
}

/// `GET /` with hyper's HTTP/1.1 client connection over `stream`, a fresh connection: the
/// status and the body (bounded by `REQUEST_BOUND`).
async fn get_on<S>(stream: S) -> Result<(StatusCode, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let request = Request::builder()
            .uri("/")
            .header(hyper::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (status, body) = status_and_body(response).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(REQUEST_BOUND, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_BOUND:?}")))
}

/// `GET /` over the Unix socket at `path` on a fresh connection: the status and the body.
async fn get_unix(path: &std::path::Path) -> (StatusCode, String) {
    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
    get_on(stream).await.expect("GET / over the Unix socket")
}

/// The same drain on a Unix listener: an idle keep-alive connection is closed once the
/// successor is READY, the old process exits within 1 s, and the new one answers.
#[test]
fn a_unix_listener_drains_the_same() {
    let dir = common::TempDir::new("http-unix");
    let path = dir.path().join("http.sock");
    let listen = format!("unix:{}", path.display());
    let server = start_server(&["--listen", &listen]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let old = server.current();
    let idle = runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let request = Request::builder()
            .uri("/")
            .header(hyper::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("hello from {}\n", old.pid).as_bytes());
        (sender, conn) // kept open, idle
    });
    let new = server.upgrade();
    server.assert_gone(&[old.pid], GONE_BOUND);
    // The idle connection was closed by the old process, between requests.
    let (_sender, conn) = idle;
    runtime
        .block_on(async { tokio::time::timeout(REQUEST_BOUND, conn).await })
        .expect("the idle Unix connection was not closed")
        .expect("the connection task panicked")
        .expect("the idle Unix connection ended with an error");
    let (status, body) = runtime.block_on(get_unix(&path));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("hello from {new}\n"));
    server.stop();
}
