//! The [`Builder`] options of how a service is deployed: what an upgrade starts (binary,
//! arguments, environment), and how its sockets are made on first start (socket options,
//! backlog).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::access::ControlAccess;
use crate::error::Error;
use crate::launch;
use crate::listener::{Endpoint, SocketSetup};

use super::Builder;

impl Builder {
    /// Like [`Builder::listen_tcp`], with `setup` run on the new socket between `socket()` and
    /// `bind()` (after SO_REUSEADDR, and SO_REUSEPORT for [`Builder::workers`]' members, are
    /// set; `listen()` comes later, with [`Builder::listen_backlog`]): for IPV6_V6ONLY,
    /// TCP_FASTOPEN, TCP_DEFER_ACCEPT, SO_BINDTODEVICE, IP_FREEBIND, buffer sizes…
    ///
    /// `setup` runs only where this process makes the socket (first start; with workers, once
    /// per member of the group). **A socket inherited at an upgrade keeps the options it was
    /// made with: `setup` does not run again in the new process,** nor on a socket passed by
    /// systemd (set those in the `.socket` unit). Changing them needs a restart (or a new
    /// listener name). An error from `setup` fails [`Builder::build`] as a bind error.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), ringflip::Error> {
    /// use std::os::fd::AsRawFd;
    /// let server = ringflip::Server::builder()
    ///     .listen_tcp_with("web", "[::]:8080".parse().unwrap(), |socket| {
    ///         socket.set_only_v6(true)?; // IPV6_V6ONLY
    ///         socket.set_freebind_v6(true)?; // IP_FREEBIND: bind before the address is up
    ///         // Options socket2 has no setter for: setsockopt on the raw fd.
    ///         let secs: libc::c_int = 5;
    ///         // SAFETY: a valid socket, and a pointer to an int of the size passed.
    ///         let rc = unsafe {
    ///             libc::setsockopt(
    ///                 socket.as_raw_fd(),
    ///                 libc::IPPROTO_TCP,
    ///                 libc::TCP_DEFER_ACCEPT,
    ///                 (&secs as *const libc::c_int).cast(),
    ///                 std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ///             )
    ///         };
    ///         if rc != 0 {
    ///             return Err(std::io::Error::last_os_error());
    ///         }
    ///         Ok(())
    ///     })
    ///     .listen_backlog(1024)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn listen_tcp_with(
        self,
        name: impl Into<String>,
        addr: SocketAddr,
        setup: impl Fn(&socket2::Socket) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        let mut builder = self.listen(name, Endpoint::Tcp(addr), None);
        if let Some(spec) = builder.listeners.last_mut() {
            spec.setup = Some(SocketSetup(Arc::new(setup)));
        }
        builder
    }

    /// The backlog this process's listeners are made with (`listen(2)`; default
    /// `net.core.somaxconn`, which also caps it). Like the socket options of
    /// [`Builder::listen_tcp_with`], it is set where the socket is made: an inherited socket
    /// keeps the backlog it has; a member added to a per-worker group by an upgrade to more
    /// workers listens with this process's `listen_backlog`.
    pub fn listen_backlog(mut self, backlog: u32) -> Self {
        self.backlog = Some(backlog);
        self
    }

    /// The binary an upgrade starts.
    ///
    /// By default, the path this process was started with, as its `argv[0]` gave it:
    /// absolute as given; relative with a slash (`./current/app`), joined to the working
    /// directory at [`build`](Builder::build) (call `build` before any `chdir`); a bare name
    /// (`app`), found in `PATH` as the shell found it. It is never resolved through symlinks
    /// (nor `/proc/self/exe`): each upgrade execs that path anew, so a symlink deploy works —
    /// start the service as `/srv/app/current/app` with `current -> releases/v1`, point
    /// `current` at `releases/v2`, send SIGHUP, and v2 starts. (Only when `argv[0]` names
    /// nothing that can be found is `std::env::current_exe()` used, with a warning.)
    ///
    /// **Pitfall:** the path is read at each upgrade, not kept open. Deploy a new binary as a
    /// new file (a new release directory, or a write beside it then `rename` over the old
    /// name). Writing into the running binary's file fails (`ETXTBSY`) or, through a tool that
    /// truncates and rewrites, can leave a half-written file that the next upgrade starts; a
    /// deleted binary (or release directory cleaned up too early) makes the upgrade fail
    /// (`ENOENT`) — the running process keeps serving, nothing falls back to the old binary.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The new process's arguments after `argv[0]` (default: this process's own). `argv[0]`
    /// stays the one described in [`Builder::binary`].
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `key` to `value` in the new process's environment.
    ///
    /// By default the new process gets this process's environment *as it is at the upgrade*
    /// (what `std::env::set_var` changed included), not that of whoever sent the SIGHUP: a
    /// deploy that changes an `EnvironmentFile` or a shell's exports reaches the new binary
    /// only through this, [`Builder::env_remove`] or [`Builder::env_refresh`].
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.changes.push((key.into(), Some(value.into())));
        self
    }

    /// Removes `key` from the new process's environment.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.changes.push((key.as_ref().to_os_string(), None));
        self
    }

    /// Refreshes the new process's environment at each upgrade: `hook` gets the environment
    /// it would have (this process's, with [`Builder::env`] and [`Builder::env_remove`]
    /// applied) and may change it, e.g. re-read an env file the deploy rewrote. It runs on the
    /// thread that starts the new binary; if it panics, the upgrade fails and this process
    /// keeps serving. ringflip's own variables (`RINGFLIP_*`) and socket activation's
    /// (`LISTEN_*`) are set or removed after it, whatever it does.
    ///
    /// ```no_run
    /// let builder = ringflip::Server::builder()
    ///     .listen_tcp("web", "0.0.0.0:8080".parse().unwrap())
    ///     .env_refresh(|env| {
    ///         // KEY=VALUE lines a deploy script rewrites before `kill -HUP`.
    ///         let text = std::fs::read_to_string("/srv/app/env").unwrap_or_default();
    ///         for line in text.lines() {
    ///             if let Some((k, v)) = line.split_once('=') {
    ///                 env.insert(k.into(), v.into());
    ///             }
    ///         }
    ///     });
    /// ```
    pub fn env_refresh(
        mut self,
        hook: impl Fn(&mut BTreeMap<OsString, OsString>) + Send + Sync + 'static,
    ) -> Self {
        self.env.hook = Some(Arc::new(hook));
        self
    }

    /// Also serve the control socket ([`Builder::control_socket`]) to peers of uid `uid`
    /// (repeatable). The socket file then has mode 0666: anyone can connect, and the peer's
    /// credentials (`SO_PEERCRED`, taken by the kernel at `connect`) decide; a peer refused
    /// gets `refused: …` and nothing happens. Root and the service's own uid are always
    /// served.
    pub fn control_socket_allow_uid(mut self, uid: u32) -> Self {
        self.control_access.uids.push(uid);
        self
    }

    /// Also serve the control socket to peers whose group or one of whose supplementary
    /// groups is `gid` (repeatable; `SO_PEERGROUPS`). Without an allowed uid, the socket file
    /// has mode 0660 and belongs to the first allowed gid (the service must be able to
    /// `chown` it to that group: be a member, or have CAP_CHOWN), so only the owner and that
    /// group can connect.
    ///
    /// ```no_run
    /// let server = ringflip::Server::builder()
    ///     .listen_tcp("web", "0.0.0.0:8080".parse().unwrap())
    ///     .control_socket("/run/app/control.sock")
    ///     .control_socket_allow_gid(998) // the `deploy` group
    ///     .build()?;
    /// # Ok::<(), ringflip::Error>(())
    /// ```
    pub fn control_socket_allow_gid(mut self, gid: u32) -> Self {
        self.control_access.gids.push(gid);
        self
    }

    /// What an upgrade starts: the binary, and the arguments (`argv[0]` included), from this
    /// process's `argv`.
    pub(super) fn successor_command(&self, argv: Vec<OsString>) -> (PathBuf, Vec<OsString>) {
        let given0 = argv.first().cloned().unwrap_or_default();
        let (exe, argv0) = match &self.binary {
            Some(path) => (path.clone(), given0),
            None => {
                let cwd = std::env::current_dir().ok();
                let path_var = std::env::var_os("PATH");
                match launch::default_binary(&given0, cwd.as_deref(), path_var.as_deref()) {
                    Some(found) => found,
                    None => {
                        let exe = std::env::current_exe().unwrap_or_default();
                        tracing::warn!(
                            argv0 = ?given0,
                            binary = %exe.display(),
                            "argv[0] names no binary that can be found; upgrades will start \
                             this process's resolved executable (set Builder::binary)"
                        );
                        (exe, given0)
                    }
                }
            }
        };
        let rest = match &self.args {
            Some(args) => args.clone(),
            None => argv.into_iter().skip(1).collect(),
        };
        (exe, std::iter::once(argv0).chain(rest).collect())
    }
}

/// Gives the control socket file at `path` the mode and group `access` asks for, whether this
/// process bound it or inherited it (a new binary may allow others than the old one did).
pub(super) fn set_control_file_access(
    path: &std::path::Path,
    access: &ControlAccess,
) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(path).map_err(Error::io("the control socket file"))?;
    if !meta.file_type().is_socket() {
        return Err(Error::Config(format!(
            "{} is not the control socket",
            path.display()
        )));
    }
    if let Some(gid) = access.file_group() {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .map_err(Error::io("giving the control socket file its group"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.file_mode()))
        .map_err(Error::io("setting the control socket file's mode"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_successor_command_comes_from_argv_unless_overridden() {
        let argv = os(&["/srv/app/current/app", "--port", "80"]);
        let (exe, args) = Builder::default().successor_command(argv.clone());
        assert_eq!(exe, PathBuf::from("/srv/app/current/app"));
        assert_eq!(args, argv);

        let (exe, args) = Builder::default()
            .binary("/opt/app/bin/app")
            .args(["--port", "81"])
            .successor_command(argv);
        assert_eq!(exe, PathBuf::from("/opt/app/bin/app"));
        assert_eq!(args, os(&["/srv/app/current/app", "--port", "81"]));
    }
}
