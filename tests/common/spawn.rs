//! Starting child processes from the test process: with only fds 0-2 ([`clean_command`]) and
//! never while an executable is open for writing ([`forking`]).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Taken shared around every fork of the test process and exclusively while an executable is
/// open for writing. A child forked while another thread has a file open for writing holds
/// that fd until its own exec (close-on-exec acts only then), and exec of the file meanwhile
/// fails with ETXTBSY: seen as a failed spawn in one test while another wrote its binary.
static EXEC_WRITE: RwLock<()> = RwLock::new(());

/// Hold while spawning a child of the test process (see [`EXEC_WRITE`]).
pub fn forking() -> RwLockReadGuard<'static, ()> {
    EXEC_WRITE.read().unwrap_or_else(|e| e.into_inner())
}

/// Hold while an executable is open for writing (see [`EXEC_WRITE`]).
pub(crate) fn writing_executable() -> RwLockWriteGuard<'static, ()> {
    EXEC_WRITE.write().unwrap_or_else(|e| e.into_inner())
}

/// `cmd.spawn()` under [`forking`].
pub fn spawn(cmd: &mut Command) -> io::Result<std::process::Child> {
    let _forking = forking();
    cmd.spawn()
}

/// `cmd.output()`, spawned under [`forking`] (held only for the spawn, not the run).
///
/// Another test's thread may reap the child first ([`reap_zombies`](super::reap_zombies)
/// waits for any child): its status is then taken from what that thread recorded, where
/// `wait_with_output` failed with ECHILD and lost the output.
pub fn output(cmd: &mut Command) -> io::Result<std::process::Output> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd)?;
    let mut stderr_pipe = child.stderr.take().expect("piped stderr");
    let stderr = std::thread::spawn(move || {
        let mut v = Vec::new();
        stderr_pipe.read_to_end(&mut v).map(|_| v)
    });
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_end(&mut stdout)?;
    let stderr = stderr.join().expect("reading stderr")?;
    let status = match child.wait() {
        Ok(status) => status,
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            let pid = child.id() as i32;
            let raw = super::reaped_status_of(pid, std::time::Duration::from_secs(5)).ok_or(e)?;
            std::process::ExitStatus::from_raw(raw)
        }
        Err(e) => return Err(e),
    };
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// might have inherited is marked close-on-exec in the child before exec (close_range), so
/// nothing of the harness leaks into the server (std's own fds are all O_CLOEXEC already).
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes one async-signal-safe syscall and ignores its result.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    cmd
}
