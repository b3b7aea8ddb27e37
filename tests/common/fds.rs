//! A process's fd table, from `/proc/PID/fdinfo` and `/proc/PID/fd`.

use std::fs;

/// `(fd, flags)` for every fd of `pid`, from `/proc/PID/fdinfo/FD`, sorted by fd.
pub fn fds_of(pid: i32) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    let rd = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fdinfo: {e}"));
    for e in rd.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        }; // closed meanwhile
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags: line in /proc/{pid}/fdinfo/{fd}: {text:?}"));
        out.push((fd, flags));
    }
    out.sort();
    out
}

/// What fd `fd` of `pid` refers to (`readlink /proc/PID/fd/FD`).
pub fn fd_target(pid: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}
