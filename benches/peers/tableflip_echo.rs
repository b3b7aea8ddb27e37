//! Cloudflare's tableflip (Go) as a peer: `tableflip_echo.go` beside this file is an echo
//! server on tableflip, used as its documentation's TCP example does (`Upgrade` on SIGHUP,
//! `Fds.Listen`, `Ready`, `<-Exit()`), plus a connection count for the drain. The upgrade is
//! `Strategy::Signal`, as for ringflip: SIGHUP, then wait for the new process's pid file, which
//! tableflip writes when the new process calls `Ready`.
//!
//! The orchestrator builds the Go program once per bench run ([`build`]) with Debian's Go
//! toolchain and Debian's tableflip sources in GOPATH mode (no module download: this machine
//! reaches no Go proxy). `--serve tableflip` then execs it with the same arguments; tableflip
//! re-executes `os.Args[0]` at each upgrade, so it is exec'ed under its absolute path.
//!
//! The row is skipped when `go` or the package is missing:
//! `apt-get install golang-go golang-github-cloudflare-tableflip-dev`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Debian's Go toolchain.
pub const GO: &str = "/usr/bin/go";
/// Debian's GOPATH for Go library packages.
const GOPATH: &str = "/usr/share/gocode";
const TABLEFLIP_SRC: &str = "/usr/share/gocode/src/github.com/cloudflare/tableflip";

/// Whether this machine can build the tableflip peer.
pub fn available() -> bool {
    Path::new(GO).exists() && Path::new(TABLEFLIP_SRC).join("upgrader.go").exists()
}

/// Where the built server lives (cargo's scratch directory for benches).
fn binary() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("tableflip-echo")
}

/// Builds `tableflip_echo.go` (Go caches the build, so a second call is quick).
pub fn build() -> Result<(), String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/tableflip_echo.go");
    let out = Command::new(GO)
        .arg("build")
        .arg("-o")
        .arg(binary())
        .arg(&src)
        .env("GOPATH", GOPATH)
        .env("GO111MODULE", "off")
        .env("GOCACHE", tmp.join("go-cache"))
        .env("GOFLAGS", "")
        .output()
        .map_err(|e| format!("running {GO}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "go build {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `--serve tableflip`: replaces this process with the Go server, same arguments.
pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    let bin = binary();
    let err = Command::new(&bin).args(argv).exec();
    eprintln!(
        "tableflip peer: exec {}: {err} (built by the bench's orchestrator)",
        bin.display()
    );
    ExitCode::from(1)
}
