//! Tests of `spawn.rs`: what the new process gets, and what a failed spawn leaves.
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
/// without `FD_CLOEXEC`). Its signal mask is empty and SIGPIPE is not ignored. The same
/// with the fallback that copies the table.
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
    // (sharing the table first, close_range refused on the spawning thread)
    let cases = [(true, false), (false, false), (true, true)];
    // (The filter below is written for x86_64.)
    let cases = cases
        .iter()
        .filter(|c| !c.1 || cfg!(target_arch = "x86_64"));
    for &(share_table, no_close_range) in cases {
        let args: Vec<OsString> = ["sleep", "30"].iter().map(OsString::from).collect();
        let mut handled = SigSet::empty();
        handled.add(nix::sys::signal::Signal::SIGHUP);
        let spawn = move || {
            if no_close_range {
                refuse_close_range_on_this_thread();
            }
            spawn_with(
                Path::new("/bin/sleep"),
                &args,
                &EnvOverrides::default(),
                UpgradeId(7),
                &handled,
                share_table,
            )
            .unwrap()
        };
        // On a thread of its own: the filter stays with the thread that installs it.
        let child = std::thread::spawn(spawn).join().unwrap();
        // What the child holds once `sleep` sleeps: right after exec, the dynamic loader
        // briefly holds the files it maps (at fd 4). A leaked fd never goes away.
        let fds_of = |pid: u32| -> Vec<u32> {
            let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
                .collect();
            fds.sort_unstable();
            fds
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut fds = fds_of(child.pid);
        while fds != [0, 1, 2, 3] && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            fds = fds_of(child.pid);
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
        sys::kill(child.pid, libc::SIGKILL).unwrap();
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid as i32), None).unwrap();
        assert_eq!(
            fds,
            [0, 1, 2, 3],
            "sharing the table first: {share_table}, close_range refused: {no_close_range}"
        );
        assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
        // SIGPIPE, ignored here (the Rust runtime), has its default action again there.
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{status}");
    }
    drop(inheritable);
}

/// Makes `close_range` fail with ENOSYS on the calling thread and the children it starts
/// (as on a kernel before 5.9, or under a seccomp filter that does not know it): a
/// seccomp filter, which stays with the thread that installs it.
fn refuse_close_range_on_this_thread() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
        jt,
        jf,
        k,
    };
    // BPF_LD | BPF_W | BPF_ABS = 0x20, BPF_RET | BPF_K = 0x06; seccomp_data: nr at 0,
    // arch at 4.
    let program = [
        stmt(0x20, 4),
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(0x20, 0),
        jeq(libc::SYS_close_range as u32, 0, 1),
        stmt(0x06, 0x0005_0000 | libc::ENOSYS as u32), // SECCOMP_RET_ERRNO | ENOSYS
        stmt(0x06, 0x7fff_0000),                       // SECCOMP_RET_ALLOW
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: two prctl calls on memory that outlives them.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ),
            0
        );
        assert_eq!(
            libc::syscall(libc::SYS_close_range, 1000, 1000, 0),
            -1,
            "the filter refuses close_range"
        );
    }
}

/// An exec that fails is the spawn's own error, as `posix_spawn` reported it, and leaves
/// no copy of the child's end of the channel here (the slot holds its placeholder again).
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
