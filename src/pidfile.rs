//! The pid file: written atomically, so a reader always finds a whole pid of a live process.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

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

/// Removes the pid file at `path` if it names `pid`: at the final stop, so that nothing is
/// left to name a pid the kernel may give to another process. A pid file naming another
/// process (a successor wrote it) is left alone. Not atomic (read, then unlink): it runs when
/// this process exits, when no upgrade of its own can write the file any more.
pub(crate) fn remove_pid_file_naming(path: &Path, pid: u32) -> std::io::Result<bool> {
    match std::fs::read_to_string(path) {
        Ok(content) if content.trim() == pid.to_string() => {
            std::fs::remove_file(path).map(|_| true)
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::{remove_pid_file_naming, write_pid_file};

    #[test]
    fn only_a_pid_file_naming_this_process_is_removed() {
        let dir = std::env::temp_dir().join(format!("ringflip-pidrm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("x.pid");
        std::fs::write(&path, "22\n").unwrap();
        assert!(!remove_pid_file_naming(&path, 11).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "22\n");
        assert!(remove_pid_file_naming(&path, 22).unwrap());
        assert!(!path.exists());
        assert!(!remove_pid_file_naming(&path, 22).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
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
