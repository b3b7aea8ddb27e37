//! Named listening sockets: bound fresh on first start, adopted from the parent after an
//! upgrade, and validated before use.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::socket::{getsockname, SockaddrLike, SockaddrStorage, UnixAddr};

use crate::error::Error;
use crate::handoff::{ListenerRecord, SocketKind};
use crate::sys;

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// TCP over IPv4 or IPv6.
    Tcp(SocketAddr),
    /// A Unix stream socket bound to a path.
    Unix(PathBuf),
    /// A Unix stream socket in the abstract namespace (no file).
    UnixAbstract(Vec<u8>),
}

impl Endpoint {
    fn kind(&self) -> SocketKind {
        match self {
            Endpoint::Tcp(_) => SocketKind::Tcp,
            Endpoint::Unix(_) | Endpoint::UnixAbstract(_) => SocketKind::Unix,
        }
    }

    /// Whether a socket bound at `self` satisfies a request for `wanted` (TCP port 0: any).
    fn satisfies(&self, wanted: &Endpoint) -> bool {
        match (wanted, self) {
            (Endpoint::Tcp(w), Endpoint::Tcp(a)) => {
                w.ip() == a.ip() && (w.port() == 0 || w.port() == a.port())
            }
            (w, a) => w == a,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::UnixAbstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

/// A listening socket the server accepts on.
#[derive(Debug)]
pub(crate) struct Listener {
    pub name: Arc<str>,
    pub fd: OwnedFd,
    pub endpoint: Endpoint,
    /// Known to listen when made: adopted and activated sockets are checked to, a bound one
    /// listens unless its listen was deferred (`Driver::listen_deferred`); see [`Listening`].
    pub listens: bool,
}

/// Whether a listener listens, remembered once it does. Asked of the kernel (`SO_ACCEPTCONN`)
/// only until it says yes: a socket that listens never stops here, and a member of a per-worker
/// group whose listen was deferred (`Driver::listen_deferred`) may be made to listen by another
/// thread's handoff meanwhile. A syscall per listener is what a process with thousands would
/// pay at every handoff and sweep.
#[derive(Debug)]
pub(crate) struct Listening(std::cell::Cell<bool>);

impl Listening {
    /// Starts from what is known (`Listener::listens`).
    pub(crate) fn new(known: bool) -> Listening {
        Listening(std::cell::Cell::new(known))
    }

    /// Whether `fd`, the listener this is about, listens now.
    pub(crate) fn check(&self, fd: BorrowedFd<'_>) -> bool {
        if !self.0.get() {
            self.0.set(sys::is_listening(fd).unwrap_or(true));
        }
        self.0.get()
    }
}

/// Sets options on a new TCP socket between `socket()` and `bind()` (see
/// `Builder::listen_tcp_with`).
#[derive(Clone)]
pub(crate) struct SocketSetup(pub Arc<SetupFn>);

type SetupFn = dyn Fn(&socket2::Socket) -> io::Result<()> + Send + Sync;

impl fmt::Debug for SocketSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SocketSetup(Fn)")
    }
}

/// What the application asked for.
#[derive(Clone, Debug)]
pub(crate) struct ListenSpec {
    pub name: String,
    pub endpoint: Endpoint,
    /// File mode for a Unix socket path (e.g. 0o600 for a control socket).
    pub mode: Option<u32>,
    /// Bind with SO_REUSEPORT: one member of a per-worker group (see `Builder::workers`).
    pub reuseport: bool,
    /// Run on a TCP socket before its bind (first start only: an inherited or activated
    /// socket keeps the options it has).
    pub setup: Option<SocketSetup>,
    /// The listen backlog (default: `net.core.somaxconn`).
    pub backlog: Option<u32>,
}

impl Listener {
    /// Binds a new listener, with the largest backlog the kernel allows; listens at once only
    /// if `listen` (see `Driver::listen_deferred` for the other case: a bound SO_REUSEPORT
    /// socket that does not listen is no member of the group yet, so the kernel queues nothing
    /// on it).
    pub(crate) fn bind_with(spec: &ListenSpec, listen: bool) -> Result<Listener, Error> {
        let bind_err = |source| Error::Bind {
            name: spec.name.clone(),
            addr: spec.endpoint.to_string(),
            source,
        };
        // std binds with SOCK_CLOEXEC (and SO_REUSEADDR for TCP), but with a backlog of 128,
        // which a burst overflows (clients then wait for SYN retransmits, 1 s and more).
        // listen() again on a listening socket only raises the backlog.
        let fd = match &spec.endpoint {
            Endpoint::Tcp(addr) => {
                bind_tcp(*addr, spec.reuseport, spec.setup.as_ref()).map_err(bind_err)?
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(path).map_err(bind_err)?;
                bind_unix(path, spec.mode).map_err(bind_err)?
            }
            Endpoint::UnixAbstract(name) => {
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(bind_err)?;
                OwnedFd::from(UnixListener::bind_addr(&addr).map_err(bind_err)?)
            }
        };
        if listen {
            let backlog = spec
                .backlog
                .map_or_else(sys::somaxconn, |b| i32::try_from(b).unwrap_or(i32::MAX));
            sys::listen(fd.as_fd(), backlog).map_err(bind_err)?;
        }
        let endpoint = local_endpoint(fd.as_fd(), spec.endpoint.kind()).map_err(bind_err)?;
        Ok(Listener {
            name: spec.name.as_str().into(),
            fd,
            endpoint,
            listens: listen,
        })
    }

    /// Adopts an fd received from the parent after checking that it is what the record says
    /// (a listening stream socket of that kind, bound to the recorded address) and what the
    /// application asks for now.
    pub(crate) fn adopt(
        spec: &ListenSpec,
        record: &ListenerRecord,
        fd: OwnedFd,
    ) -> Result<Listener, Error> {
        let invalid = |why: String| Error::InvalidListener {
            name: spec.name.clone(),
            why,
        };
        let kind = spec.endpoint.kind();
        if record.kind != kind {
            return Err(invalid(format!(
                "handed over as {:?}, configured as {kind:?}",
                record.kind
            )));
        }
        let endpoint = listening_endpoint(fd.as_fd(), kind).map_err(invalid)?;
        if endpoint.to_string() != record.address {
            return Err(invalid(format!(
                "bound to {endpoint}, but the parent described it as {}",
                record.address
            )));
        }
        if !endpoint.satisfies(&spec.endpoint) {
            return Err(invalid(format!(
                "inherited socket is bound to {endpoint}, but this binary is configured for {}; \
                 changing a listener's address needs a restart",
                spec.endpoint
            )));
        }
        Ok(Listener {
            name: spec.name.as_str().into(),
            fd,
            endpoint,
            listens: true,
        })
    }

    /// Adopts a socket passed by systemd socket activation, if it is a listening socket that
    /// fits `spec`.
    pub(crate) fn adopt_activated(spec: &ListenSpec, fd: OwnedFd) -> Result<Listener, Error> {
        let invalid = |why: String| Error::InvalidListener {
            name: spec.name.clone(),
            why: format!("socket from systemd: {why}"),
        };
        let endpoint = listening_endpoint(fd.as_fd(), spec.endpoint.kind()).map_err(invalid)?;
        if !endpoint.satisfies(&spec.endpoint) {
            return Err(invalid(format!(
                "bound to {endpoint}, but this binary is configured for {}",
                spec.endpoint
            )));
        }
        // A worker's member of a SO_REUSEPORT group: the others (made by systemd too, or bound
        // later by a successor with more workers) can join the port only if it has the option,
        // and, for TCP, only with the same uid as its owner (systemd: root; so a service with
        // `User=` cannot add members at an upgrade: its worker count is the units').
        if spec.reuseport && !socket2::SockRef::from(&fd).reuse_port().unwrap_or(false) {
            return Err(invalid(
                "one member per worker needs SO_REUSEPORT: set ReusePort=yes in the .socket unit"
                    .into(),
            ));
        }
        Ok(Listener {
            name: spec.name.as_str().into(),
            fd,
            endpoint,
            listens: true,
        })
    }

    /// Whether an unnamed activated socket is the one `spec` asks for (same kind and address).
    pub(crate) fn fits(spec: &ListenSpec, fd: BorrowedFd<'_>) -> bool {
        listening_endpoint(fd, spec.endpoint.kind()).is_ok_and(|e| e.satisfies(&spec.endpoint))
    }

    /// The record describing this listener in HELLO.
    pub(crate) fn record(&self) -> ListenerRecord {
        ListenerRecord {
            name: self.name.to_string(),
            kind: self.endpoint.kind(),
            address: self.endpoint.to_string(),
        }
    }
}

/// A TCP socket with SO_REUSEADDR (as std binds), SO_REUSEPORT if `reuseport`, then the
/// application's `setup`, bound (CLOEXEC; the caller listens).
fn bind_tcp(addr: SocketAddr, reuseport: bool, setup: Option<&SocketSetup>) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    // socket2 makes it close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if let Some(setup) = setup {
        (setup.0)(&socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the socket setup of listen_tcp_with: {e}"),
            )
        })?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The worker a listener belongs to: member `i` of a per-worker group is named `name#i`
/// (member 0 keeps the plain name), and goes to worker `i % workers`; everything else to 0.
pub(crate) fn worker_of(name: &str, workers: usize) -> usize {
    name.rsplit_once('#')
        .and_then(|(_, i)| i.parse::<usize>().ok())
        .map_or(0, |i| i % workers.max(1))
}

/// The name of member `i` of the per-worker group of listener `name`.
pub(crate) fn member_name(name: &str, i: usize) -> String {
    if i == 0 {
        name.to_string()
    } else {
        format!("{name}#{i}")
    }
}

/// Where `fd` listens, once it is checked to be a listening stream socket of `kind`. Three
/// syscalls, not four: the local address's family tells the domain (a successor checks every
/// listener handed over, thousands for some services; `SO_DOMAIN` was a fourth).
fn listening_endpoint(fd: BorrowedFd<'_>, kind: SocketKind) -> Result<Endpoint, String> {
    let ty = sys::socket_type(fd).map_err(|e| format!("not a socket: {e}"))?;
    if ty != libc::SOCK_STREAM {
        return Err(format!("socket type {ty}, expected a stream socket"));
    }
    let endpoint =
        local_endpoint(fd, kind).map_err(|e| format!("does not fit a {kind:?} listener: {e}"))?;
    if !sys::is_listening(fd).map_err(|e| format!("SO_ACCEPTCONN: {e}"))? {
        return Err("the socket is not listening".into());
    }
    Ok(endpoint)
}

fn local_endpoint(fd: BorrowedFd<'_>, kind: SocketKind) -> io::Result<Endpoint> {
    match kind {
        SocketKind::Tcp => sys::local_inet_addr(fd).map(Endpoint::Tcp),
        SocketKind::Udp | SocketKind::Raw | SocketKind::Elder | SocketKind::Unknown(_) => Err(
            io::Error::new(io::ErrorKind::InvalidInput, "not a listener kind"),
        ),
        SocketKind::Unix => {
            let addr: SockaddrStorage = getsockname(fd.as_raw_fd())?;
            let Some(addr) = addr.as_unix_addr() else {
                let family = addr.family().map_or(-1, |f| f as i32);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("address family {family} is not AF_UNIX"),
                ));
            };
            if let Some(path) = addr.path() {
                Ok(Endpoint::Unix(path.to_path_buf()))
            } else if let Some(name) = addr.as_abstract() {
                Ok(Endpoint::UnixAbstract(name.to_vec()))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unnamed Unix socket",
                ))
            }
        }
    }
}

/// A Unix stream socket bound at `path`, its file created with `mode` if given.
///
/// With a mode, the file never exists with any other: the mode is set on the socket before
/// `bind` creates the file. The kernel creates a Unix socket's file with the mode of the
/// socket's own inode less the umask (`unix_bind_bsd`: `S_IFSOCK | (SOCK_INODE(sock)->i_mode &
/// ~current_umask())`), and `fchmod` on the unbound socket sets that inode's mode (checked
/// here: 0600 with a umask of 0; `listener::tests::a_unix_socket_with_a_mode_is_created_with_it`).
/// A `chmod` after the bind would leave the file open to others between the two.
fn bind_unix(path: &std::path::Path, mode: Option<u32>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(mode) = mode {
        nix::sys::stat::fchmod(
            fd.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(mode as nix::libc::mode_t),
        )?;
    }
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// A socket file left by a process that died is in the way of bind(); anything else at that
/// path is not ours to remove.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only stale if nobody listens on it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process listens on this socket",
                ));
            }
            std::fs::remove_file(path)
        }
        _ => Ok(()),
    }
}

/// A UDP socket handed over with the listeners (both processes may read it while the old one
/// drains; nothing is accepted on it).
#[derive(Debug)]
pub(crate) struct UdpSocketEntry {
    pub name: String,
    pub socket: std::net::UdpSocket,
}

impl UdpSocketEntry {
    pub(crate) fn bind(name: &str, addr: SocketAddr) -> Result<UdpSocketEntry, Error> {
        let socket = std::net::UdpSocket::bind(addr).map_err(|source| Error::Bind {
            name: name.into(),
            addr: addr.to_string(),
            source,
        })?;
        Ok(UdpSocketEntry {
            name: name.into(),
            socket,
        })
    }

    /// Adopts a UDP socket from the parent after checking its type and address.
    pub(crate) fn adopt(
        name: &str,
        wanted: SocketAddr,
        record: &ListenerRecord,
        fd: OwnedFd,
    ) -> Result<UdpSocketEntry, Error> {
        let invalid = |why: String| Error::InvalidListener {
            name: name.into(),
            why,
        };
        let ty = sys::socket_type(fd.as_fd()).map_err(|e| invalid(format!("not a socket: {e}")))?;
        if ty != libc::SOCK_DGRAM {
            return Err(invalid(format!(
                "socket type {ty}, expected a datagram socket"
            )));
        }
        let addr = sys::local_inet_addr(fd.as_fd()).map_err(|e| invalid(e.to_string()))?;
        if addr.to_string() != record.address {
            return Err(invalid(format!(
                "bound to {addr}, but the parent described it as {}",
                record.address
            )));
        }
        if !Endpoint::Tcp(addr).satisfies(&Endpoint::Tcp(wanted)) {
            return Err(invalid(format!(
                "inherited socket is bound to {addr}, but this binary is configured for {wanted}"
            )));
        }
        Ok(UdpSocketEntry {
            name: name.into(),
            socket: std::net::UdpSocket::from(fd),
        })
    }

    pub(crate) fn record(&self) -> ListenerRecord {
        ListenerRecord {
            name: self.name.clone(),
            kind: SocketKind::Udp,
            address: self
                .socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket handed over or activated is taken only if it is a listening stream socket of
    /// the kind configured, and where it listens is read from it; each refusal says why.
    #[test]
    fn only_a_listening_stream_socket_of_the_kind_is_taken() {
        use std::net::{TcpListener, UdpSocket};
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        assert_eq!(
            listening_endpoint(tcp.as_fd(), SocketKind::Tcp),
            Ok(Endpoint::Tcp(tcp_addr))
        );
        let dir = std::env::temp_dir().join(format!("ringflip-le-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        assert_eq!(
            listening_endpoint(unix.as_fd(), SocketKind::Unix),
            Ok(Endpoint::Unix(path.clone()))
        );

        let refusal = |fd: BorrowedFd<'_>, kind| listening_endpoint(fd, kind).unwrap_err();
        let not_socket = std::fs::File::open("/dev/null").unwrap();
        assert!(refusal(not_socket.as_fd(), SocketKind::Tcp).starts_with("not a socket"));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(refusal(udp.as_fd(), SocketKind::Tcp).contains("expected a stream socket"));
        assert!(refusal(unix.as_fd(), SocketKind::Tcp).contains("is not IPv4 or IPv6"));
        assert!(refusal(tcp.as_fd(), SocketKind::Unix).contains("is not AF_UNIX"));
        let bound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        assert_eq!(
            refusal(bound.as_fd(), SocketKind::Tcp),
            "the socket is not listening"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn per_worker_members_are_named_and_assigned_by_index() {
        assert_eq!(member_name("web", 0), "web");
        assert_eq!(member_name("web", 3), "web#3");
        assert_eq!(worker_of("web", 4), 0);
        assert_eq!(worker_of("web#3", 4), 3);
        // More members than workers (the previous binary ran more): wrap around, none closed.
        assert_eq!(worker_of("web#5", 4), 1);
        assert_eq!(worker_of("web#5", 1), 0);
        assert_eq!(worker_of("ringflip.control", 4), 0);
        assert_eq!(worker_of("odd#name", 2), 0);
    }

    /// A Unix socket with a mode (the control socket's 0600) is created with that mode: no
    /// moment in which another user could connect to it. Watched with inotify: the file must
    /// appear (IN_CREATE) and never have its attributes changed afterwards (IN_ATTRIB, which a
    /// chmod after the bind would cause), even with a umask of 0.
    #[test]
    fn a_unix_socket_with_a_mode_is_created_with_it() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = std::env::temp_dir().join(format!("ringflip-sockmode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        inotify
            .add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ATTRIB)
            .unwrap();
        let spec = ListenSpec {
            name: "ctl".into(),
            endpoint: Endpoint::Unix(path.clone()),
            mode: Some(0o600),
            reuseport: false,
            setup: None,
            backlog: None,
        };
        let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let listener = Listener::bind_with(&spec, true);
        nix::sys::stat::umask(old_umask);
        let _listener = listener.unwrap();
        let events = inotify.read_events().unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.mask).collect();
        assert!(
            kinds.iter().any(|m| m.contains(AddWatchFlags::IN_CREATE)),
            "{kinds:?}"
        );
        assert!(
            !kinds.iter().any(|m| m.contains(AddWatchFlags::IN_ATTRIB)),
            "the socket's mode was changed after it was created (it existed with another): \
             {kinds:?}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
