//! The public face: [`Builder`], [`Server`], [`Handle`], [`Connection`].

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::SigSet;

use crate::driver::{Driver, Waiting};
use crate::handoff::SocketKind;
use crate::handoff::MAX_LISTENERS;
use crate::inherit::{self, ParentLink};
use crate::listener::{self, Endpoint, ListenSpec, Listener, UdpSocketEntry};
use crate::machine::{ExitReason, Phase, Timeouts};
use crate::workers::WorkerSet;
use crate::{control, signals, sys, systemd, Error, UpgradeError};

/// Configures and starts a [`Server`].
#[derive(Debug, Clone)]
pub struct Builder {
    listeners: Vec<ListenSpec>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    pid_file: Option<PathBuf>,
    binary: Option<PathBuf>,
    max_draining: u32,
    control: Option<PathBuf>,
    udp: Vec<(String, SocketAddr)>,
    workers: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            listeners: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
            pid_file: None,
            binary: None,
            max_draining: 4,
            control: None,
            udp: Vec::new(),
            workers: 1,
        }
    }
}

impl Builder {
    /// A TCP listener (IPv4 or IPv6) named `name` on `addr`. After an upgrade the socket with
    /// this name is inherited from the previous process; it is an error if it was not handed
    /// over, never a silent fresh bind.
    pub fn listen_tcp(self, name: impl Into<String>, addr: SocketAddr) -> Self {
        self.listen(name, Endpoint::Tcp(addr), None)
    }

    /// A Unix stream listener named `name` at `path` (a stale socket file left by a dead
    /// process is replaced; the file gets mode `mode` if given, e.g. `0o600`).
    pub fn listen_unix(
        self,
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        mode: Option<u32>,
    ) -> Self {
        self.listen(name, Endpoint::Unix(path.into()), mode)
    }

    /// A Unix stream listener named `name` in the abstract namespace (`abstract_name` without
    /// the leading NUL).
    pub fn listen_unix_abstract(
        self,
        name: impl Into<String>,
        abstract_name: impl Into<Vec<u8>>,
    ) -> Self {
        self.listen(name, Endpoint::UnixAbstract(abstract_name.into()), None)
    }

    fn listen(mut self, name: impl Into<String>, endpoint: Endpoint, mode: Option<u32>) -> Self {
        self.listeners.push(ListenSpec {
            name: name.into(),
            endpoint,
            mode,
            reuseport: false,
        });
        self
    }

    /// How long a new process has, from the upgrade request (starting the binary included) to
    /// READY, before the upgrade is rolled back (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long a replaced (or stopping) process waits for its live connections to finish
    /// before it exits anyway (default 60 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How many generations may be draining at once (default 4). Upgrades do not wait for the
    /// previous process to exit: an upgrade is refused as busy only while this many older
    /// generations still drain (1: only upgrade once every older generation has exited, as
    /// tableflip does). Must be at least 1.
    pub fn max_draining_generations(mut self, max: u32) -> Self {
        self.max_draining = max;
        self
    }

    /// A UDP socket named `name` on `addr`: bound on first start, handed over at each upgrade
    /// (never re-bound), never accepted on. Get it with [`Server::udp_socket`]. While the old
    /// process drains, both processes may read it; the old one should stop reading once its
    /// phase is [`Phase::Draining`] (see [`Handle::watch_phase`]), and answer what it has read
    /// before it exits: a datagram read by a thread the exit kills is lost (the echo example
    /// stops and joins its UDP thread after [`Server::run`] returns).
    pub fn bind_udp(mut self, name: impl Into<String>, addr: SocketAddr) -> Self {
        self.udp.push((name.into(), addr));
        self
    }

    /// Accept on `n` threads (thread-per-core), each with its own ring; run with
    /// [`Server::take_workers`] (a runtime per ring) or [`Server::run_workers`]. Each TCP
    /// listener becomes a group of `n` SO_REUSEPORT sockets, one per worker, handed over by
    /// index across upgrades (a binary with fewer workers keeps accepting on the extra ones,
    /// one with more adds members to the group). Unix listeners and the control socket are
    /// served by worker 0. On READY every worker stops accepting and
    /// the process drains as one.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// A control socket at `path` (Unix stream, mode 0600, handed over across upgrades like
    /// the listeners): `upgrade` answers `ok <new pid>` or `failed: <reason>` once the outcome
    /// is known, `status` answers the phase, pid, generation and live connections. Only peers
    /// with this process's uid are served (`SO_PEERCRED`).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }

    /// Write this process's pid to `path` once it serves, before its READY, atomically: a
    /// new file in the same directory swapped in with `renameat2(RENAME_EXCHANGE)` (a plain
    /// rename where that is refused), the old one then unlinked off the serving path. A reader
    /// always finds a whole pid, and never one of a process that has exited after an upgrade.
    /// A process killed at that moment can leave one `PATH.<pid>.<n>.tmp` behind.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The binary an upgrade starts (default: the path this process was started from, read
    /// again at each upgrade, so a binary replaced on disk is what starts).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Sets the process up: blocks SIGHUP, SIGTERM and SIGINT in the calling thread (they are
    /// read from a signalfd; threads started later inherit the mask; one started earlier that
    /// is handed one of them forwards it to the server's thread instead of dying of it), then
    /// either receives the listeners from the previous process (when started as a successor)
    /// or binds them.
    ///
    /// For a successor, any error here means the upgrade fails: the caller should exit
    /// non-zero, and the previous process keeps serving.
    pub fn build(self) -> Result<Server, Error> {
        if self.listeners.is_empty() {
            return Err(Error::Config("no listener configured".into()));
        }
        if self.listeners.len() > MAX_LISTENERS {
            return Err(Error::Config(format!(
                "more than {MAX_LISTENERS} listeners"
            )));
        }
        if self.max_draining == 0 {
            return Err(Error::Config(
                "max_draining_generations must be at least 1".into(),
            ));
        }
        let mut names = HashSet::new();
        for l in &self.listeners {
            if l.name.contains('#') {
                return Err(Error::Config(format!(
                    "listener name {:?}: '#' is reserved for per-worker sockets",
                    l.name
                )));
            }
            if l.name.starts_with("ringflip.") {
                return Err(Error::Config(format!(
                    "listener name {:?}: names starting with \"ringflip.\" are reserved",
                    l.name
                )));
            }
            if !names.insert(l.name.as_str()) {
                return Err(Error::Config(format!(
                    "listener name {:?} used twice",
                    l.name
                )));
            }
        }
        for (name, _) in &self.udp {
            if name.starts_with("ringflip.") || !names.insert(name.as_str()) {
                return Err(Error::Config(format!(
                    "UDP socket name {name:?} is reserved or used twice"
                )));
            }
        }
        if self.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        // With several workers, each TCP listener is a group of SO_REUSEPORT sockets, one per
        // worker, so the kernel spreads connections over them (several acceptors on one socket
        // do not share: the first armed takes everything).
        let mut specs = Vec::new();
        for spec in &self.listeners {
            if self.workers > 1 && matches!(spec.endpoint, Endpoint::Tcp(_)) {
                for i in 0..self.workers {
                    specs.push(ListenSpec {
                        name: listener::member_name(&spec.name, i),
                        reuseport: true,
                        ..spec.clone()
                    });
                }
            } else {
                specs.push(spec.clone());
            }
        }
        if let Some(path) = &self.control {
            specs.push(ListenSpec {
                name: control::CONTROL_LISTENER.into(),
                endpoint: Endpoint::Unix(path.clone()),
                mode: Some(0o600),
                reuseport: false,
            });
        }
        let signals = signals::handled();
        signals
            .thread_block()
            .map_err(|e| Error::io("blocking signals")(e.into()))?;
        // Threads started before this one blocked them may be handed them: forwarded here.
        signals::install(&signals).map_err(Error::io("installing the signal forwarding"))?;
        let signal_reader = signals::Reader::claim();

        let exe = match &self.binary {
            Some(path) => path.clone(),
            None => std::env::current_exe().map_err(Error::io("finding this binary"))?,
        };
        let args: Vec<OsString> = std::env::args_os().collect();

        let mut inherited_state = None;
        let mut elders = Vec::new();
        let mut generation = 0;
        let mut udp = Vec::new();
        let mut inherited_fds = Vec::new();
        let (listeners, parent) = match inherit::from_environment()? {
            Some(inherited) => {
                inherited_state = Some(Bytes::from(inherited.state));
                elders = inherited.elders;
                generation = inherited.generation;
                let upgrade = inherited.link.upgrade;
                tracing::info!(
                    upgrade.id = %upgrade,
                    parent = inherited.link.parent_pid,
                    "started as a successor; adopting listeners"
                );
                let mut by_name: Vec<_> = inherited.listeners.into_iter().map(Some).collect();
                let mut listeners = Vec::with_capacity(specs.len());
                for spec in &specs {
                    let slot = by_name
                        .iter_mut()
                        .find(|l| l.as_ref().is_some_and(|(r, _)| r.name == spec.name));
                    match slot {
                        Some(slot) => {
                            let (record, fd) = slot.take().expect("matched above");
                            listeners.push(Listener::adopt(spec, &record, fd)?);
                        }
                        // A new member of a per-worker group (this binary runs more workers
                        // than the previous one): it joins the inherited group, but listens
                        // only once the previous process has let go (`listen_deferred` in the
                        // driver): should this process fail before that, the kernel must not
                        // have queued connections on a member that dies with it.
                        None if spec.reuseport && spec.name.contains('#') => {
                            listeners.push(bind_member(spec, &listeners, false)?);
                        }
                        None => {
                            return Err(Error::MissingListener {
                                name: spec.name.clone(),
                            })
                        }
                    }
                }
                // Members of a per-worker group beyond this binary's worker count: keep
                // accepting on them (closing one would reset the connections in its queue).
                for slot in by_name.iter_mut() {
                    let extra = slot.as_ref().and_then(|(r, _)| {
                        let (base, _) = r.name.rsplit_once('#')?;
                        specs
                            .iter()
                            .find(|s| s.name == base && matches!(s.endpoint, Endpoint::Tcp(_)))
                    });
                    if let Some(base) = extra {
                        let (record, fd) = slot.take().expect("matched above");
                        let spec = ListenSpec {
                            name: record.name.clone(),
                            ..base.clone()
                        };
                        listeners.push(Listener::adopt(&spec, &record, fd)?);
                    }
                }
                for (name, addr) in &self.udp {
                    let slot = by_name
                        .iter_mut()
                        .find(|l| {
                            l.as_ref()
                                .is_some_and(|(r, _)| &r.name == name && r.kind == SocketKind::Udp)
                        })
                        .ok_or_else(|| Error::MissingListener { name: name.clone() })?;
                    let (record, fd) = slot.take().expect("matched above");
                    udp.push(UdpSocketEntry::adopt(name, *addr, &record, fd)?);
                }
                for (record, fd) in by_name.into_iter().flatten() {
                    if record.kind == SocketKind::Raw {
                        inherited_fds.push((record.name, fd));
                        continue;
                    }
                    tracing::warn!(
                        listener = %record.name,
                        address = %record.address,
                        "the previous process handed over a socket this binary does not use; closing it"
                    );
                }
                (listeners, Some(inherited.link))
            }
            None => {
                // First boot: sockets from systemd socket activation (by LISTEN_FDNAMES name,
                // else by address), the rest bound here.
                let mut activated = systemd::take_listen_fds()?;
                let mut listeners = Vec::with_capacity(specs.len());
                for spec in &specs {
                    let found = activated
                        .iter()
                        .position(|a| a.name.as_deref() == Some(spec.name.as_str()))
                        .or_else(|| {
                            activated.iter().position(|a| {
                                a.name.is_none() && Listener::fits(spec, a.fd.as_fd())
                            })
                        });
                    listeners.push(match found {
                        Some(i) => {
                            let listener = Listener::adopt_activated(spec, activated.remove(i).fd)?;
                            tracing::info!(listener = %spec.name, address = %listener.endpoint, "adopted the socket from systemd");
                            listener
                        }
                        None => bind_member(spec, &listeners, true)?,
                    });
                }
                for (name, addr) in &self.udp {
                    udp.push(UdpSocketEntry::bind(name, *addr)?);
                }
                for a in activated {
                    tracing::warn!(name = ?a.name, "systemd passed a socket no listener asks for; closing it");
                }
                (listeners, None)
            }
        };
        let wake = sys::eventfd().map_err(Error::io("eventfd"))?;
        let shared = Arc::new(Shared {
            wake,
            live: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            accept_paused: AtomicBool::new(false),
            phase: PhaseCell::new(),
            requests: Mutex::new(Some(Vec::new())),
            handoff_state: Mutex::new(Bytes::new()),
            handoff_fds: Mutex::new(Vec::new()),
            generation,
        });
        Ok(Server {
            listeners,
            parent,
            requests_open: RequestsOpen(shared.clone()),
            signal_reader,
            shared,
            inherited_state,
            elders,
            udp,
            inherited_fds,
            worker_listeners: Vec::new(),
            workers: None,
            config: Config {
                timeouts: Timeouts {
                    ready: self.ready_timeout,
                    drain: self.drain_timeout,
                },
                pid_file: self.pid_file,
                max_draining: self.max_draining,
                workers: self.workers,
                exe,
                args,
                signals,
                notify_socket: systemd::notify_target(),
            },
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub timeouts: Timeouts,
    pub max_draining: u32,
    pub workers: usize,
    pub pid_file: Option<PathBuf>,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub signals: SigSet,
    /// Where systemd notifications go (`NOTIFY_SOCKET` at `build`), if anywhere.
    pub notify_socket: Option<OsString>,
}

/// A process that serves its listeners and can hand them to a new binary.
///
/// Made by [`Builder::build`]; driven by [`Server::run`] (or `run_async`). See the crate docs
/// for the lifecycle.
pub struct Server {
    pub(crate) listeners: Vec<Listener>,
    pub(crate) parent: Option<ParentLink>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Config,
    inherited_state: Option<Bytes>,
    pub(crate) elders: Vec<OwnedFd>,
    pub(crate) udp: Vec<UdpSocketEntry>,
    inherited_fds: Vec<(String, OwnedFd)>,
    /// Thread-per-core: the workers' listeners (duplicates), for the handoff.
    pub(crate) worker_listeners: Vec<(crate::handoff::ListenerRecord, OwnedFd)>,
    /// Thread-per-core, once [`Server::take_workers`] has split the workers off: what this
    /// (coordinating) server shares with them. Dropped unrun, it tells them to quit.
    workers: Option<Coordinator>,
    /// Requests are taken while this lives: in the server, then in its driver.
    pub(crate) requests_open: RequestsOpen,
    /// Signals delivered to other threads are forwarded to the one that called `build` (see
    /// `signals.rs`) until the driver claims them for its own thread.
    pub(crate) signal_reader: signals::Reader,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("successor_of", &self.parent.as_ref().map(|p| p.parent_pid))
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts configuring a server.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle to trigger upgrades and shutdown from any thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// The local address of the TCP listener named `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        match self.listeners.iter().find(|l| &*l.name == name)?.endpoint {
            Endpoint::Tcp(addr) => Some(addr),
            _ => None,
        }
    }

    /// The pid of the process this one took over from, if it was started by an upgrade.
    pub fn predecessor(&self) -> Option<u32> {
        self.parent.as_ref().map(|p| p.parent_pid)
    }

    /// A clone of the UDP socket named `name` (see [`Builder::bind_udp`]).
    pub fn udp_socket(&self, name: &str) -> Option<std::io::Result<std::net::UdpSocket>> {
        self.udp
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.socket.try_clone())
    }

    /// Takes the fds the previous process handed over with [`Handle::set_handoff_fds`], by
    /// name (empty on a first start). They are close-on-exec.
    pub fn take_inherited_fds(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.inherited_fds)
    }

    /// The state blob the previous process set with [`Handle::set_handoff_state`] (empty if it
    /// set none); `None` on a first start. Read it before [`Server::run`]: the previous process
    /// keeps serving until this one runs.
    pub fn inherited_state(&self) -> Option<&Bytes> {
        self.inherited_state.as_ref()
    }

    /// Serves until this process is replaced or stopped, on the calling thread (the thread
    /// that called [`Builder::build`] or any other). Each accepted connection goes to
    /// `on_connection`, which should hand it off quickly (to a thread, a pool, a queue).
    ///
    /// Returns once the process has finished draining; the caller should then exit.
    pub fn run(self, mut on_connection: impl FnMut(Connection)) -> Result<ExitReason, Error> {
        let mut driver = self.into_driver("run", Waiting::InRing)?;
        driver.start()?;
        loop {
            if let Some(exit) = driver.turn(true, &mut on_connection)? {
                return Ok(exit);
            }
        }
    }

    /// The driver of this server's own ring, made on the calling thread (its ring's one
    /// issuer), leading the workers if [`Server::take_workers`] split them off; prepared, not
    /// started (see `Driver::start`).
    pub(crate) fn into_driver(mut self, what: &str, waiting: Waiting) -> Result<Driver, Error> {
        if self.config.workers > 1 && self.workers.is_none() {
            return Err(Error::Config(format!(
                "{what} serves one ring; with workers({}) call take_workers first, or use \
                 run_workers",
                self.config.workers
            )));
        }
        let workers = self.workers.take();
        // On an error here `workers` is dropped, which tells the workers to quit.
        let driver = Driver::prepare(self, waiting)?;
        Ok(match workers {
            Some(coordinator) => driver.with_workers(coordinator),
            None => driver,
        })
    }

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
        let n = self.config.workers.max(1);
        if n == 1 {
            return Ok(Vec::new());
        }
        if self.workers.is_some() {
            return Err(Error::Config("the workers were already taken".into()));
        }
        // Everything that can fail comes first, so that a failure leaves this server as it was.
        let set = Arc::new(WorkerSet::new(n - 1, self.parent.is_some())?);
        let mut per_worker: Vec<Vec<Listener>> = (0..n).map(|_| Vec::new()).collect();
        let mut mine = Vec::new();
        for l in std::mem::take(&mut self.listeners) {
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
                    .map(|fd| (l.record(), fd))
                    .map_err(Error::io("duplicating a worker's listener"))
            })
            .collect::<Result<Vec<_>, _>>();
        let dups = match dups {
            Ok(dups) => dups,
            Err(e) => {
                mine.extend(per_worker.into_iter().flatten());
                self.listeners = mine;
                return Err(e);
            }
        };
        self.listeners = mine;
        self.worker_listeners.extend(dups);
        self.workers = Some(Coordinator(set.clone()));
        Ok(per_worker
            .into_iter()
            .enumerate()
            .skip(1)
            .map(|(index, listeners)| Worker {
                listeners,
                config: self.config.clone(),
                gone: WorkerGone {
                    index,
                    set: set.clone(),
                    shared: self.shared.clone(),
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

    /// Serves as a task of the current tokio runtime (a tokio-uring runtime is one): the
    /// runtime's reactor polls one fd of the driver's (an epoll of the fds its ring waits on;
    /// see `docs/WAKEUPS.md`), and each accepted connection goes to
    /// `on_connection` on this same thread, with no thread hop. Must be awaited on one thread
    /// (a `LocalSet`, a current-thread runtime, or tokio-uring).
    #[cfg(feature = "tokio")]
    pub async fn run_async(
        self,
        on_connection: impl FnMut(Connection),
    ) -> Result<ExitReason, Error> {
        serve_async(
            self.into_driver("run_async", Waiting::InRuntime)?,
            on_connection,
        )
        .await
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

    /// Accepts on the calling thread, each connection to `on_connection` (which should hand
    /// it off quickly), until the coordinator has finished.
    pub fn run(self, mut on_connection: impl FnMut(Connection)) -> Result<(), Error> {
        let mut driver = Driver::prepare_worker(self, Waiting::InRing)?;
        driver.start()?;
        while driver.turn(true, &mut on_connection)?.is_none() {}
        Ok(())
    }

    /// Like [`Worker::run`], as a task of the current thread's tokio (or tokio-uring) runtime,
    /// as [`Server::run_async`] does.
    #[cfg(feature = "tokio")]
    pub async fn run_async(self, on_connection: impl FnMut(Connection)) -> Result<(), Error> {
        serve_async(
            Driver::prepare_worker(self, Waiting::InRuntime)?,
            on_connection,
        )
        .await
        .map(drop)
    }
}

/// Tells the workers to quit when dropped: held by the coordinator (its server, then its
/// driver), so that workers never outlive a coordinator that failed or was never run.
#[derive(Debug)]
pub(crate) struct Coordinator(pub Arc<WorkerSet>);

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.0.quit.store(true, SeqCst);
        self.0.signal_all();
    }
}

/// Marks worker `index` stopped for good when dropped: held by a [`Worker`], then by its driver,
/// so that a worker that was never run, failed or panicked does not keep its coordinator
/// waiting, at every READY and at shutdown, for a stop that would never be reported (the drain
/// would then last its whole deadline).
#[derive(Debug)]
pub(crate) struct WorkerGone {
    pub index: usize,
    pub set: Arc<WorkerSet>,
    pub shared: Arc<Shared>,
}

impl Drop for WorkerGone {
    fn drop(&mut self) {
        if !self.set.quit.load(SeqCst) {
            tracing::error!(
                worker = self.index,
                "worker gone while its coordinator serves: the connections queued on its \
                 listeners wait for the next process"
            );
        }
        self.set.gone(self.index);
        self.shared.wake();
    }
}

/// Starts `driver` (prepared) and drives it as a task of the current tokio runtime until it
/// exits: see
/// [`Server::run_async`]. The runtime's reactor watches one fd, the driver's wake set (an epoll
/// instance holding the fds the ring waits on; `wake_set.rs` says why not the ring's eventfd).
#[cfg(feature = "tokio")]
#[allow(unsafe_code)]
async fn serve_async(
    mut driver: Driver,
    mut on_connection: impl FnMut(Connection),
) -> Result<ExitReason, Error> {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    let fd = driver
        .readiness_fd()
        .expect("a driver made with Waiting::InRuntime has a wake set");
    // SAFETY: the wake set's fd stays open while registered: `driver` owns it and, a
    // parameter, is dropped after this local.
    let wake_set = unsafe { AsyncFd::register_with_interest(NotifyFd(fd), Interest::READABLE) }
        .map_err(|e| Error::io("registering with the runtime")(e.into()))?;
    // Only now, with every fallible step behind it: the first accept takes connections.
    driver.start()?;
    loop {
        if let Some(exit) = driver.turn(false, &mut on_connection)? {
            return Ok(exit);
        }
        if driver.has_pending_work() {
            // More deferred completions than one turn runs (or completions posted by this
            // turn's submit): go again, but let the runtime's other tasks (the connections just
            // handed over) run first.
            tokio::task::yield_now().await;
            continue;
        }
        // The next turn drains the wake set first, so a readiness that comes after this
        // clear is a new edge and wakes the runtime again.
        wake_set
            .readable()
            .await
            .map_err(Error::io("polling the wake set"))?
            .clear_ready();
    }
}

#[cfg(feature = "tokio")]
struct NotifyFd(RawFd);

#[cfg(feature = "tokio")]
impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// State shared between the driver, its [`Handle`]s and the live connections' guards.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Wakes the driver: requests queued, the last connection closed, fds freed.
    pub wake: OwnedFd,
    pub live: AtomicUsize,
    pub draining: AtomicBool,
    pub accept_paused: AtomicBool,
    pub phase: PhaseCell,
    /// Requests for the driver; `None` once no driver will take them (see [`RequestsOpen`]).
    pub requests: Mutex<Option<Vec<Request>>>,
    /// What the next HELLO carries as the application's state.
    pub handoff_state: Mutex<Bytes>,
    /// 0 for a process started by hand, its parent's plus one after an upgrade.
    pub generation: u32,
    /// Named fds the next HELLO hands over as they are.
    pub handoff_fds: Mutex<Vec<(String, OwnedFd)>>,
}

impl Shared {
    pub(crate) fn wake(&self) {
        sys::eventfd_signal(self.wake.as_fd());
    }

    /// Queues `request` for the driver, or drops it (and with it its reply channel, whose
    /// receiver then reads `NotRunning`) when no driver will take it.
    fn request(&self, request: Request) {
        if let Some(queue) = &mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()) {
            queue.push(request);
        }
        self.wake();
    }

    /// The requests queued so far, taken (none once closed).
    pub(crate) fn take_requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// While this lives, a driver will take the requests of [`Handle`]s: held by the [`Server`],
/// then by its driver. Dropped (the server dropped unrun, the driver gone however it ended), it
/// closes the queue: the requests in it and every later one are dropped, and their callers get
/// `NotRunning` at once instead of waiting for an answer that will never come.
#[derive(Debug)]
pub(crate) struct RequestsOpen(Arc<Shared>);

impl Drop for RequestsOpen {
    fn drop(&mut self) {
        let pending = self
            .0
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(pending); // outside the lock: dropping a reply sender wakes its caller
    }
}

#[derive(Debug)]
pub(crate) enum Request {
    Upgrade(mpsc::Sender<Result<u32, UpgradeError>>),
    Shutdown,
}

/// The phase and a change counter, with a condvar for blocking watchers and a tokio watch
/// channel for async ones.
#[derive(Debug)]
pub(crate) struct PhaseCell {
    state: Mutex<(Phase, u64)>,
    changed: Condvar,
    #[cfg(feature = "tokio")]
    sender: tokio::sync::watch::Sender<Phase>,
}

impl PhaseCell {
    fn new() -> PhaseCell {
        PhaseCell {
            state: Mutex::new((Phase::Serving, 0)),
            changed: Condvar::new(),
            #[cfg(feature = "tokio")]
            sender: tokio::sync::watch::Sender::new(Phase::Serving),
        }
    }

    fn get(&self) -> (Phase, u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, phase: Phase) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = (phase, state.1 + 1);
        drop(state);
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.sender.send_replace(phase);
    }
}

/// Waits for phase changes of a [`Server`]; made by [`Handle::watch_phase`]. Like a watch
/// channel, it sees the latest phase, not necessarily every phase in between.
#[derive(Debug)]
pub struct PhaseWatch {
    shared: Arc<Shared>,
    seen: u64,
}

impl PhaseWatch {
    /// The current phase.
    pub fn current(&self) -> Phase {
        self.shared.phase.get().0
    }

    /// Waits until the phase changed since this watch last looked, for at most `timeout`;
    /// returns the phase now, or `None` if nothing changed in time.
    pub fn changed(&mut self, timeout: Duration) -> Option<Phase> {
        let cell = &self.shared.phase;
        let guard = cell.state.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cell
            .changed
            .wait_timeout_while(guard, timeout, |(_, seq)| *seq == self.seen)
            .unwrap_or_else(|e| e.into_inner());
        if guard.1 == self.seen {
            return None;
        }
        self.seen = guard.1;
        Some(guard.0)
    }

    /// Waits until the phase satisfies `want`, for at most `timeout`.
    pub fn wait_for(&mut self, timeout: Duration, want: impl Fn(Phase) -> bool) -> Option<Phase> {
        let deadline = std::time::Instant::now() + timeout;
        let (now, seq) = self.shared.phase.get();
        self.seen = seq;
        if want(now) {
            return Some(now);
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.changed(left) {
                Some(p) if want(p) => return Some(p),
                Some(_) => {}
                None => return None,
            }
        }
    }
}

/// Triggers upgrades and shutdown of a running [`Server`] from any thread.
#[derive(Clone, Debug)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Upgrades to the new binary and waits for the outcome: the new process's pid once it is
    /// READY, or why it failed (this process then keeps serving).
    ///
    /// Blocks; do not call it on the thread that runs the server.
    pub fn upgrade(&self) -> Result<u32, UpgradeError> {
        let (tx, rx) = mpsc::channel();
        self.shared.request(Request::Upgrade(tx));
        rx.recv().unwrap_or(Err(UpgradeError::NotRunning))
    }

    /// Sets the blob that the next upgrade hands to the new process with the listeners
    /// (session-ticket keys, a warm cache index, …), read there with
    /// [`Server::inherited_state`]. At most [`MAX_STATE_LEN`](crate::MAX_STATE_LEN) bytes.
    pub fn set_handoff_state(&self, state: Bytes) -> Result<(), Error> {
        if state.len() > crate::MAX_STATE_LEN {
            return Err(Error::Config(format!(
                "handoff state of {} bytes exceeds the {}-byte limit",
                state.len(),
                crate::MAX_STATE_LEN
            )));
        }
        *self
            .shared
            .handoff_state
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = state;
        Ok(())
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Handle {
        Handle { shared }
    }

    /// This process's generation: 0 when started by hand, one more at each upgrade.
    pub fn generation(&self) -> u32 {
        self.shared.generation
    }

    /// Sets named fds (a memfd, a pipe, a device…) that the next upgrade hands to the new
    /// process as they are, read there with [`Server::take_inherited_fds`]. This process keeps
    /// them open (the handoff sends duplicates).
    pub fn set_handoff_fds(&self, fds: Vec<(String, OwnedFd)>) -> Result<(), Error> {
        if let Some((name, _)) = fds
            .iter()
            .find(|(n, _)| n.len() > crate::handoff::MAX_NAME_LEN)
        {
            return Err(Error::Config(format!("fd name {name:?} is too long")));
        }
        *self
            .shared
            .handoff_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = fds;
        Ok(())
    }

    /// Asks the server to stop accepting, drain and return from `run`. Does not wait.
    pub fn shutdown(&self) {
        self.shared.request(Request::Shutdown);
    }

    /// The server's current phase.
    pub fn phase(&self) -> Phase {
        self.shared.phase.get().0
    }

    /// Watches the phase from any thread: [`PhaseWatch::changed`] and
    /// [`PhaseWatch::wait_for`] wait without polling.
    pub fn watch_phase(&self) -> PhaseWatch {
        PhaseWatch {
            seen: self.shared.phase.get().1,
            shared: self.shared.clone(),
        }
    }

    /// The phase as a `tokio::sync::watch` receiver, for async code.
    #[cfg(feature = "tokio")]
    pub fn phase_receiver(&self) -> tokio::sync::watch::Receiver<Phase> {
        self.shared.phase.sender.subscribe()
    }

    /// Connections accepted by this process and not yet dropped.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(SeqCst)
    }
}

/// Counts a live connection; the process drains until every guard is dropped.
///
/// Keep it alive as long as the connection is served (it travels inside [`Connection`], or
/// separately after [`Connection::into_parts`]).
pub struct DrainGuard {
    shared: Arc<Shared>,
}

impl DrainGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> DrainGuard {
        shared.live.fetch_add(1, SeqCst);
        DrainGuard {
            shared: shared.clone(),
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        // SeqCst pairs with the driver's `draining.store(true)` then `live.load()`: either the
        // driver sees zero, or this sees `draining` and wakes it. No drain can be missed.
        let was = self.shared.live.fetch_sub(1, SeqCst);
        if (was == 1 && self.shared.draining.load(SeqCst)) || self.shared.accept_paused.load(SeqCst)
        {
            self.shared.wake();
        }
    }
}

impl fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainGuard").finish_non_exhaustive()
    }
}

/// An accepted connection, with the guard that keeps its process from exiting under it.
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
    listener: Arc<str>,
    unix: bool,
    guard: DrainGuard,
}

impl Connection {
    pub(crate) fn new(
        fd: OwnedFd,
        listener: Arc<str>,
        unix: bool,
        guard: DrainGuard,
    ) -> Connection {
        Connection {
            fd,
            listener,
            unix,
            guard,
        }
    }

    /// The name of the listener that accepted it.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Whether it came from a Unix listener (else TCP).
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// The socket (blocking mode, close-on-exec) and its drain guard.
    pub fn into_parts(self) -> (OwnedFd, DrainGuard) {
        (self.fd, self.guard)
    }

    /// As a std TCP stream (blocking mode) and its drain guard. For a connection from a TCP
    /// listener.
    pub fn into_tcp(self) -> (TcpStream, DrainGuard) {
        (TcpStream::from(self.fd), self.guard)
    }

    /// As a std Unix stream (blocking mode) and its drain guard. For a connection from a Unix
    /// listener.
    pub fn into_unix(self) -> (std::os::unix::net::UnixStream, DrainGuard) {
        (std::os::unix::net::UnixStream::from(self.fd), self.guard)
    }

    /// As a tokio TCP stream (switched to non-blocking mode) and its drain guard. Must be called
    /// inside a tokio runtime.
    #[cfg(feature = "tokio")]
    pub fn into_tokio(self) -> std::io::Result<(tokio::net::TcpStream, DrainGuard)> {
        let std = TcpStream::from(self.fd);
        std.set_nonblocking(true)?;
        Ok((tokio::net::TcpStream::from_std(std)?, self.guard))
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Binds `spec`; a member `name#i` of a per-worker group asked for TCP port 0 joins the port
/// member 0 (`name`, bound before it in `bound`) got, not a port of its own.
fn bind_member(spec: &ListenSpec, bound: &[Listener], listen: bool) -> Result<Listener, Error> {
    if let (Endpoint::Tcp(addr), Some((base, _))) = (&spec.endpoint, spec.name.rsplit_once('#')) {
        if spec.reuseport && addr.port() == 0 {
            let first = bound
                .iter()
                .find(|l| &*l.name == base)
                .and_then(|l| sys::local_inet_addr(l.fd.as_fd()).ok());
            if let Some(first) = first {
                return Listener::bind_with(
                    &ListenSpec {
                        endpoint: Endpoint::Tcp(first),
                        ..spec.clone()
                    },
                    listen,
                );
            }
        }
    }
    Listener::bind_with(spec, listen)
}

/// Writes `pid` to `path` atomically: a temporary file in the same directory, exchanged with
/// the old pid file (`renameat2(RENAME_EXCHANGE)`), or renamed into place when there is none.
/// Returns the temporary name, now holding the old pid file, for the caller to remove off its
/// critical path.
///
/// Why not a plain rename over the old file: replacing a file frees the old inode inside the
/// rename, and on ext4 mounted with `discard` that waits for a synchronous TRIM of its block
/// (`perf sched` stack here: `rename` → `ext4_evict_inode` → `blkdev_issue_discard` →
/// `submit_bio_wait`, 0.5–7.5 ms in D state), plus ext4's flush-on-replace (`auto_da_alloc`).
/// This ran in a new process just before its READY and in a serving process on rollback. The
/// exchange frees nothing (15 µs here against 300 µs for the rename); the free happens when
/// the leftover is unlinked.
pub(crate) fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<Option<PathBuf>> {
    // Unique per write: a leftover of an earlier write may still wait for its unlink. Created
    // exclusively and never through a link (O_EXCL fails on any existing name, a symlink
    // included), so a name planted by someone else in a shared directory is skipped, never
    // written through; a few names are tried.
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.{}.tmp", WRITES.fetch_add(1, SeqCst)));
        let tmp = PathBuf::from(tmp);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        match created {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 64 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    };
    if let Err(e) = std::io::Write::write_all(&mut file, format!("{pid}\n").as_bytes()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    drop(file);
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    if renameat2(AT_FDCWD, &tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE).is_ok() {
        return Ok(Some(tmp));
    }
    // No pid file yet (ENOENT), a file system without RENAME_EXCHANGE (EINVAL), a sandbox
    // that refuses renameat2…: a plain rename, which reports a real problem itself.
    match std::fs::rename(&tmp, path) {
        Ok(()) => Ok(None),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sys, write_pid_file, Server};
    use std::os::fd::AsFd;

    /// Port 0 with workers: every member of the group on the one port member 0 got (they
    /// used to get a port each, so connections to `local_addr` reached member 0 only).
    #[test]
    fn workers_asked_for_port_0_share_one_port() {
        let mut server = Server::builder()
            .listen_tcp("web", "127.0.0.1:0".parse().unwrap())
            .workers(3)
            .build()
            .unwrap();
        let port = server.local_addr("web").unwrap().port();
        assert_ne!(port, 0);
        let workers = server.take_workers().unwrap();
        assert_eq!(workers.len(), 2);
        for w in &workers {
            let addr = sys::local_inet_addr(w.listeners[0].fd.as_fd()).unwrap();
            assert_eq!(addr.port(), port, "worker {}", w.index());
        }
    }

    #[test]
    fn pid_file_is_exchanged_and_the_old_one_handed_back() {
        let dir = std::env::temp_dir().join(format!("ringflip-pidfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("x.pid");
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();

        // No pid file yet: renamed into place, nothing left over.
        assert_eq!(write_pid_file(&path, 11).unwrap(), None);
        assert_eq!(read(&path), "11\n");

        // Replacing: the new content is in place, the old one comes back under the temp name.
        let leftover = write_pid_file(&path, 22).unwrap().expect("a leftover");
        assert_eq!(read(&path), "22\n");
        assert_eq!(read(&leftover), "11\n");
        assert_eq!(leftover.parent(), Some(dir.as_path()));
        std::fs::remove_file(&leftover).unwrap();

        // A directory that does not exist: an error, and no file anywhere.
        assert!(write_pid_file(&dir.join("missing/x.pid"), 33).is_err());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.pid")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The temp file is created, never opened through a link: another user of a shared
    /// directory who plants symlinks under the names it may use must not get this process
    /// (root, often) to write through them, nor turn the pid file into a link.
    #[test]
    fn pid_file_is_never_written_through_a_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("ringflip-pidlink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("x.pid");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let pid = 4242;
        // The names of the form `x.pid.<pid>.<n>.tmp` the next writes pick (the counter behind
        // `n` is this process's; the other tests here bump it a few times at most).
        for n in 0..32 {
            let link = dir.join(format!("x.pid.{pid}.{n}.tmp"));
            std::os::unix::fs::symlink(&victim, link).unwrap();
        }
        for _ in 0..2 {
            if let Ok(Some(leftover)) = write_pid_file(&path, pid) {
                let _ = std::fs::remove_file(leftover);
            }
        }
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "precious\n",
            "the pid was written through a planted link"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the pid file is a link");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{pid}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
