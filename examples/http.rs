//! An axum HTTP server on a multi-thread tokio runtime that upgrades itself without failing a
//! request (`ringflip::http::serve`, feature `http`). Keep-alive connections drain gracefully:
//! once the new process is READY, HTTP/1.1 responses say `Connection: close` and HTTP/2
//! connections get a GOAWAY, and the old process exits as soon as its last response is out.
//!
//! ```text
//! cargo build --release --features axum --example http
//! target/release/examples/http --listen 127.0.0.1:8080 --pid-file /tmp/http.pid &
//! curl localhost:8080/                      # hello from <pid>
//! curl --data 'hi' localhost:8080/echo      # hi
//! kill -HUP $(cat /tmp/http.pid)            # upgrade to the binary now at that path
//! kill -TERM $(cat /tmp/http.pid)           # stop accepting, drain, exit 0
//! ```
//!
//! Options, as for `examples/echo.rs`: `--listen ADDR` (repeatable; `IP:PORT`, `[IPv6]:PORT`,
//! `unix:PATH`, `unix:@NAME`), `--pid-file PATH`, `--ready-timeout-ms N` (default 30000),
//! `--drain-timeout-ms N` (default 60000); and `--idle-grace-ms N` (how long an idle HTTP/1.1
//! connection is kept once draining; default 250), `--axum-serve` (serve with `axum::serve`
//! itself, on `ringflip::http::Incoming`, instead of `ringflip::http::serve`). Routes: `GET /` (`hello from <pid>`),
//! `POST /echo` (the body back), `GET /sleep/{ms}` (answers after that long, at most 60 s),
//! `POST /upgrade` (upgrades from inside the runtime with
//! `Handle::upgrade_async`: `ok <new pid>`, or the reason with status 503).
//! Logs go to stderr; `RUST_LOG` filters them (default `info`).

use std::process::ExitCode;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

struct Args {
    listen: Vec<String>,
    pid_file: Option<String>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    idle_grace: Duration,
    axum_serve: bool,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        listen: Vec::new(),
        pid_file: None,
        ready_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(60),
        idle_grace: ringflip::http::DEFAULT_IDLE_GRACE,
        axum_serve: false,
    };
    while let Some(flag) = argv.next() {
        if flag == "--axum-serve" {
            args.axum_serve = true;
            continue;
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let millis = || {
            value
                .parse()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--listen" => args.listen.push(value.clone()),
            "--pid-file" => args.pid_file = Some(value.clone()),
            "--ready-timeout-ms" => args.ready_timeout = millis()?,
            "--drain-timeout-ms" => args.drain_timeout = millis()?,
            "--idle-grace-ms" => args.idle_grace = millis()?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.listen.is_empty() {
        return Err("at least one --listen ADDR is needed".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("http: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = ringflip::Server::builder()
        .ready_timeout(args.ready_timeout)
        .drain_timeout(args.drain_timeout);
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    for (i, listen) in args.listen.iter().enumerate() {
        let name = format!("http{i}");
        builder = match listen.strip_prefix("unix:") {
            Some(path) => match path.strip_prefix('@') {
                Some(abstract_name) => builder.listen_unix_abstract(name, abstract_name),
                None => builder.listen_unix(name, path, None),
            },
            None => match listen.parse() {
                Ok(addr) => builder.listen_tcp(name, addr),
                Err(e) => {
                    eprintln!("http: --listen {listen}: {e}");
                    return ExitCode::from(2);
                }
            },
        };
    }
    // Before the runtime starts: build() blocks the upgrade signals, and the runtime's threads
    // inherit the mask.
    let server = match builder.build() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    let handle = server.handle();
    let app = Router::new()
        .route(
            "/",
            get(|| async { format!("hello from {}\n", std::process::id()) }),
        )
        .route("/echo", post(|body: Bytes| async move { body }))
        .route(
            "/sleep/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                format!("slept {ms} ms in {}\n", std::process::id())
            }),
        )
        .route(
            "/upgrade",
            post(move || async move {
                match handle.upgrade_async().await {
                    Ok(pid) => (StatusCode::OK, format!("ok {pid}\n")),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                }
            }),
        );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the tokio runtime");
            return ExitCode::from(1);
        }
    };
    // The upgrade ring on this thread, the connections on the runtime's workers.
    let result = if args.axum_serve {
        let (incoming, ring) = ringflip::http::Incoming::new(server);
        let incoming = incoming.idle_grace(args.idle_grace);
        let app = app.layer(incoming.close_on_drain());
        let shutdown = incoming.shutdown_signal();
        runtime.block_on(async move {
            let serve = axum::serve(incoming, app).with_graceful_shutdown(shutdown);
            tokio::spawn(async move { serve.await });
            ring.await
        })
    } else {
        let http = ringflip::http::Http::new().idle_grace(args.idle_grace);
        runtime.block_on(http.serve(server, app))
    };
    match result {
        Ok(exit) => {
            tracing::info!(?exit, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::from(1)
        }
    }
}
