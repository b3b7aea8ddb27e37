//! The [`Builder`] options of what the signals do: which one upgrades, and who else hears a
//! stop.

use std::sync::Arc;

use crate::signals::{StopHook, StopSignal, UpgradeSignal};

use super::Builder;

impl Builder {
    /// The signal that starts an upgrade (default [`UpgradeSignal::Hup`]). ringflip reads this
    /// signal, `SIGTERM` and `SIGINT`, and no other: with `UpgradeSignal::Usr2`, `SIGHUP`
    /// keeps its disposition, for the application to handle (a configuration reload) — note
    /// that its default action ends the process, so install a handler (or ignore it) before
    /// anyone sends it.
    ///
    /// Every generation must use the same signal: the unit file's `ExecReload=`, scripts and
    /// the pid file's readers send it to whichever process serves.
    pub fn upgrade_signal(mut self, signal: UpgradeSignal) -> Self {
        self.upgrade_signal = signal;
        self
    }

    /// Runs `hook` when `SIGTERM` or `SIGINT` stops the server, before it stops accepting:
    /// ringflip reads these signals itself (its signalfd), so an application's own handler
    /// (`tokio::signal`, `signal-hook`) never sees them. Use it to tell the application's
    /// tasks; the server drains its connections and `run` returns either way. Also run when
    /// the previous process gave up on this one (its `SIGTERM`, at its ready deadline or
    /// shutdown). Runs on the server's thread, between two turns of its ring: keep it short
    /// (send on a channel, set a flag). A panic in it is caught and logged.
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
