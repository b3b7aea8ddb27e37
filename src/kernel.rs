//! Whether this process can have the io_uring ringflip needs, and if not, why, in words an
//! operator can act on. `Builder::build` checks it first, so a service without io_uring fails
//! at start with the cause, not at its first `run`.
//!
//! Where io_uring is missing: `io_uring_setup` fails with `EPERM` when the
//! `kernel.io_uring_disabled` sysctl is 2 (or 1 and the process is neither privileged nor in
//! `kernel.io_uring_group`), or when a seccomp filter refuses it (the default profiles of
//! Docker, containerd and Podman do); with `ENOSYS` on a kernel built without it (or one
//! older than 5.1, or a filter that answers so); with `EINVAL` for the ring flags on a kernel
//! older than 6.1 (`SINGLE_ISSUER | DEFER_TASKRUN`).

use std::io;

use io_uring::IoUring;

use crate::error::Error;

/// Makes (and drops) a ring with the flags the driver uses.
pub(crate) fn check_io_uring() -> Result<(), Error> {
    IoUring::<io_uring::squeue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(2)
        .map(drop)
        .map_err(|e| ring_setup_error(&e))
}

/// `Error::Unsupported` for a failed `io_uring_setup`, naming the likely cause.
pub(crate) fn ring_setup_error(e: &io::Error) -> Error {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Error::Unsupported(explain(e, sysctl, &release))
}

/// The message for `e`, given `kernel.io_uring_disabled` (if readable) and the kernel release.
fn explain(e: &io::Error, io_uring_disabled: Option<u32>, release: &str) -> String {
    let cause = match e.raw_os_error() {
        Some(libc::EPERM) => match io_uring_disabled {
            Some(2) => "io_uring is disabled by the sysctl kernel.io_uring_disabled=2".to_string(),
            Some(1) => "io_uring is restricted by the sysctl kernel.io_uring_disabled=1 to \
                        processes with CAP_SYS_ADMIN or in the group kernel.io_uring_group"
                .to_string(),
            _ => "io_uring_setup is refused, most likely by a seccomp filter (the default \
                  profiles of Docker, containerd and Podman block io_uring; allow \
                  io_uring_setup, io_uring_enter and io_uring_register)"
                .to_string(),
        },
        Some(libc::ENOSYS) => format!(
            "this kernel ({release}) has no io_uring (built without CONFIG_IO_URING), or a \
             seccomp filter hides it"
        ),
        Some(libc::EINVAL) => format!(
            "this kernel ({release}) refuses an io_uring with SINGLE_ISSUER|DEFER_TASKRUN, \
             which needs Linux 6.1 or later"
        ),
        Some(libc::ENOMEM) => "not enough locked memory for the ring (RLIMIT_MEMLOCK; kernels \
                               before 5.12 charge rings to it)"
            .to_string(),
        _ => format!("io_uring with SINGLE_ISSUER|DEFER_TASKRUN (Linux 6.1+), kernel {release}"),
    };
    format!("{cause}: io_uring_setup: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn each_setup_errno_names_its_likely_cause() {
        let m = explain(&errno(libc::EPERM), Some(2), "6.8.0");
        assert!(m.contains("kernel.io_uring_disabled=2"), "{m}");
        assert!(
            m.ends_with("io_uring_setup: Operation not permitted (os error 1)"),
            "{m}"
        );
        let m = explain(&errno(libc::EPERM), Some(1), "6.8.0");
        assert!(m.contains("kernel.io_uring_group"), "{m}");
        let m = explain(&errno(libc::EPERM), Some(0), "6.8.0");
        assert!(m.contains("seccomp") && m.contains("Docker"), "{m}");
        assert_eq!(m, explain(&errno(libc::EPERM), None, "6.8.0"));
        let m = explain(&errno(libc::ENOSYS), Some(0), "4.19.0");
        assert!(m.contains("(4.19.0) has no io_uring"), "{m}");
        let m = explain(&errno(libc::EINVAL), Some(0), "5.15.0");
        assert!(m.contains("(5.15.0)") && m.contains("6.1"), "{m}");
        let m = explain(&errno(libc::ENOMEM), Some(0), "5.10.0");
        assert!(m.contains("RLIMIT_MEMLOCK"), "{m}");
    }

    /// The error `build` gives: `Error::Unsupported`, its text starting "unsupported kernel".
    #[test]
    fn a_setup_error_is_unsupported() {
        let e = ring_setup_error(&errno(libc::ENOSYS));
        assert!(matches!(e, Error::Unsupported(_)));
        assert!(e.to_string().starts_with("unsupported kernel: "), "{e}");
    }

    /// This machine has the io_uring the driver needs (every other test depends on it).
    #[test]
    fn this_kernel_passes_the_check() {
        check_io_uring().unwrap();
    }
}
