//! Starting the new binary.
//!
//! A `clone(CLONE_VM | CLONE_VFORK | CLONE_FILES)` and `execve` (a vfork, as `posix_spawn` is,
//! but sharing the fd table), never `fork`: copying the page tables of a 2 GiB process took 40 ms here, a vfork 0.2 ms. What
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
//! CLOSE_RANGE_UNSHARE)`: the kernel's `dup_fd` copies only the first 64 entries, or up to the
//! last open fd below the range if that is higher, and closes the copies inside the range).
//! The slot is a low fd number reserved at boot ([`reserve_child_slot`]), before any
//! connection or inherited listener takes the low numbers; at each spawn it holds the child's
//! end of the handoff socketpair. Then the child:
//! - moves that end to fd 3, and closes every other fd above stderr: the new process starts
//!   with stdin, stdout, stderr and the channel, nothing else (whatever else it needs comes
//!   through `set_handoff_fds`, on the channel);
//! - clears what kernels without the fix for CVE-2024-45025 (before 6.1.107, 6.6.48, 6.10.7)
//!   leave wrong in the new table: their `close_range(UNSHARE)` copies this process's "block of
//!   64 fds full" bits for fds 64 to 4095, and the new process would skip those numbers as if
//!   taken (an `EMFILE` long before its limit). A dup2 into each such block then a close
//!   clears its bit (see [`run_child`]); on a fixed kernel it changes nothing;
//! - grows its fd table to this process's size (see [`presize_slot`]);
//! - resets to the default disposition every signal with a handler here and the signals this
//!   process handles through its signalfd (the upgrade signal, SIGTERM, SIGINT), and empties
//!   its signal mask (exec keeps both mask and ignored signals).
//!
//! Until exec the child runs on this process's memory (`CLONE_VM`), with this thread suspended
//! (`CLONE_VFORK`) and every signal blocked, glibc's own two included (a raw `rt_sigprocmask`,
//! as glibc's spawn does): a handler of this process must not run in it. It calls nothing but
//! syscalls through `libc` on data prepared before the clone: no allocation, no lock, no panic.
//!
//! Where the kernel or a seccomp filter refuses `CLOSE_RANGE_UNSHARE` (`EINVAL`, `ENOSYS`,
//! `EPERM`), the spawn is made again without `CLONE_FILES`: the child then gets a copy of the
//! table, as with `posix_spawn`, and closes what is above fd 3 all the same (one `close` per
//! number where `close_range` itself is refused: a kernel before 5.9, a seccomp filter).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sched::CloneFlags;
use nix::sys::signal::SigSet;
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
    spawn_with(exe, args, env, upgrade, handled_signals, true)
}

/// [`spawn`], with the fd table shared with the child until it unshares it, or (the fallback)
/// copied at once.
fn spawn_with(
    exe: &Path,
    args: &[OsString],
    env: &EnvOverrides,
    upgrade: UpgradeId,
    handled_signals: &SigSet,
    share_table: bool,
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
    let table_slots = own_table_slots();
    let child = ChildSetup {
        exe: &exe,
        argv: null_terminated(&argv),
        envp: null_terminated(&envp),
        presize: table_slots.and_then(presize_slot),
        table_slots: table_slots.unwrap_or(0),
        // Without /proc, the table holds no fd at or above the limit (taken before a lowering
        // excepted); bounded so that a huge limit costs no minutes of closes.
        close_below: table_slots.unwrap_or_else(|| {
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1 << 16, |(soft, _)| soft.min(1 << 20) as usize)
        }),
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
    let started = clone_exec(&child, slot.fd(), share_table);
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
    /// This process's fd table size: blocks of 64 fds up to it may be marked full in the
    /// child's table (CVE-2024-45025, see the module's documentation).
    table_slots: usize,
    /// Every fd of the child's table is below this: where `close_range` is refused, the child
    /// closes each number from 4 up to it.
    close_below: usize,
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

/// The signals the child resets to their default action (besides those with a handler here):
/// the ones ringflip handles, and SIGPIPE, which the Rust runtime ignores in every Rust
/// process and an ignored disposition survives exec; `std::process::Command` restores it
/// too, so a successor that is a wrapper script or not in Rust runs with it as usual.
fn to_default(handled: &SigSet) -> [bool; SIGNAL_SLOTS] {
    let mut out = [false; SIGNAL_SLOTS];
    out[libc::SIGPIPE as usize] = true;
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
fn clone_exec(setup: &ChildSetup<'_>, slot: RawFd, share_table: bool) -> io::Result<u32> {
    match clone_exec_with(setup, slot, share_table) {
        Err(Refused::Unshare(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)
            ) =>
        {
            clone_exec_with(setup, slot, false).map_err(Refused::into_io)
        }
        other => other.map_err(Refused::into_io),
    }
}

/// Why a child did not exec.
enum Refused {
    /// `close_range(CLOSE_RANGE_UNSHARE)` failed in the child.
    Unshare(io::Error),
    Other(io::Error),
}

impl Refused {
    fn into_io(self) -> io::Error {
        match self {
            Refused::Unshare(err) => io::Error::new(
                err.kind(),
                format!("the new process could not make its own fd table: {err}"),
            ),
            Refused::Other(err) => err,
        }
    }
}

/// [`clone_exec`], with the fd table shared until the child unshares it, or copied.
fn clone_exec_with(setup: &ChildSetup<'_>, slot: RawFd, share_table: bool) -> Result<u32, Refused> {
    let failure = ChildFailure {
        step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
    };
    // The child's stack: the child runs a few libc calls on it. It has no guard page, so it is
    // far larger than they need.
    let mut stack = vec![0u8; 256 * 1024];
    let mut flags = CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK;
    if share_table {
        flags |= CloneFlags::CLONE_FILES;
    }
    // Every signal blocked across the clone (see the module's documentation).
    let old_mask = block_every_signal().map_err(Refused::Other)?;
    let child = Box::new(|| -> isize {
        // SAFETY: runs in the child, on its own stack, sharing this process's memory until
        // exec; it only reads `setup` and writes `failure` (both outlive the clone: the parent
        // thread is suspended until the child exec'ed or exited) and makes syscalls.
        unsafe { run_child(setup, slot, share_table, &failure) }
    });
    // SAFETY: the flags make a vfork (the parent thread waits for exec or exit, so borrowing
    // `setup`, `failure` and `stack` from this frame is sound), and the callback is
    // async-signal-safe (see `run_child`).
    let cloned = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) };
    set_signal_mask(&old_mask);
    let pid = cloned.map_err(|e| Refused::Other(e.into()))?;
    let step = failure.step.load(SeqCst);
    if step == 0 {
        return Ok(pid.as_raw() as u32);
    }
    // It exited without exec: reap it (it has exited already, vfork waited for that).
    let _ = nix::sys::wait::waitpid(pid, None);
    let err = io::Error::from_raw_os_error(failure.errno.load(SeqCst));
    Err(match step {
        // As posix_spawn reports them: ENOENT, EACCES, ENOEXEC… as the spawn's own error.
        STEP_EXEC => Refused::Other(err),
        STEP_UNSHARE => Refused::Unshare(err),
        _ => Refused::Other(io::Error::new(
            err.kind(),
            format!("the new process could not place its channel at fd {CHILD_FD}: {err}"),
        )),
    })
}

/// Blocks every signal on this thread, glibc's internal ones too (`pthread_sigmask` leaves
/// those two out): the mask it had.
fn block_every_signal() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // Every bit the kernel reads (`sigfillset` would leave glibc's 32 and 33 out).
    // SAFETY: `all` is larger than the kernel's set.
    unsafe {
        std::ptr::write_bytes(
            &mut all as *mut libc::sigset_t as *mut u8,
            0xff,
            KERNEL_SIGSET,
        )
    };
    if swap_signal_mask(&all, Some(&mut old)) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old)
}

/// Sets this thread's signal mask (the kernel ignores SIGKILL and SIGSTOP in it). A raw
/// syscall, so the vfork child may call it too.
fn set_signal_mask(mask: &libc::sigset_t) {
    swap_signal_mask(mask, None);
}

/// `rt_sigprocmask(SIG_SETMASK, mask, old)` with the kernel's set size (8 bytes, `_NSIG / 8`,
/// which sigset_t exceeds): its return value.
fn swap_signal_mask(mask: &libc::sigset_t, old: Option<&mut libc::sigset_t>) -> libc::c_long {
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut libc::sigset_t);
    // SAFETY: `mask` is read and `old` (if not null) written, each at least the kernel's size.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            mask as *const libc::sigset_t,
            old,
            KERNEL_SIGSET,
        )
    }
}

/// The kernel's signal set: 64 signals, 8 bytes.
const KERNEL_SIGSET: usize = 8;

/// The child, between clone and exec.
///
/// # Safety
/// Only in a child made by [`clone_exec`]: signals blocked, this process's memory shared,
/// the parent thread suspended.
unsafe fn run_child(
    setup: &ChildSetup<'_>,
    slot: RawFd,
    share_table: bool,
    failure: &ChildFailure,
) -> isize {
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
        // A private table with the fds below the slot's, the slot included. A raw syscall:
        // glibc has the wrapper only since 2.34, musl not at all.
        if share_table
            && libc::syscall(
                libc::SYS_close_range,
                slot as libc::c_uint + 1,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
        {
            return fail(STEP_UNSHARE);
        }
        // dup2 clears FD_CLOEXEC on fd 3 (the slot is above it, so this is a real move).
        if libc::dup2(slot, CHILD_FD) < 0 {
            return fail(STEP_CHANNEL);
        }
        if libc::syscall(
            libc::SYS_close_range,
            CHILD_FD as libc::c_uint + 1,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        ) != 0
        {
            // Refused (a kernel before 5.9 has no close_range; a seccomp filter): the fallback
            // spawn got here with a copy of this process's table, and would hand every fd
            // without FD_CLOEXEC to the new process. One close per number instead (20,000
            // closes take a few ms).
            for fd in (CHILD_FD + 1)..setup.close_below as RawFd {
                libc::close(fd);
            }
        }
        // CVE-2024-45025 (see the module's documentation): closing an fd of a block clears
        // that block's "full" bit. Highest first, so the table grows once. A dup2 above the fd
        // limit fails: that block can hold nothing anyway.
        let blocks = (setup.table_slots / 64).min(64);
        for block in (1..blocks).rev() {
            occupy_and_free((block * 64) as RawFd);
        }
        if let Some(presize) = setup.presize {
            // Best effort: a refusal (a limit lowered since, no memory) only leaves the table small.
            occupy_and_free(presize);
        }
        for sig in 1..SIGNAL_SLOTS {
            let sig = sig as libc::c_int;
            let mut current: libc::sigaction = std::mem::zeroed();
            // glibc refuses its own signals (32, 33) here: they keep theirs until exec, blocked
            // until the mask is emptied just before it; nothing sends them to this child (glibc
            // signals its threads with tgkill, on this process's id).
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
        set_signal_mask(&std::mem::zeroed());
        libc::execve(setup.exe.as_ptr(), setup.argv.as_ptr(), setup.envp.as_ptr());
        fail(STEP_EXEC)
    }
}

/// In the child: puts a copy of the channel at `fd`, then closes it. The table grows to hold
/// `fd`, and the close clears the "full" bit of `fd`'s block of 64; a refusal changes nothing.
///
/// # Safety
/// Only in the child of [`clone_exec`], whose table is its own.
unsafe fn occupy_and_free(fd: RawFd) {
    // SAFETY: `fd` is free in the child's table (it holds fds 0 to 3 only), so nothing of
    // anyone's is replaced.
    unsafe {
        if libc::dup2(CHILD_FD, fd) >= 0 {
            libc::close(fd);
        }
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
fn presize_slot(slots: usize) -> Option<RawFd> {
    const DEFAULT_TABLE: u64 = 64; // NR_OPEN_DEFAULT on 64-bit kernels: no growth below it
    let slots = slots as u64;
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

/// How many slots this process's fd table has.
fn own_table_slots() -> Option<usize> {
    fd_table_slots(&std::fs::read_to_string("/proc/self/status").ok()?)
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
#[path = "spawn_tests.rs"]
mod tests;
