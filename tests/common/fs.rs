//! Files: temp dirs, the example binaries, replacing an executable, reading a log's tail.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::spawn::writing_executable;

/// A fresh directory under the system temp dir; removed on drop (unless `RINGFLIP_KEEP_TEMP`).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "ringflip-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("RINGFLIP_KEEP_TEMP").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// `target/debug/examples/echo`, found from the test executable (`target/debug/deps/upgrade-*`),
/// or `$RINGFLIP_ECHO_BIN`.
pub fn echo_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGFLIP_ECHO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join("echo"))
        .expect("test executable is not under target/<profile>/deps");
    if !bin.is_file() {
        panic!(
            "echo example binary not found at {}: run `cargo build --example echo` \
             (or `cargo test`, which builds examples)",
            bin.display()
        );
    }
    bin
}

/// `target/<profile>/examples/<name>`, found from the test executable like [`echo_binary`].
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join(name))
        .expect("test executable is not under target/<profile>/deps");
    if !bin.is_file() {
        panic!(
            "example binary not found at {}: run `cargo build --examples` first",
            bin.display()
        );
    }
    bin
}

/// Writes `contents` to `path` atomically: a new file beside it, then `rename` over `path`
/// (a running binary is never written into).
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) {
    let tmp = path.with_extension("new");
    {
        let _no_fork = writing_executable();
        let mut f =
            fs::File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(contents).unwrap();
        f.sync_all().ok();
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// Last `max_bytes` of a file, as text.
pub fn file_tail(path: &Path, max_bytes: usize) -> String {
    match fs::read(path) {
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
        Ok(b) => {
            let from = b.len().saturating_sub(max_bytes);
            let mut s = String::from_utf8_lossy(&b[from..]).into_owned();
            if from > 0 {
                if let Some(nl) = s.find('\n') {
                    s.drain(..=nl);
                }
                s.insert_str(0, "[...]\n");
            }
            s
        }
    }
}
