//! `ringflip-ctl --socket PATH upgrade|status [--timeout SECS]`: asks a ringflip service on its
//! control socket for an upgrade (and waits for the outcome) or its status.
//!
//! `upgrade` prints the new pid and exits 0 only when the new process is READY and serves.
//! Otherwise the reason goes to stderr and the exit status says what happened:
//! - 1: the upgrade was tried and failed (`failed: <code>: <reason>`); the old process serves;
//! - 2: refused, nothing was started (`busy: <code>: <reason>`, e.g. an upgrade already in
//!   flight, or `refused: …` for a peer the service does not allow);
//! - 3: could not ask: nothing listens at PATH, no permission, no answer within `--timeout`
//!   (the upgrade may then still be under way: ask `status`), or an unexpected answer;
//! - 64: bad arguments.
//!
//! `status` prints `phase=… pid=… generation=… live=…` and exits 0 (3 if it cannot ask).
//!
//! `--timeout SECS` (default 120) bounds the whole exchange, connect included. The server
//! answers an upgrade once the new process is READY or the upgrade failed, which it bounds by its
//! own ready timeout (30 s by default); keep `--timeout` above that, or a slow good upgrade is
//! reported as unanswered. Made for `ExecReload=` in a systemd unit:
//!
//! ```text
//! ExecReload=/usr/local/bin/ringflip-ctl --socket /run/app/control.sock upgrade --timeout 60
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ringflip::control_client::{run, Command, DEFAULT_TIMEOUT, EXIT_USAGE};

const USAGE: &str = "usage: ringflip-ctl --socket PATH upgrade|status [--timeout SECS]";

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(Some((socket, command, timeout))) => run("ringflip-ctl", &socket, command, timeout),
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("ringflip-ctl: {why}\n{USAGE}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `Ok(None)` for `--help`.
#[allow(clippy::type_complexity)]
fn parse(
    mut args: impl Iterator<Item = String>,
) -> Result<Option<(PathBuf, Command, Duration)>, String> {
    let (mut socket, mut command, mut timeout) = (None, None, DEFAULT_TIMEOUT);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--socket" => {
                socket = Some(PathBuf::from(args.next().ok_or("--socket needs a PATH")?));
            }
            "--timeout" => {
                let secs = args.next().ok_or("--timeout needs SECS")?;
                timeout = secs
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .filter(|t| !t.is_zero())
                    .ok_or(format!(
                        "--timeout {secs:?}: not a positive number of seconds"
                    ))?;
            }
            word if command.is_none() && !word.starts_with('-') => {
                command = Some(Command::parse(word).ok_or(format!("unknown command {word:?}"))?);
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let socket = socket.ok_or("--socket PATH is required")?;
    let command = command.ok_or("a command is required: upgrade or status")?;
    Ok(Some((socket, command, timeout)))
}
