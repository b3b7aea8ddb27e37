//! Thread-per-core with a runtime per ring: [`Server::run_workers_async`] and the [`Ring`] it
//! hands to each thread.

use std::sync::Arc;

use crate::connection::Connection;
use crate::error::Error;
use crate::machine::ExitReason;

use super::{Server, Worker};

/// One ring of a thread-per-core server ([`Builder::workers`]), as
/// [`Server::run_workers_async`] hands it to the thread that runs it.
///
/// [`Builder::workers`]: crate::Builder::workers
// Made once per thread and moved into its closure: its size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Ring {
    /// Ring 0, the coordinator: it also reads the signals, runs the upgrades and answers the
    /// control socket. Run on the thread that called `run_workers_async`.
    Coordinator(Server),
    /// Ring `i` (1..n), on a thread of its own.
    Worker(Worker),
}

impl Ring {
    /// 0 for the coordinator, `1..n` for a worker.
    pub fn index(&self) -> usize {
        match self {
            Ring::Coordinator(_) => 0,
            Ring::Worker(w) => w.index(),
        }
    }

    /// Serves this ring as a task of the current thread's runtime (see
    /// [`Server::run_async`]): each connection goes to `on_connection` on this thread, with no
    /// thread hop. The coordinator returns why it ended (`Some`); a worker returns `None` once
    /// its coordinator has finished.
    pub async fn run_async(
        self,
        on_connection: impl FnMut(Connection),
    ) -> Result<Option<ExitReason>, Error> {
        match self {
            Ring::Coordinator(server) => server.run_async(on_connection).await.map(Some),
            Ring::Worker(worker) => worker.run_async(on_connection).await.map(|()| None),
        }
    }
}

impl Server {
    /// Thread-per-core with a runtime per ring ([`Builder::workers`]): `start` runs once per
    /// ring, on a thread of its own for each worker and on this thread for the coordinator,
    /// and should start that thread's runtime (tokio-uring, or a current-thread tokio runtime
    /// on a `LocalSet`) with [`Ring::run_async`] as its main task. Returns the coordinator's
    /// outcome once every ring has finished; a worker's error or panic is logged.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), ringflip::Error> {
    /// # async fn serve(_conn: ringflip::Connection) {}
    /// let server = ringflip::Server::builder()
    ///     .listen_tcp("web", "0.0.0.0:8080".parse().unwrap())
    ///     .workers(2)
    ///     .build()?;
    /// server.run_workers_async(|ring| {
    ///     tokio::runtime::Builder::new_current_thread()
    ///         .enable_all()
    ///         .build()
    ///         .expect("a runtime")
    ///         .block_on(tokio::task::LocalSet::new().run_until(ring.run_async(|conn| {
    ///             tokio::task::spawn_local(serve(conn));
    ///         })))
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`Builder::workers`]: crate::Builder::workers
    pub fn run_workers_async<F>(mut self, start: F) -> Result<ExitReason, Error>
    where
        F: Fn(Ring) -> Result<Option<ExitReason>, Error> + Send + Sync + 'static,
    {
        let start = Arc::new(start);
        let mut threads = Vec::new();
        for worker in self.take_workers()? {
            let start = start.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringflip-worker-{}", worker.index()))
                .spawn(move || start(Ring::Worker(worker)))
                .map_err(Error::io("starting a worker thread"))?;
            threads.push(thread);
        }
        let result = start(Ring::Coordinator(self));
        for t in threads {
            match t.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "worker failed"),
                Err(_) => tracing::error!("worker panicked"),
            }
        }
        result?.ok_or_else(|| Error::Config("the coordinator's ring returned no exit".into()))
    }
}
