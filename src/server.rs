//! The public face: [`Builder`], [`Server`] and [`Worker`]. Each runs a driver
//! (`driver/mod.rs`); the sockets come from `boot.rs`, the state shared with the driver is in
//! `shared.rs`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::access::ControlAccess;
use crate::connection::Connection;
#[cfg(feature = "tokio")]
use crate::driver::runtime::serve_async;
use crate::driver::{Driver, ServerParts, Waiting};
use crate::error::Error;
use crate::handle::Handle;
use crate::handoff::{MAX_LISTENERS, MAX_NAME_LEN};
use crate::inherit::state::StateStream;
use crate::inherit::StateReader;
use crate::launch::EnvOverrides;
use crate::listener::{self, Endpoint, ListenSpec};
use crate::machine::{ExitReason, Timeouts};
use crate::shared::{Config, PhaseCell, RequestsOpen, RingThreads, Shared};
use crate::signals::{StopHook, UpgradeSignal};
use crate::workers::Coordinator;
use crate::{boot, control, kernel, signals, sys, systemd};

mod deploy;
#[cfg(feature = "tokio")]
mod per_core;
mod triggers;
mod worker;

#[cfg(feature = "tokio")]
pub use per_core::Ring;
pub use worker::Worker;

/// The longest [`Builder::ready_timeout`] and [`Builder::drain_timeout`]: a year.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Configures and starts a [`Server`].
#[derive(Debug, Clone)]
pub struct Builder {
    listeners: Vec<ListenSpec>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    pid_file: Option<PathBuf>,
    binary: Option<PathBuf>,
    /// The new process's arguments after `argv[0]` (default: this process's).
    args: Option<Vec<OsString>>,
    env: EnvOverrides,
    backlog: Option<u32>,
    control_access: ControlAccess,
    max_draining: u32,
    control: Option<PathBuf>,
    udp: Vec<(String, SocketAddr)>,
    workers: usize,
    upgrade_signal: UpgradeSignal,
    on_stop_signal: Option<StopHook>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            listeners: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
            pid_file: None,
            binary: None,
            args: None,
            env: EnvOverrides::default(),
            backlog: None,
            control_access: ControlAccess::default(),
            max_draining: 4,
            control: None,
            udp: Vec::new(),
            workers: 1,
            upgrade_signal: UpgradeSignal::default(),
            on_stop_signal: None,
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
            setup: None,
            backlog: None,
        });
        self
    }

    /// How long a new process has, from the upgrade request (starting the binary included) to
    /// READY, before the upgrade is rolled back (default 30 s; more than zero, at most
    /// a year).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// How long a replaced (or stopping) process waits for its live connections to finish
    /// before it exits anyway (default 60 s; at most a year).
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
    ///
    /// [`Phase::Draining`]: crate::Phase::Draining
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
    /// with this process's uid, root, and those allowed with
    /// [`Builder::control_socket_allow_uid`] and [`Builder::control_socket_allow_gid`] are
    /// served (`SO_PEERCRED`, `SO_PEERGROUPS`).
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

    /// Sets the process up: blocks the upgrade signal (SIGHUP by default), SIGTERM and SIGINT
    /// in the calling thread (they are
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
        // A deadline is an `Instant` plus the timeout: `Duration::MAX` ("never") would overflow
        // it in the middle of an upgrade.
        for (what, timeout) in [
            ("ready_timeout", self.ready_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if timeout > MAX_TIMEOUT {
                return Err(Error::Config(format!(
                    "{what} {timeout:?} is longer than the longest, {MAX_TIMEOUT:?} (a year)"
                )));
            }
        }
        if self.ready_timeout.is_zero() {
            return Err(Error::Config(
                "ready_timeout is zero: every upgrade would fail".into(),
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
            if name.starts_with("ringflip.") || name.contains('#') || !names.insert(name.as_str()) {
                return Err(Error::Config(format!(
                    "UDP socket name {name:?} is reserved (\"ringflip.\", '#') or used twice"
                )));
            }
            if name.len() > MAX_NAME_LEN {
                return Err(Error::Config(format!(
                    "UDP socket name {name:?} is longer than {MAX_NAME_LEN} bytes (the handoff's \
                     limit)"
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
            let spec = &ListenSpec {
                backlog: self.backlog,
                ..spec.clone()
            };
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
        // Checked on the names as handed over (with a worker's `#i`), not at the first upgrade.
        if let Some(spec) = specs.iter().find(|s| s.name.len() > MAX_NAME_LEN) {
            return Err(Error::Config(format!(
                "listener name {:?} is longer than {MAX_NAME_LEN} bytes (the handoff's limit{})",
                spec.name,
                if self.workers > 1 {
                    ", with the worker's suffix"
                } else {
                    ""
                }
            )));
        }
        if let Some(path) = &self.control {
            specs.push(ListenSpec {
                name: control::CONTROL_LISTENER.into(),
                endpoint: Endpoint::Unix(path.clone()),
                mode: Some(self.control_access.file_mode()),
                reuseport: false,
                setup: None,
                backlog: None,
            });
        }
        // No io_uring (a seccomp profile, the sysctl, an old kernel): say so now, with the cause.
        kernel::check_io_uring()?;
        let signals = signals::handled(self.upgrade_signal);
        signals
            .thread_block()
            .map_err(|e| Error::io("blocking signals")(e.into()))?;
        // Threads started before this one blocked them may be handed them: forwarded here.
        signals::install(&signals).map_err(Error::io("installing the signal forwarding"))?;
        let signal_reader = signals::Reader::claim();

        let (exe, args) = self.successor_command(std::env::args_os().collect());
        let boot::Sockets {
            listeners,
            parent,
            inherited_state,
            elders,
            generation,
            udp,
            inherited_fds,
        } = boot::acquire(&specs, &self.udp)?;
        if let Some(path) = &self.control {
            deploy::set_control_file_access(path, &self.control_access)?;
        }
        let wake = sys::eventfd().map_err(Error::io("eventfd"))?;
        let shared = Arc::new(Shared {
            wake,
            live: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            accept_paused: AtomicBool::new(false),
            drain_seq: std::sync::atomic::AtomicU64::new(0),
            phase: PhaseCell::new(),
            requests: Mutex::new(Some(Vec::new())),
            handoff_state: Mutex::new(Bytes::new()),
            handoff_fds: Mutex::new(Arc::new(Vec::new())),
            generation,
            control_access: self.control_access,
            ring_threads: RingThreads::default(),
        });
        Ok(Server {
            inherited_state,
            inherited_fds,
            workers: None,
            parts: ServerParts {
                listeners,
                parent,
                requests_open: RequestsOpen(shared.clone()),
                signal_reader,
                shared,
                elders,
                udp,
                worker_listeners: Vec::new(),
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
                    env: self.env,
                    signals,
                    listen_backlog: self.backlog,
                    upgrade_signal: self.upgrade_signal,
                    on_stop_signal: self.on_stop_signal,
                    notify_socket: systemd::notify_target(),
                    protocol: crate::protocol::this_process(),
                },
            },
        })
    }
}

/// A process that serves its listeners and can hand them to a new binary.
///
/// Made by [`Builder::build`]; driven by [`Server::run`] (or `run_async`). See the crate docs
/// for the lifecycle.
pub struct Server {
    /// What its driver is made from (see `Server::into_driver`).
    pub(crate) parts: ServerParts,
    inherited_state: Option<StateStream>,
    inherited_fds: Vec<(String, OwnedFd)>,
    /// Thread-per-core, once [`Server::take_workers`] has split the workers off: what this
    /// (coordinating) server shares with them. Dropped unrun, it tells them to quit.
    workers: Option<Coordinator>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.parts.listeners)
            .field(
                "successor_of",
                &self.parts.parent.as_ref().map(|p| p.predecessor_pid),
            )
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
        Handle::from_shared(self.parts.shared.clone())
    }

    /// The local address of the TCP listener named `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        match self
            .parts
            .listeners
            .iter()
            .find(|l| &*l.name == name)?
            .endpoint
        {
            Endpoint::Tcp(addr) => Some(addr),
            _ => None,
        }
    }

    /// The pid of the process this one took over from, if it was started by an upgrade.
    pub fn predecessor(&self) -> Option<u32> {
        self.parts.parent.as_ref().map(|p| p.predecessor_pid)
    }

    /// A clone of the UDP socket named `name` (see [`Builder::bind_udp`]).
    pub fn udp_socket(&self, name: &str) -> Option<std::io::Result<std::net::UdpSocket>> {
        self.parts
            .udp
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.socket.try_clone())
    }

    /// Takes the fds the previous process handed over with [`Handle::set_handoff_fds`], by
    /// name (empty on a first start). They are close-on-exec.
    pub fn take_inherited_fds(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.inherited_fds)
    }

    /// The state the previous process set with [`Handle::set_handoff_state`] (empty if it
    /// set none), when it is at most [`MAX_STATE_LEN`](crate::MAX_STATE_LEN) bytes: received
    /// whole by [`Builder::build`]. `None` on a first start, and for a larger state, which is
    /// read with [`Server::inherited_state_reader`]. Read it before [`Server::run`]: the
    /// previous process keeps serving until this one runs.
    pub fn inherited_state(&self) -> Option<&Bytes> {
        self.inherited_state.as_ref()?.whole()
    }

    /// The state the previous process set with [`Handle::set_handoff_state`], of any size, as
    /// a stream ([`std::io::Read`]) taken off the handoff channel chunk by chunk as the
    /// previous process sends it, so that neither process holds a copy of it whole. `None`
    /// on a first start. Read it to its end before [`Server::run`]: a state of more than
    /// [`MAX_STATE_LEN`](crate::MAX_STATE_LEN) bytes not read to its end makes `run` fail
    /// with [`Error::StateNotRead`] (the upgrade fails; the previous process keeps serving).
    /// A smaller one was received whole at `build` and is served from memory here too.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let mut server = ringflip::Server::builder().listen_tcp("main", "127.0.0.1:0".parse()?).build()?;
    /// if let Some(mut state) = server.inherited_state_reader() {
    ///     let mut cache = std::fs::File::create("/var/cache/app/warm")?;
    ///     std::io::copy(&mut state, &mut cache)?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn inherited_state_reader(&mut self) -> Option<StateReader<'_>> {
        let stream = self.inherited_state.as_mut()?;
        let channel = self.parts.parent.as_ref()?.channel.as_fd();
        Some(StateReader::new(stream, channel))
    }

    /// Serves until this process is replaced or stopped, on the calling thread (the thread
    /// that called [`Builder::build`] or any other). Each accepted connection goes to
    /// `on_connection`, which should hand it off quickly (to a thread, a pool, a queue).
    ///
    /// Returns once the process has finished draining; the caller should then exit.
    pub fn run(self, mut on_connection: impl FnMut(Connection)) -> Result<ExitReason, Error> {
        let _on_ring = RingThreads::enter(&self.parts.shared);
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
        if self.parts.config.workers > 1 && self.workers.is_none() {
            return Err(Error::Config(format!(
                "{what} serves one ring; with workers({}) call take_workers first, or use \
                 run_workers",
                self.parts.config.workers
            )));
        }
        // READY follows: the whole state must have been taken off the channel.
        if let (Some(state), Some(parent)) = (&mut self.inherited_state, &self.parts.parent) {
            state.finish(parent.channel.as_fd())?;
        }
        let workers = self.workers.take();
        // On an error here `workers` is dropped, which tells the workers to quit.
        // What the application did not take (inherited state and fds) is dropped on return.
        let driver = Driver::prepare(self.parts, waiting)?;
        Ok(match workers {
            Some(coordinator) => driver.with_workers(coordinator),
            None => driver,
        })
    }

    /// Serves as a task of the current tokio runtime (a tokio-uring runtime is one): the
    /// runtime's reactor polls one fd of the driver's (an epoll of the fds its ring waits on;
    /// see `docs/WAKEUPS.md`), and each accepted connection goes to
    /// `on_connection` on this same thread, with no thread hop. Must be awaited on one thread
    /// (a `LocalSet`, a current-thread runtime, tokio-uring, or a multi-thread runtime's
    /// `block_on`, where `on_connection` can `tokio::spawn` each connection onto the workers:
    /// see `ringflip::http`); the future is not `Send`, so it cannot be spawned.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn run_async(
        self,
        on_connection: impl FnMut(Connection),
    ) -> Result<ExitReason, Error> {
        // Awaited on one thread (see above): the thread of the first poll is the ring's.
        let _on_ring = RingThreads::enter(&self.parts.shared);
        serve_async(
            self.into_driver("run_async", Waiting::InRuntime)?,
            on_connection,
        )
        .await
    }
}
