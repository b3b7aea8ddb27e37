//! The upgrade signal (SIGHUP by default), SIGTERM and SIGINT reach the driver whatever thread
//! the kernel delivers them to.
//!
//! The driver reads them from a signalfd, which sees only signals blocked in the thread that
//! reads it: `Builder::build` blocks them in its calling thread, and threads started after it
//! inherit the mask. A thread started *before* `build` (a multi-thread tokio runtime made by
//! `#[tokio::main]`, a logging thread, a test harness) does not block them, and the kernel
//! may deliver a process-directed signal to any thread that does not block it. With the default
//! action, a `systemctl reload` (SIGHUP) would then kill the whole service.
//!
//! So `build` also installs a handler for the three signals. It runs only on a thread that
//! does not block the signal (on the others the signal stays pending for the signalfd), and
//! forwards it to the driver's thread with `rt_tgsigqueueinfo`: there it is blocked, so it
//! stays pending for that thread, and the driver's signalfd read (which runs on that thread:
//! the ring's task work runs in its submitter) takes it as any other. The forwarded signal
//! keeps the sender's pid (`ssi_pid`): the driver tells the predecessor's SIGTERM (it gave up
//! on this process) from an operator's by it. A `tgkill` would put this process's own pid
//! there. The kernel refuses to forge `SI_USER` to another thread, so the copy goes as
//! `SI_QUEUE`, which the driver does not look at. `rt_tgsigqueueinfo` and `gettid` are
//! async-signal-safe, and the handler touches only an atomic and its own stack. With no driver thread registered (before
//! `build` returned, after the driver ended) the signal gets its default action, as without
//! ringflip. A successor starts with the default dispositions (`spawn.rs`).
//!
//! Between `build` and the driver's start the reader is the thread that called `build`; the
//! driver then claims the forwarding for its own thread. Run the server on the thread that
//! called `build` (or one started after it): a signal forwarded to the build thread in that
//! window stays pending there, where another thread's signalfd cannot read it.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI32, Ordering::SeqCst};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The thread whose signalfd reads the signals (0: none).
static READER: AtomicI32 = AtomicI32::new(0);

/// The calling thread's id.
pub(crate) fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The thread the signals are forwarded to, while this lives: the one that called `build`,
/// then the driver's (each blocks them). Dropped, it stops the forwarding unless another
/// thread has claimed it since.
#[derive(Debug)]
pub(crate) struct Reader {
    tid: i32,
}

impl Reader {
    /// Makes the calling thread, which must block the signals, the one they are forwarded to.
    pub(crate) fn claim() -> Reader {
        let tid = gettid();
        READER.store(tid, SeqCst);
        Reader { tid }
    }
}

impl Reader {
    /// This claim, after an older one (`build`'s): the older is let go without undoing this
    /// one when both are of the same thread. Claimed first, dropped after: no moment without
    /// a reader, in which a signal would take its default action.
    pub(crate) fn replacing(self, older: Reader) -> Reader {
        if older.tid == self.tid {
            std::mem::forget(older);
        }
        self
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = READER.compare_exchange(self.tid, 0, SeqCst, SeqCst);
    }
}

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saved and restored so the interrupted code sees its own.
    let errno = unsafe { *libc::__errno_location() };
    let reader = READER.load(SeqCst);
    // SAFETY: `info` is the kernel's siginfo for this delivery (SA_SIGINFO), valid for the
    // handler's duration; the copy lives on this stack. Plain syscalls, async-signal-safe.
    unsafe {
        let mut copy = *info;
        copy.si_code = libc::SI_QUEUE;
        let forwarded = reader > 0
            && reader != gettid()
            && libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                libc::getpid(),
                reader,
                sig,
                &mut copy as *mut libc::siginfo_t,
            ) == 0;
        if !forwarded {
            // No reader (none registered, or gone, or, against the rule, one that does not
            // block it): the default action, as if this handler were not there.
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        *libc::__errno_location() = errno;
    }
}

/// Installs the forwarding handler for `signals` (idempotent).
pub(crate) fn install(signals: &SigSet) -> std::io::Result<()> {
    let action = SigAction::new(
        SigHandler::SigAction(forward),
        SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    for signal in signals.iter() {
        // SAFETY: `forward` is async-signal-safe (see the module doc).
        unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// The signal that asks for an upgrade ([`Builder::upgrade_signal`]).
///
/// [`Builder::upgrade_signal`]: crate::Builder::upgrade_signal
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum UpgradeSignal {
    /// `SIGHUP`, the default (`systemctl reload` with `ExecReload=kill -HUP $MAINPID`).
    #[default]
    Hup,
    /// `SIGUSR1`.
    Usr1,
    /// `SIGUSR2`, as nginx uses it: for services whose `SIGHUP` reloads their configuration.
    Usr2,
}

impl UpgradeSignal {
    pub(crate) fn signal(self) -> Signal {
        match self {
            UpgradeSignal::Hup => Signal::SIGHUP,
            UpgradeSignal::Usr1 => Signal::SIGUSR1,
            UpgradeSignal::Usr2 => Signal::SIGUSR2,
        }
    }
}

/// A signal that stopped the server: it stops accepting, drains and returns from `run`
/// (see [`Builder::on_stop_signal`]).
///
/// [`Builder::on_stop_signal`]: crate::Builder::on_stop_signal
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopSignal {
    /// `SIGTERM` (`systemctl stop`, `kill`).
    Term,
    /// `SIGINT` (Ctrl-C).
    Int,
}

impl StopSignal {
    pub(crate) fn from_raw(signo: i32) -> Option<StopSignal> {
        match signo {
            libc::SIGTERM => Some(StopSignal::Term),
            libc::SIGINT => Some(StopSignal::Int),
            _ => None,
        }
    }
}

/// What [`Builder::on_stop_signal`] runs.
///
/// [`Builder::on_stop_signal`]: crate::Builder::on_stop_signal
#[derive(Clone)]
pub(crate) struct StopHook(pub std::sync::Arc<dyn Fn(StopSignal) + Send + Sync>);

impl StopHook {
    /// Runs the hook; a panic in it is logged, not passed on to the driver.
    pub(crate) fn call(&self, signal: StopSignal) {
        let hook = &self.0;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(signal))).is_err() {
            tracing::error!(
                ?signal,
                "the stop-signal hook (Builder::on_stop_signal) panicked"
            );
        }
    }
}

impl std::fmt::Debug for StopHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopHook(Fn)")
    }
}

/// The signals ringflip reads: the upgrade signal, SIGTERM and SIGINT. The others keep their
/// disposition: the application's to handle.
pub(crate) fn handled(upgrade: UpgradeSignal) -> SigSet {
    let mut set = SigSet::empty();
    set.add(upgrade.signal());
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}
