//! Starting the new binary.
//!
//! A `clone(CLONE_VM | CLONE_VFORK | CLONE_FILES)` and `execve`, as `posix_spawn` does, never
//! `fork`: copying the page tables of a 2 GiB process took 40 ms here, a vfork 0.2 ms. What
//! `posix_spawn` (glibc's and so `nix`'s and std's) still copies is the fd table, every entry
//! of it: a process holding 10,000 connections gave each new process a copy of 10,000 fds,
//! which its exec then closed one by one (close-on-exec), and trigger → READY grew with the
//! connections held (+1.3 to +2.4 ms at 10,000, `benches/handover_scale.rs --curve
//! connections`; a plain `posix_spawn` of `/bin/true` from a process with 0, 10,000 and 19,000
//! open sockets took 0.85, 2.4 and 7.8 ms to run and exit here). No kept crate spawns without
//! that copy, hence this module's own child (see [`clone_exec`]).
//!
//! The child shares this process's fd table (`CLONE_FILES`) and, as its first act, makes a
//! private one holding only the fds below [`ChildSlot`] (`close_range(slot + 1, ~0,
//! CLOSE_RANGE_UNSHARE)`: the kernel's `dup_fd` copies only the entries below the range).
//! The slot is a low fd number reserved at boot ([`reserve_child_slot`]), before any
//! connection or inherited listener takes the low numbers; at each spawn it holds the child's
//! end of the handoff socketpair. Then the child:
//! - moves that end to fd 3, and closes every other fd above stderr: the new process starts
//!   with stdin, stdout, stderr and the channel, nothing else (whatever else it needs comes
//!   through `set_handoff_fds`, on the channel);
//! - grows its fd table to this process's size (see [`presize_slot`]);
//! - resets to the default disposition every signal with a handler here and the signals this
//!   process handles through its signalfd (the upgrade signal, SIGTERM, SIGINT), and empties
//!   its signal mask (exec keeps both mask and ignored signals).
//!
//! Until exec the child runs on this process's memory (`CLONE_VM`), with this thread suspended
//! (`CLONE_VFORK`) and every signal blocked (a handler of this process must not run in it). It
//! calls nothing but syscalls through `libc` on data prepared before the clone: no allocation,
//! no lock, no panic.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::handoff::{CHILD_FD, ENV_FD, ENV_UPGRADE_ID};
use crate::launch::EnvOverrides;
use crate::machine::UpgradeId;
use crate::sys;

/// A started successor.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    /// Watches the child's exit without reaping it.
    pub pidfd: OwnedFd,
    /// This process's end of the handoff socketpair.
    pub channel: OwnedFd,
}

/// The handoff socketpair (this process's end, the child's end), sized for the largest HELLO.
///
/// A `SOCK_SEQPACKET` message must fit the sender's send buffer whole (`EMSGSIZE` otherwise:
/// the kernel refuses a unix datagram longer than `sk_sndbuf - 32`). The largest HELLO the
/// protocol allows (`MAX_MESSAGE_LEN`, ~390 KB: an OFFER carrying a HELLO with 253 records at
/// their longest and a 64 KiB state chunk) is larger than the default buffer (`net.core.wmem_default`, 208 KiB on
/// most systems), so both ends ask for room for it; the kernel grants up to twice
/// `net.core.wmem_max` (so at least 416 KiB with the usual 208 KiB maximum, enough). The child
/// sends only short messages, but its end gets the same size: one rule for the channel.
pub(crate) fn handoff_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let room = crate::handoff::MAX_MESSAGE_LEN + 4096;
    for end in [&ours, &theirs] {
        setsockopt(end, SndBuf, &room)?;
    }
    Ok((ours, theirs))
}

/// The lowest fd number the child slot may take: above stdio and fd 3 (the child's channel),
/// so that the child's `dup2(slot, 3)` always moves it.
const SLOT_MIN: RawFd = 10;

/// The process's child slot: a low fd number held by a placeholder (an eventfd, close-on-exec)
/// between spawns, by the child's end of the channel during one. Behind a lock: one spawn at a
/// time uses it.
static CHILD_SLOT: Mutex<Option<ChildSlot>> = Mutex::new(None);

/// A reserved fd number (see the module's documentation).
struct ChildSlot(OwnedFd);

impl ChildSlot {
    fn reserve() -> io::Result<ChildSlot> {
        let placeholder = placeholder()?;
        sys::dup_cloexec_at_least(placeholder.as_fd(), SLOT_MIN).map(ChildSlot)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn placeholder() -> io::Result<OwnedFd> {
    let fd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)?;
    Ok(fd.into())
}

/// Reserves this process's child slot now, while its low fd numbers are free; called first at
/// boot. Without it (or if it failed) the first spawn reserves one, at whatever number is then
/// the lowest free above [`SLOT_MIN`]: correct, but every child then copies the fds below it.
pub(crate) fn reserve_child_slot() {
    if let Err(e) = slot() {
        tracing::warn!(error = %e, "reserving an fd for the spawn of the next process");
    }
}

fn slot() -> io::Result<MutexGuard<'static, Option<ChildSlot>>> {
    let mut guard = CHILD_SLOT.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.is_none() {
        *guard = Some(ChildSlot::reserve()?);
    }
    Ok(guard)
}

/// Starts `exe` with `args` (argv[0] included), this process's environment as `env` changes
/// it, and the handoff socket at fd 3.
pub(crate) fn spawn(
    exe: &Path,
    args: &[OsString],
    env: &EnvOverrides,
    upgrade: UpgradeId,
    handled_signals: &SigSet,
) -> io::Result<Spawned> {
    let exe = cstring(exe.as_os_str().as_bytes())?;
    let argv = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut envp = Vec::new();
    // Our own variables are set below; the overrides keep any out of what they give.
    for (key, value) in env.apply(std::env::vars_os())? {
        let mut kv = key.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_bytes());
        envp.push(cstring(&kv)?);
    }
    envp.push(cstring(format!("{ENV_FD}={CHILD_FD}").as_bytes())?);
    envp.push(cstring(
        format!("{ENV_UPGRADE_ID}={}", upgrade.0).as_bytes(),
    )?);
    let child = ChildSetup {
        exe: &exe,
        argv: null_terminated(&argv),
        envp: null_terminated(&envp),
        presize: presize_slot(),
        to_default: to_default(handled_signals),
    };

    let (channel, child_end) = handoff_pair()?;
    let mut guard = slot()?;
    let Some(slot) = guard.as_mut() else {
        unreachable!("slot() reserves one or fails");
    };
    // The slot now holds the child's end (dup3 replaces the placeholder atomically).
    nix::unistd::dup3(&child_end, &mut slot.0, nix::fcntl::OFlag::O_CLOEXEC)?;
    drop(child_end);
    let started = clone_exec(&child, slot.fd());
    // This process must not keep a copy of the child's end: the channel's EOF is how each
    // side learns the other is gone. If no placeholder can be had, the slot is given up
    // (reserved again at the next spawn).
    let restored = placeholder().and_then(|p| {
        nix::unistd::dup3(&p, &mut slot.0, nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
    });
    if restored.is_err() {
        *guard = None;
    }
    drop(guard);
    let pid = started?;
    // The child is not reaped until we reap it, so its pid cannot be reused before this.
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            // Reaping the child we just started, blocking only until SIGKILL lands.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            return Err(e);
        }
    };
    Ok(Spawned {
        pid,
        pidfd,
        channel,
    })
}

/// Everything the child needs, made before the clone (the child may not allocate).
struct ChildSetup<'a> {
    exe: &'a CStr,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    presize: Option<RawFd>,
    /// Indexed by signal number: reset to `SIG_DFL` in the child whatever its disposition here.
    to_default: [bool; SIGNAL_SLOTS],
}

/// Signal numbers 1 to 64 (`_NSIG - 1` on Linux), indexed directly.
const SIGNAL_SLOTS: usize = 65;

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn to_default(handled: &SigSet) -> [bool; SIGNAL_SLOTS] {
    let mut out = [false; SIGNAL_SLOTS];
    for sig in handled.iter() {
        if let Some(slot) = out.get_mut(sig as usize) {
            *slot = true;
        }
    }
    out
}

/// Where the child failed: its step and `errno`, written by the child before it exits (the
/// memory is shared until exec), read once the clone returned.
struct ChildFailure {
    step: AtomicI32,
    errno: AtomicI32,
}

const STEP_UNSHARE: i32 = 1;
const STEP_CHANNEL: i32 = 2;
const STEP_EXEC: i32 = 3;

/// Starts the child (see the module's documentation): its pid once it has exec'ed, or why it
/// could not.
fn clone_exec(setup: &ChildSetup<'_>, slot: RawFd) -> io::Result<u32> {
    let failure = ChildFailure {
        step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
    };
    // The child's stack: the child runs a few libc calls on it. It has no guard page, so it is
    // far larger than they need.
    let mut stack = vec![0u8; 256 * 1024];
    // Every signal blocked across the clone: the child starts with this mask, so no handler
    // of this process runs in it (on this process's memory) before it reset them.
    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )?;
    let child = Box::new(|| -> isize {
        // SAFETY: runs in the child, on its own stack, sharing this process's memory until
        // exec; it only reads `setup` and writes `failure` (both outlive the clone: the parent
        // thread is suspended until the child exec'ed or exited) and makes syscalls.
        unsafe { run_child(setup, slot, &failure) }
    });
    // SAFETY: the flags make a vfork (the parent thread waits for exec or exit, so borrowing
    // `setup`, `failure` and `stack` from this frame is sound), and the callback is
    // async-signal-safe (see `run_child`).
    let cloned = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK | CloneFlags::CLONE_FILES,
            Some(libc::SIGCHLD),
        )
    };
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    let pid = cloned?;
    let step = failure.step.load(SeqCst);
    if step == 0 {
        return Ok(pid.as_raw() as u32);
    }
    // It exited without exec: reap it (it has exited already, vfork waited for that).
    let _ = nix::sys::wait::waitpid(pid, None);
    let err = io::Error::from_raw_os_error(failure.errno.load(SeqCst));
    Err(match step {
        // As posix_spawn reports them: ENOENT, EACCES, ENOEXEC… as the spawn's own error.
        STEP_EXEC => err,
        STEP_UNSHARE => io::Error::new(
            err.kind(),
            format!("the new process could not make its own fd table: {err}"),
        ),
        _ => io::Error::new(
            err.kind(),
            format!("the new process could not place its channel at fd {CHILD_FD}: {err}"),
        ),
    })
}

/// The child, between clone and exec.
///
/// # Safety
/// Only in a child made by [`clone_exec`]: signals blocked, this process's memory shared,
/// the parent thread suspended.
unsafe fn run_child(setup: &ChildSetup<'_>, slot: RawFd, failure: &ChildFailure) -> isize {
    let fail = |step: i32| -> isize {
        // SAFETY: this thread's errno, then the exit of the child (no destructor may run).
        unsafe {
            failure.errno.store(*libc::__errno_location(), SeqCst);
            failure.step.store(step, SeqCst);
            libc::_exit(127)
        }
    };
    // SAFETY: syscalls on the child's own fds and signal state, on data `setup` prepared.
    unsafe {
        // A private table with the fds below the slot's, the slot included.
        if libc::close_range(
            slot as libc::c_uint + 1,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE as libc::c_int,
        ) != 0
        {
            return fail(STEP_UNSHARE);
        }
        // dup2 clears FD_CLOEXEC on fd 3 (the slot is above it, so this is a real move).
        if libc::dup2(slot, CHILD_FD) < 0 {
            return fail(STEP_CHANNEL);
        }
        let _ = libc::close_range(CHILD_FD as libc::c_uint + 1, libc::c_uint::MAX, 0);
        if let Some(presize) = setup.presize {
            // Best effort: a refusal (a limit lowered since, no memory) only leaves the table small.
            if libc::dup2(CHILD_FD, presize) >= 0 {
                libc::close(presize);
            }
        }
        for sig in 1..SIGNAL_SLOTS {
            let sig = sig as libc::c_int;
            let mut current: libc::sigaction = std::mem::zeroed();
            // glibc refuses its own signals (32, 33) here: they keep theirs.
            if libc::sigaction(sig, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let handled_here =
                current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if handled_here || setup.to_default.get(sig as usize) == Some(&true) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(setup.exe.as_ptr(), setup.argv.as_ptr(), setup.envp.as_ptr());
        fail(STEP_EXEC)
    }
}

/// The fd slot whose dup2 (then close) in the child, before exec, grows the child's fd table
/// to the size of this process's, or `None` when there is nothing to gain.
///
/// Why: a multi-threaded process that grows its fd table waits for an RCU grace period in
/// `expand_fdtable` (so that no lockless `fd_install` still writes to the old table), and
/// `accept` grows it when it is full. A new process starts with a 64-slot table, so under a
/// burst its accepts grew it 64 → 128 → 256 → 512, each time with the serving thread in D
/// state inside `io_accept`: 4-20 ms each on this VM (median 11.8 ms; `perf record -e
/// sched:sched_switch -g`), while the old process, whose table had grown long ago, had just
/// stopped accepting. In the child the table is its own (unshared), so growing it there needs
/// no grace period, and exec keeps it whatever its size.
///
/// The slot is half this process's table size, [`sys::table_growth_slot`] (and below
/// `RLIMIT_NOFILE`, or the dup2 would fail): a dup2 to slot S/2 gives exactly S slots, so the
/// table keeps its size from generation to generation. The child holds fds 0 to 3 only when
/// it grows the table, so the slot (64 or more) is free there.
fn presize_slot() -> Option<RawFd> {
    const DEFAULT_TABLE: u64 = 64; // NR_OPEN_DEFAULT on 64-bit kernels: no growth below it
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let slots = fd_table_slots(&status)? as u64;
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()?
        .0;
    if slots <= DEFAULT_TABLE {
        return None;
    }
    let slot = sys::table_growth_slot(slots).min(limit.checked_sub(1)?);
    if slot < DEFAULT_TABLE {
        return None; // the limit leaves no room to grow
    }
    RawFd::try_from(slot).ok()
}

/// The `FDSize:` line of a `/proc/PID/status`: how many slots the fd table has.
fn fd_table_slots(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or environment variable contains a NUL byte",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest message the protocol allows (an OFFER carrying a HELLO with every record at
    /// its longest and a 64 KiB state chunk) goes through the handoff channel whole (before the channel was sized for it,
    /// the send failed with EMSGSIZE and the upgrade rolled back).
    #[test]
    fn the_largest_message_fits_the_channel() {
        use crate::handoff::{tests::largest_message, MAX_MESSAGE_LEN};
        let big = largest_message().encode().unwrap();
        assert!(big.len() > 300_000, "{}", big.len());
        let (ours, theirs) = handoff_pair().unwrap();
        sys::send_nonblocking(ours.as_fd(), &big).expect("the largest HELLO does not fit");
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let n = sys::recv_nonblocking(theirs.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &big[..]);
    }

    /// The new process starts with stdin, stdout, stderr and the channel at fd 3, and nothing
    /// else, even from a process with many fds open, some of them inheritable: the spawn copies
    /// no fd table (with `posix_spawn` the child got a copy of every fd, and kept the ones
    /// without `FD_CLOEXEC`). Signals handled here are back to their default, unblocked.
    #[test]
    fn the_new_process_gets_stdio_and_its_channel_and_nothing_else() {
        use std::os::fd::FromRawFd;
        reserve_child_slot();
        let inheritable: Vec<OwnedFd> = (0..300)
            .map(|_| {
                // SAFETY: `dup` makes a new fd (without FD_CLOEXEC), owned by nothing else.
                let fd = unsafe { libc::dup(2) };
                assert!(fd >= 0);
                // SAFETY: as above.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect();
        assert!(inheritable
            .iter()
            .all(|fd| !sys::is_cloexec(fd.as_fd()).unwrap()));
        let args: Vec<OsString> = ["sleep", "30"].iter().map(OsString::from).collect();
        let mut handled = SigSet::empty();
        handled.add(nix::sys::signal::Signal::SIGHUP);
        let child = spawn(
            Path::new("/bin/sleep"),
            &args,
            &EnvOverrides::default(),
            UpgradeId(7),
            &handled,
        )
        .unwrap();
        // The spawn returns once the child has exec'ed: what it holds now, exec left it.
        let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", child.pid))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
            .collect();
        fds.sort_unstable();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
        sys::kill(child.pid, libc::SIGKILL).unwrap();
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid as i32), None).unwrap();
        assert_eq!(fds, [0, 1, 2, 3]);
        assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
        drop(inheritable);
    }

    /// An exec that fails is the spawn's own error, as `posix_spawn` reported it, and leaves
    /// no child behind (it was reaped) and no copy of the child's end of the channel here.
    #[test]
    fn a_binary_that_cannot_be_run_is_the_spawns_error() {
        let args = vec![OsString::from("missing")];
        let err = spawn(
            Path::new("/nonexistent/ringflip-spawn-test"),
            &args,
            &EnvOverrides::default(),
            UpgradeId(8),
            &SigSet::empty(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let guard = slot().unwrap();
        let placeholder = guard.as_ref().unwrap().0.as_fd();
        assert!(
            sys::socket_type(placeholder).is_err(),
            "the slot still holds a socket"
        );
    }

    #[test]
    fn fd_table_slots_reads_fdsize() {
        let status = "Name:\tx\nUmask:\t0022\nFDSize:\t512\nGroups:\t\n";
        assert_eq!(fd_table_slots(status), Some(512));
        assert_eq!(fd_table_slots("Name:\tx\n"), None);
        assert_eq!(fd_table_slots("FDSize:\tmany\n"), None);
    }

    #[test]
    fn this_process_has_an_fd_table_size() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(fd_table_slots(&status).unwrap() >= 64);
    }
}
