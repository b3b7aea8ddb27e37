//! The [`Builder`] options of what the signals do: which one upgrades, and who else hears a
//! stop.

use std::sync::Arc;

use crate::signals::{StopHook, StopSignal, UpgradeSignal};

use super::Builder;

impl Builder {
    /// The signal that starts an upgrade (default [`UpgradeSignal::Hup`]). ringflip reads this
    /// signal, `SIGTERM` and `SIGINT`, and no other: with `UpgradeSignal::Usr2`, `SIGHUP`
    /// keeps its disposition, for the application to handle (a configuration reload). Its
    /// default action ends the process, resetting every connection: install the handler (or
    /// ignore it) **before `build()`**, since a successor takes connections before its READY.
    /// (A new process starts with the default disposition of the signals ringflip reads, and
    /// the others as exec leaves them: a handler becomes the default, an ignore stays.)
    ///
    /// Every generation must use the same signal: the unit file's `ExecReload=` (or
    /// `ReloadSignal=SIGUSR2` with `Type=notify-reload`), scripts and the pid file's readers
    /// send it to whichever process serves. Changing it is a restart, or an `ExecReload=`
    /// change made at the moment the new binary takes over.
    pub fn upgrade_signal(mut self, signal: UpgradeSignal) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// Runs `hook` when a `SIGTERM` or `SIGINT` is read, before the server acts on it (stops
    /// accepting, if it still does, and drains): ringflip reads these signals itself (its
    /// signalfd), so an application's own handler (`tokio::signal`, `signal-hook`) never sees
    /// them. Use it to tell the application's tasks; the server drains its connections and
    /// `run` returns either way. Also run when the previous process gave up on this one (its
    /// `SIGTERM`, at its ready deadline or shutdown), and for a signal read while the server is
    /// already on its way out. Runs on the server's own thread (in `run_async`, inside its
    /// task), in the middle of handling the ring's completions: keep it short (send on a
    /// channel, set a flag). It must not wait for the server: calling `Handle::upgrade()` or
    /// `PhaseWatch::wait_for` from it, or taking a lock that a thread blocked in
    /// `Handle::upgrade()` holds, deadlocks. A panic in it is caught and logged.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), ringflip::Error> {
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let server = ringflip::Server::builder()
    ///     .listen_tcp("web", "127.0.0.1:8080".parse().unwrap())
    ///     .on_stop_signal(move |signal| {
    ///         let _ = tx.send(signal);
    ///     })
    ///     .build()?;
    /// # drop(rx); drop(server); Ok(()) }
    /// ```
    pub fn on_stop_signal(mut self, hook: impl Fn(StopSignal) + Send + Sync + 'static) -> Self {
        self.on_stop_signal = Some(StopHook(Arc::new(hook)));
        self
    }
}
