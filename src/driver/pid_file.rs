//! The pid file on the driver's side: reclaimed after a failed upgrade, removed at the final
//! stop, restored by an abandoned successor, leftovers unlinked through the ring (off the
//! serving path). Written atomically by `pidfile.rs`.

use std::os::unix::ffi::OsStrExt;

use io_uring::{opcode, types};

use crate::pidfile::{remove_pid_file_naming, write_pid_file};

use super::ring::{errno, Op, Token};
use super::Driver;

impl Driver {
    /// After a failed upgrade the child may already have written its pid: this process serves,
    /// so the pid file names it again.
    pub(super) fn reclaim_pid_file(&mut self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        match write_pid_file(path, std::process::id()) {
            Ok(Some(leftover)) => self.unlink_later(leftover),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "rewriting the pid file"),
        }
    }

    /// Removes the pid file if it names this process (see `remove_pid_file_naming`).
    pub(super) fn remove_pid_file(&self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        if let Err(e) = remove_pid_file_naming(path, std::process::id()) {
            tracing::warn!(error = %e, path = %path.display(), "removing the pid file");
        }
    }

    /// Puts the pid file's previous content back (`prepare` exchanged it with this process's
    /// pid): for a start that turned out to be abandoned.
    pub(super) fn restore_pid_file(&mut self) {
        let (Some(path), Some(leftover)) = (&self.config.pid_file, self.pid_file_leftover.take())
        else {
            return;
        };
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        let exchanged = renameat2(
            AT_FDCWD,
            &leftover,
            AT_FDCWD,
            path,
            RenameFlags::RENAME_EXCHANGE,
        );
        if let Err(e) = exchanged {
            // No pid file to exchange with (ENOENT: the predecessor, stopping, removed it):
            // the old content has nowhere to go back to, and must not stay behind either.
            tracing::warn!(error = %e, "restoring the pid file");
        }
        // After an exchange, the leftover holds this process's pid; else the old content.
        self.unlink_later(leftover);
    }

    /// Removes `path` through the ring. Unlinking can wait for the disk (see
    /// `write_pid_file`); io_uring always runs UNLINKAT in its io-wq worker threads, never
    /// inline in the submitting thread, so this never blocks the accept loop. The kernel
    /// copies the path when the SQE is issued; the op keeps it until the completion anyway.
    pub(super) fn unlink_later(&mut self, path: std::path::PathBuf) {
        use std::os::unix::ffi::OsStringExt;
        let Ok(path) = std::ffi::CString::new(path.into_os_string().into_vec()) else {
            return;
        };
        let entry = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        self.arm(Op::Unlink(path), entry);
    }

    /// A leftover file's removal (see `unlink_later`) completed.
    pub(super) fn on_unlinked(&mut self, token: Token, res: i32) {
        let Some(Op::Unlink(path)) = self.ops.remove(token) else {
            unreachable!()
        };
        // Cancelled: this driver is finishing (see `finish`), so blocking is fine now.
        let res = if res == -libc::ECANCELED {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
            match std::fs::remove_file(path) {
                Ok(()) => 0,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            }
        } else {
            res
        };
        if res < 0 && res != -libc::ENOENT {
            tracing::warn!(path = ?path, error = %errno(res), "removing a leftover file");
        }
    }
}
