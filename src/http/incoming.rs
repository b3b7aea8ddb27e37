//! [`Incoming`]: ringflip's connections as an `axum::serve::Listener` (feature `axum`), with
//! the layer and the shutdown signal that make `axum::serve` drain as [`serve`] does.
//!
//! [`serve`]: super::serve

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::{Request, Response, Version};
use tokio::sync::mpsc;

use super::Drain;
use crate::connection::{Connection, Guarded};
use crate::error::Error;
use crate::handle::Handle;
use crate::machine::ExitReason;
use crate::server::Server;
use crate::stream::TokioStream;

/// The connections of a [`Server`] as an `axum::serve::Listener`: `axum::serve(incoming, app)`
/// on a multi-thread runtime, while the upgrade ring that accepts them runs on the thread that
/// calls `block_on` ([`Incoming::new`]).
///
/// `axum::serve` drains by its graceful shutdown alone, which closes every idle keep-alive
/// connection at once: a client that is just sending its next request on one sees it fail.
/// Give it the two parts of ringflip's drain (see the [module doc](super)):
/// [`Incoming::close_on_drain`], a layer that puts `Connection: close` on HTTP/1 responses
/// once draining, and [`Incoming::shutdown_signal`], which starts axum's graceful shutdown
/// (GOAWAY, idle connections closed) one idle grace later.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::{routing::get, Router};
///
/// let server = ringflip::Server::builder()
///     .listen_tcp("web", "127.0.0.1:8080".parse()?)
///     .build()?;
/// let (incoming, ring) = ringflip::http::Incoming::new(server);
/// let app = Router::new()
///     .route("/", get(|| async { "hello\n" }))
///     .layer(incoming.close_on_drain());
/// let shutdown = incoming.shutdown_signal();
/// tokio::runtime::Runtime::new()?.block_on(async move {
///     let serve = axum::serve(incoming, app).with_graceful_shutdown(shutdown);
///     tokio::spawn(async move { serve.await });
///     ring.await // replaced or stopped, and drained
/// })?;
/// # Ok(())
/// # }
/// ```
#[must_use = "connections wait in it until axum::serve takes them"]
#[derive(Debug)]
pub struct Incoming {
    connections: mpsc::UnboundedReceiver<Connection>,
    /// Handed over by the ring, not taken by `accept` yet.
    queued: Arc<AtomicUsize>,
    drain: Drain,
    handle: Handle,
}

impl Incoming {
    /// The connections `server` accepts, and the future that runs its upgrade ring: await it
    /// with the runtime's `block_on` (never `tokio::spawn` it: the ring stays on the thread
    /// that polls it); it returns once the process is replaced or stopped and every
    /// connection has drained.
    pub fn new(
        server: Server,
    ) -> (
        Incoming,
        impl Future<Output = Result<ExitReason, Error>> + 'static,
    ) {
        let (tx, connections) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let incoming = Incoming {
            connections,
            queued: queued.clone(),
            drain: Drain::new(&server.handle()),
            handle: server.handle(),
        };
        let ring = server.run_async(move |conn| {
            queued.fetch_add(1, SeqCst);
            if tx.send(conn).is_err() {
                // axum::serve is gone: the connection is dropped (closed).
                queued.fetch_sub(1, SeqCst);
            }
        });
        (incoming, ring)
    }

    /// How long an idle HTTP/1.1 connection is kept once draining (default
    /// [`DEFAULT_IDLE_GRACE`](super::DEFAULT_IDLE_GRACE)); set it before taking the layer and
    /// the signal.
    pub fn idle_grace(mut self, grace: Duration) -> Incoming {
        self.drain = self.drain.idle_grace(grace);
        self
    }

    /// The layer that puts `Connection: close` on HTTP/1 responses once the process drains:
    /// `router.layer(incoming.close_on_drain())`.
    pub fn close_on_drain(&self) -> CloseOnDrainLayer {
        CloseOnDrainLayer {
            drain: self.drain.clone(),
        }
    }

    /// For `with_graceful_shutdown`: completes one idle grace after a drain began, once that
    /// drain is committed, every accept of the ring has stopped and every connection it handed
    /// over has been taken by `accept`.
    ///
    /// axum's graceful shutdown is one-shot: once it has begun, `axum::serve` takes no more
    /// connections. So the signal first commits the drain: from then on this process never
    /// takes the service back, even if its successor dies (a rollback after handover is
    /// possible only during the idle grace; `ringflip::http::serve` can roll back throughout
    /// its drain). A drain that resumed before the commit (its successor died within the
    /// grace) is not committed, and the signal waits for the next drain. The commit is
    /// answered once every accept has stopped: no connection comes after it.
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut drain = self.drain.clone();
        let queued = self.queued.clone();
        let handle = self.handle.clone();
        async move {
            loop {
                drain.started().await;
                // Read once the phase says Draining: this drain's number or a later one's,
                // which began before this read, so the grace is counted from after each.
                let seq = handle.drain_seq();
                tokio::time::sleep(drain.idle_grace).await;
                if handle.commit_drain(seq).await {
                    break;
                }
            }
            // Handed over before the accepts stopped, not taken yet: `accept` takes them
            // promptly (axum::serve calls it in a loop until this signal completes).
            while queued.load(SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Guarded<TokioStream>;
    /// The peer's address; `None` for a Unix peer.
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(conn) = self.connections.recv().await else {
                // The ring has returned: it hands over nothing more.
                return std::future::pending().await;
            };
            self.queued.fetch_sub(1, SeqCst);
            match conn.into_tokio() {
                Ok(stream) => {
                    let peer = stream.peer_addr();
                    return (stream, peer);
                }
                Err(e) => tracing::warn!(error = %e, "registering a connection with the runtime"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(None)
    }
}

/// See [`Incoming::close_on_drain`].
#[derive(Clone, Debug)]
pub struct CloseOnDrainLayer {
    drain: Drain,
}

impl<S> tower_layer::Layer<S> for CloseOnDrainLayer {
    type Service = CloseOnDrain<S>;

    fn layer(&self, inner: S) -> CloseOnDrain<S> {
        CloseOnDrain {
            inner,
            drain: self.drain.clone(),
        }
    }
}

/// The service of [`CloseOnDrainLayer`].
#[derive(Clone, Debug)]
pub struct CloseOnDrain<S> {
    inner: S,
    drain: Drain,
}

impl<S, B, RB> tower_service::Service<Request<B>> for CloseOnDrain<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        let method = request.method().clone();
        let drain = self.drain.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if http1 && drain.draining() {
                super::close_after(&mut response, &method);
            }
            Ok(response)
        })
    }
}
