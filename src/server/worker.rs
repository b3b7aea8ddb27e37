//! Thread-per-core serving: [`Server::take_workers`] splits a server into a coordinator and
//! [`Worker`]s, one ring each on its own SO_REUSEPORT members of the TCP listeners.

use std::fmt;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::connection::Connection;
#[cfg(feature = "tokio")]
use crate::driver::runtime::serve_async;
use crate::driver::{Driver, Waiting, WorkerMember};
use crate::error::Error;
use crate::listener::{self, Listener, Listening};
use crate::machine::ExitReason;
use crate::shared::{Config, RingThreads};
use crate::sys;
use crate::workers::{Coordinator, WorkerGone, WorkerSet};

use super::Server;

impl Server {
    /// Thread-per-core ([`Builder::workers`]): splits off the `n - 1` worker rings, to be run
    /// each on a thread of its own with [`Worker::run`] or, inside that thread's runtime,
    /// [`Worker::run_async`]; this server stays the coordinator (signals, upgrades, the control
    /// socket; it accepts like the others) and is run as usual, with [`Server::run`] or
    /// `run_async`. Worker `i` has its own ring on its own SO_REUSEPORT member of every TCP
    /// listener. On READY (or shutdown) every worker stops accepting and the process drains
    /// as one; the workers' `run` returns once the coordinator has finished (or failed, or was
    /// dropped without running). Run every worker: one that is dropped unrun, fails or panics
    /// no longer holds up its coordinator, but the connections the kernel queues on its
    /// SO_REUSEPORT members wait there for the next process (logged as an error). Empty
    /// without `workers(n)`; an error if called twice.
    pub fn take_workers(&mut self) -> Result<Vec<Worker>, Error> {
        let n = self.parts.config.workers.max(1);
        if n == 1 {
            return Ok(Vec::new());
        }
        if self.workers.is_some() {
            return Err(Error::Config("the workers were already taken".into()));
        }
        // Everything that can fail comes first, so that a failure leaves this server as it was.
        let set = Arc::new(WorkerSet::new(n - 1, self.parts.parent.is_some())?);
        let mut per_worker: Vec<Vec<Listener>> = (0..n).map(|_| Vec::new()).collect();
        let mut mine = Vec::new();
        for l in std::mem::take(&mut self.parts.listeners) {
            match listener::worker_of(&l.name, n) {
                0 => mine.push(l),
                i => per_worker[i].push(l),
            }
        }
        // The coordinator hands every listener over at an upgrade, the workers' included: it
        // keeps a duplicate of each (the same socket; a member left out would be closed with
        // its queue when this process exits).
        let dups = per_worker
            .iter()
            .flatten()
            .map(|l| {
                sys::dup_cloexec_at_least(l.fd.as_fd(), 3)
                    .map(|fd| WorkerMember {
                        record: l.record(),
                        fd,
                        listening: Listening::new(l.listens),
                    })
                    .map_err(Error::io("duplicating a worker's listener"))
            })
            .collect::<Result<Vec<_>, _>>();
        let dups = match dups {
            Ok(dups) => dups,
            Err(e) => {
                mine.extend(per_worker.into_iter().flatten());
                self.parts.listeners = mine;
                return Err(e);
            }
        };
        self.parts.listeners = mine;
        self.parts.worker_listeners.extend(dups);
        self.workers = Some(Coordinator(set.clone()));
        Ok(per_worker
            .into_iter()
            .enumerate()
            .skip(1)
            .map(|(index, listeners)| Worker {
                listeners,
                config: self.parts.config.clone(),
                gone: WorkerGone {
                    index,
                    set: set.clone(),
                    shared: self.parts.shared.clone(),
                },
            })
            .collect())
    }

    /// Serves on [`Builder::workers`] threads (thread-per-core), each connection handed to a
    /// callback on the thread that accepted it: [`Server::take_workers`], a thread per
    /// worker `i` running `handler(i)`'s callback with [`Worker::run`], and this thread the
    /// coordinator with `handler(0)`'s. Returns once every worker has finished.
    pub fn run_workers<F, H>(mut self, handler: F) -> Result<ExitReason, Error>
    where
        F: Fn(usize) -> H + Send + Sync + 'static,
        H: FnMut(Connection) + 'static,
    {
        let handler = Arc::new(handler);
        let mut threads = Vec::new();
        for worker in self.take_workers()? {
            let handler = handler.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringflip-worker-{}", worker.index()))
                .spawn(move || {
                    let sink = handler(worker.index());
                    worker.run(sink)
                })
                .map_err(Error::io("starting a worker thread"))?;
            threads.push(thread);
        }
        let result = self.run(handler(0));
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "worker failed"),
                Err(_) => tracing::error!("worker panicked"),
            }
        }
        result
    }
}

/// One ring of a thread-per-core server besides the coordinator's, split off by
/// [`Server::take_workers`]. Run it on a thread of its own: [`Worker::run`], or
/// [`Worker::run_async`] as a task of that thread's runtime (one runtime per core, each
/// serving the connections its own ring accepts, with no thread hop).
pub struct Worker {
    pub(crate) listeners: Vec<Listener>,
    pub(crate) config: Config,
    /// Also this worker's index, its coordinator's worker set and the process's shared state.
    pub(crate) gone: WorkerGone,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.gone.index)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// This worker's number, 1 to `n - 1` (the coordinator is 0).
    pub fn index(&self) -> usize {
        self.gone.index
    }

    /// This worker's driver, made on the calling thread (its ring's one issuer); prepared, not
    /// started (see `Driver::start`).
    pub(crate) fn into_driver(self, waiting: Waiting) -> Result<Driver, Error> {
        let Worker {
            listeners,
            config,
            gone,
        } = self;
        Driver::prepare_worker(listeners, config, gone, waiting)
    }

    /// Accepts on the calling thread, each connection to `on_connection` (which should hand
    /// it off quickly), until the coordinator has finished.
    pub fn run(self, mut on_connection: impl FnMut(Connection)) -> Result<(), Error> {
        let _on_ring = RingThreads::enter(&self.gone.shared);
        let mut driver = self.into_driver(Waiting::InRing)?;
        driver.start()?;
        while driver.turn(true, &mut on_connection)?.is_none() {}
        Ok(())
    }

    /// Like [`Worker::run`], as a task of the current thread's tokio (or tokio-uring) runtime,
    /// as [`Server::run_async`] does.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn run_async(self, on_connection: impl FnMut(Connection)) -> Result<(), Error> {
        let _on_ring = RingThreads::enter(&self.gone.shared);
        serve_async(self.into_driver(Waiting::InRuntime)?, on_connection)
            .await
            .map(drop)
    }
}
