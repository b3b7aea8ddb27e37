//! HTTP/1.1 and HTTP/2 on tokio with hyper (feature `http`): ringflip's connections served by
//! hyper-util's connection builder on a multi-thread runtime, each one drained gracefully when
//! the process is replaced or stopped.
//!
//! [`serve`] runs a whole server: the upgrade ring on the thread that awaits it, every
//! connection a task of the runtime's pool, served with any tower service (an axum `Router`
//! is one); [`Http`] sets hyper's options. [`serve_connection`] serves one connection, for a
//! loop of your own. With the feature `axum`, `Incoming` is an `axum::serve::Listener`, for
//! `axum::serve` itself. axum's graceful shutdown is one-shot, so with `Incoming` a drain can
//! be rolled back (its successor died after READY: this process serves again) only within the
//! idle grace; [`serve`] can roll back throughout its drain. A successor that crashes once the
//! grace is over (and this process's commit taken) leaves nobody serving after this process
//! has drained, unless it had handed the service on itself: this process logs it as an error.
//!
//! # The drain
//! When the phase becomes [`Phase::Draining`] (the successor is READY, or a SIGTERM):
//! - an HTTP/2 connection gets a GOAWAY at once (hyper's graceful shutdown: the requests in
//!   flight are answered, the client opens new streams on a new connection); one that has
//!   sent no request yet is not known to be HTTP/2 and is treated as an idle HTTP/1.1 one;
//! - an HTTP/1.1 response gets `Connection: close`, so a keep-alive client sends its next
//!   request on a new connection (to the new process), and the connection closes once the
//!   response is written; a response that hands the connection over (`101 Switching
//!   Protocols`, a WebSocket handshake; a successful `CONNECT`) keeps its `Connection:
//!   upgrade`, and the upgraded connection keeps the drain waiting until it ends;
//! - an HTTP/1.1 connection that stays idle through the *idle grace* (default
//!   [`DEFAULT_IDLE_GRACE`]) is closed then, between requests (hyper's graceful shutdown).
//!
//! The grace is there because closing an idle HTTP/1.1 connection at once races with the
//! request its client may be sending at that moment: the request would meet a closed socket,
//! and clients do not resend a request they have written (hyper's client sending back to back
//! failed requests with `IncompleteMessage` at the first upgrades of `tests/http.rs` that way). A client sending requests back to
//! back sends one within the grace and gets its `Connection: close`. One idle for longer meets
//! the close that every HTTP/1.1 server's idle timeout has.
//!
//! Each connection's [`Guarded`] stream owns its drain guard, so the process exits as soon as
//! the last response is written, not at the drain deadline.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{routing::get, Router};
//!
//! let app = Router::new().route("/", get(|| async { "hello\n" }));
//! let server = ringflip::Server::builder()
//!     .listen_tcp("web", "127.0.0.1:8080".parse()?)
//!     .pid_file("/run/app.pid")
//!     .build()?; // before the runtime starts: its threads inherit the signal mask
//! let runtime = tokio::runtime::Runtime::new()?; // multi-thread
//! runtime.block_on(ringflip::http::serve(server, app))?; // replaced or stopped, drained
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming as IncomingBody;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use crate::connection::Guarded;
use crate::error::Error;
use crate::handle::Handle;
use crate::machine::{ExitReason, Phase};
use crate::server::Server;
use crate::stream::TokioStream;

#[cfg(feature = "axum")]
mod incoming;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use incoming::{CloseOnDrain, CloseOnDrainLayer, Incoming};

/// How long an HTTP/1.1 connection may stay idle once the process drains before it is closed
/// (see the module doc): 250 ms.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(250);

/// The error a connection ends with (hyper's, or the service's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-util's connection builder, as [`Http`] and [`serve_connection`] use it: HTTP/1.1 and
/// HTTP/2 (by the client's choice; HTTP/2 by prior knowledge), tasks on the tokio runtime.
pub type ConnectionBuilder = auto::Builder<TokioExecutor>;

/// Serves HTTP/1.1 and HTTP/2 with `service` until this process is replaced or stopped and
/// every connection has drained (see the module doc); returns what [`Server::run_async`]
/// returns. [`Http`] sets hyper's options and the idle grace.
///
/// Await it with the runtime's `block_on` (or as `#[tokio::main]`'s body): the upgrade ring is
/// polled by that thread, which never moves (the ring is single-issuer), while each connection
/// is a task spawned onto the runtime, so a multi-thread runtime serves on all its workers.
/// The future is not `Send`: it cannot be `tokio::spawn`ed by mistake.
pub async fn serve<S, B>(server: Server, service: S) -> Result<ExitReason, Error>
where
    S: tower_service::Service<Request<IncomingBody>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Http::new().serve(server, service).await
}

/// [`serve`] with settings: hyper-util's connection builder (HTTP/1 and HTTP/2 options,
/// timeouts) and the idle grace of HTTP/1.1 connections once draining.
#[derive(Clone, Debug)]
pub struct Http {
    builder: ConnectionBuilder,
    idle_grace: Duration,
}

impl Default for Http {
    fn default() -> Http {
        Http {
            builder: auto::Builder::new(TokioExecutor::new()),
            idle_grace: DEFAULT_IDLE_GRACE,
        }
    }
}

impl Http {
    /// hyper-util's defaults, and [`DEFAULT_IDLE_GRACE`].
    pub fn new() -> Http {
        Http::default()
    }

    /// The connection builder, to set hyper's options: `http.connection_builder().http2()
    /// .max_concurrent_streams(100)`.
    pub fn connection_builder(&mut self) -> &mut ConnectionBuilder {
        &mut self.builder
    }

    /// How long an idle HTTP/1.1 connection is kept once draining (see the module doc).
    pub fn idle_grace(mut self, grace: Duration) -> Http {
        self.idle_grace = grace;
        self
    }

    /// [`serve`] with these settings.
    pub async fn serve<S, B>(self, server: Server, service: S) -> Result<ExitReason, Error>
    where
        S: tower_service::Service<Request<IncomingBody>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let drain = Drain::new(&server.handle()).idle_grace(self.idle_grace);
        let builder = Arc::new(self.builder);
        server
            .run_async(move |conn| {
                let (builder, service, drain) = (builder.clone(), service.clone(), drain.clone());
                // Everything but the spawn on the runtime's workers, off the ring's thread.
                tokio::spawn(async move {
                    let stream = match conn.into_tokio() {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "registering a connection with the runtime");
                            return;
                        }
                    };
                    if let Err(e) = serve_connection(&builder, stream, service, drain).await {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                });
            })
            .await
    }
}

/// When a connection drains: made from the server's [`Handle`], cloned into each connection.
#[derive(Clone, Debug)]
pub struct Drain {
    phases: watch::Receiver<Phase>,
    idle_grace: Duration,
}

impl Drain {
    /// Drains when `handle`'s server does, with the default idle grace.
    pub fn new(handle: &Handle) -> Drain {
        Drain {
            phases: handle.phase_receiver(),
            idle_grace: DEFAULT_IDLE_GRACE,
        }
    }

    /// How long an idle HTTP/1.1 connection is kept once draining (see the module doc).
    pub fn idle_grace(mut self, grace: Duration) -> Drain {
        self.idle_grace = grace;
        self
    }

    fn draining(&self) -> bool {
        is_draining(*self.phases.borrow())
    }

    /// Returns once the server drains (or is gone).
    async fn started(&mut self) {
        let _ = self.phases.wait_for(|p| is_draining(*p)).await;
    }
}

fn is_draining(phase: Phase) -> bool {
    matches!(phase, Phase::Draining | Phase::Exited)
}

/// Serves one connection with hyper-util's connection `builder` (HTTP/1.1 with upgrades, or
/// HTTP/2), draining it as the module doc says; spawn the returned future. The stream's drain
/// guard is dropped when the connection (or the protocol it was upgraded to) ends.
///
/// ```no_run
/// # async fn accept() -> ringflip::Connection { unimplemented!() }
/// # async fn example(handle: ringflip::Handle) {
/// let builder = ringflip::http::ConnectionBuilder::new(hyper_util::rt::TokioExecutor::new());
/// let drain = ringflip::http::Drain::new(&handle);
/// let service = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
/// let conn = accept().await; // from Server::run_async's callback
/// let stream = conn.into_tokio().unwrap();
/// tokio::spawn(ringflip::http::serve_connection(&builder, stream, service, drain.clone()));
/// # }
/// ```
pub fn serve_connection<S, B>(
    builder: &ConnectionBuilder,
    stream: Guarded<TokioStream>,
    service: S,
    mut drain: Drain,
) -> impl Future<Output = Result<(), BoxError>> + Send + 'static
where
    S: tower_service::Service<Request<IncomingBody>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let http2 = Arc::new(AtomicBool::new(false));
    let service = ConnectionService {
        inner: service,
        drain: drain.clone(),
        http2: http2.clone(),
    };
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    async move {
        tokio::pin!(conn);
        tokio::select! {
            done = conn.as_mut() => return done,
            () = drain.started() => {}
        }
        // HTTP/2 (known from its first request): GOAWAY now. HTTP/1.1, or no request yet: the
        // responses say `Connection: close`; what is still open after the grace is idle.
        if !http2.load(Relaxed) {
            tokio::select! {
                done = conn.as_mut() => return done,
                () = tokio::time::sleep(drain.idle_grace) => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        conn.await
    }
}

/// Marks an HTTP/1.1 response as the connection's last (`Connection: close`), unless it hands
/// the connection over to another protocol: a `101 Switching Protocols` (a WebSocket
/// handshake) or a successful answer to `CONNECT` (a tunnel). Those must keep their
/// `Connection: upgrade` (RFC 6455 §4.1: a client fails a handshake without it); the
/// connection leaves HTTP there anyway, and its stream keeps its drain guard until the
/// upgraded protocol ends. hyper leaves a 101 alone for the same reason.
fn close_after<B>(response: &mut Response<B>, method: &Method) {
    let hands_over = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (method == Method::CONNECT && response.status().is_success());
    if !hands_over {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The application's service, with `Connection: close` on HTTP/1 responses once draining.
#[derive(Clone)]
struct ConnectionService<S> {
    inner: S,
    drain: Drain,
    /// Set at the connection's first HTTP/2 request.
    http2: Arc<AtomicBool>,
}

impl<S, B, R> hyper::service::Service<Request<R>> for ConnectionService<S>
where
    S: tower_service::Service<Request<R>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn call(&self, request: Request<R>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        if !http1 {
            self.http2.store(true, Relaxed);
        }
        let method = request.method().clone();
        let mut inner = self.inner.clone();
        let drain = self.drain.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = inner.call(request).await.map_err(Into::into)?;
            // Decided when the response is ready, so that a request that began before the
            // drain is told too.
            if http1 && drain.draining() {
                close_after(&mut response, &method);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use super::*;

    /// A service answering every request with `status` and `Connection: upgrade`.
    #[derive(Clone)]
    struct Answer(StatusCode);

    impl<R> tower_service::Service<Request<R>> for Answer {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<String>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<R>) -> Self::Future {
            let mut response = Response::new(String::new());
            *response.status_mut() = self.0;
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            std::future::ready(Ok(response))
        }
    }

    fn response(status: StatusCode) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        response
    }

    fn connection_after(status: StatusCode, method: Method) -> String {
        let mut r = response(status);
        close_after(&mut r, &method);
        r.headers()[CONNECTION].to_str().unwrap().to_string()
    }

    #[test]
    fn a_draining_response_closes_its_connection_unless_it_hands_it_over() {
        assert_eq!(connection_after(StatusCode::OK, Method::GET), "close");
        assert_eq!(
            connection_after(StatusCode::NOT_FOUND, Method::GET),
            "close"
        );
        // A WebSocket handshake, whatever the method.
        assert_eq!(
            connection_after(StatusCode::SWITCHING_PROTOCOLS, Method::GET),
            "upgrade"
        );
        // A tunnel opened, or refused.
        assert_eq!(connection_after(StatusCode::OK, Method::CONNECT), "upgrade");
        assert_eq!(
            connection_after(StatusCode::PROXY_AUTHENTICATION_REQUIRED, Method::CONNECT),
            "close"
        );
    }

    /// The service every connection of [`serve`] runs: a WebSocket handshake answered while
    /// draining keeps `Connection: upgrade` (it was replaced by `close`, and RFC 6455 clients
    /// failed the handshake), an ordinary response gets `close`.
    #[test]
    fn a_websocket_handshake_answered_while_draining_keeps_its_upgrade() {
        let (_phase, phases) = watch::channel(Phase::Draining);
        let drain = Drain {
            phases,
            idle_grace: DEFAULT_IDLE_GRACE,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (status, expected) in [
            (StatusCode::SWITCHING_PROTOCOLS, "upgrade"),
            (StatusCode::OK, "close"),
        ] {
            let service = ConnectionService {
                inner: Answer(status),
                drain: drain.clone(),
                http2: Arc::new(AtomicBool::new(false)),
            };
            let request = Request::builder().uri("/chat").body(()).unwrap();
            let response = runtime
                .block_on(hyper::service::Service::call(&service, request))
                .unwrap();
            assert_eq!(response.headers()[CONNECTION], expected, "{status}");
        }
    }
}
