//! Named listening sockets: bound fresh on first start, adopted from the parent after an
//! upgrade, and validated before use.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::handoff::{ListenerRecord, SocketKind};
use crate::sys;
use crate::Error;

/// A listening socket the server accepts on.
#[derive(Debug)]
pub(crate) struct Listener {
    pub name: Arc<str>,
    pub fd: OwnedFd,
    pub addr: SocketAddr,
}

/// What the application asked for.
#[derive(Clone, Debug)]
pub(crate) struct ListenSpec {
    pub name: String,
    pub addr: SocketAddr,
}

impl Listener {
    /// Binds a new TCP listener with the largest backlog the kernel allows.
    pub(crate) fn bind(spec: &ListenSpec) -> Result<Listener, Error> {
        let bind_err = |source| Error::Bind {
            name: spec.name.clone(),
            addr: spec.addr,
            source,
        };
        // std binds with SO_REUSEADDR and SOCK_CLOEXEC, but with a backlog of 128, which a burst
        // overflows (clients then wait for SYN retransmits, 1 s and more). listen() again on a
        // listening socket only raises the backlog.
        let std = TcpListener::bind(spec.addr).map_err(bind_err)?;
        let fd = OwnedFd::from(std);
        sys::listen(fd.as_fd(), sys::somaxconn()).map_err(bind_err)?;
        let addr = sys::local_inet_addr(fd.as_fd()).map_err(bind_err)?;
        Ok(Listener {
            name: spec.name.as_str().into(),
            fd,
            addr,
        })
    }

    /// Adopts an fd received from the parent after checking that it is what the record says:
    /// a listening TCP socket bound to the recorded address; and that it matches what the
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
        let io_invalid = |what: &str, e: io::Error| invalid(format!("{what}: {e}"));
        if record.kind != SocketKind::Tcp {
            return Err(invalid(format!("handed over as {:?}", record.kind)));
        }
        let ty = sys::socket_type(fd.as_fd()).map_err(|e| io_invalid("not a socket", e))?;
        if ty != libc::SOCK_STREAM {
            return Err(invalid(format!(
                "socket type {ty}, expected a stream socket"
            )));
        }
        let domain = sys::socket_domain(fd.as_fd()).map_err(|e| io_invalid("SO_DOMAIN", e))?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(invalid(format!(
                "address family {domain}, expected IPv4/IPv6"
            )));
        }
        if !sys::is_listening(fd.as_fd()).map_err(|e| io_invalid("SO_ACCEPTCONN", e))? {
            return Err(invalid("the handed-over socket is not listening".into()));
        }
        let addr = sys::local_inet_addr(fd.as_fd()).map_err(|e| io_invalid("getsockname", e))?;
        if addr.to_string() != record.address {
            return Err(invalid(format!(
                "bound to {addr}, but the parent described it as {}",
                record.address
            )));
        }
        if !same_bind_address(spec.addr, addr) {
            return Err(invalid(format!(
                "inherited socket is bound to {addr}, but this binary is configured for {}; \
                 changing a listener's address needs a restart",
                spec.addr
            )));
        }
        Ok(Listener {
            name: spec.name.as_str().into(),
            fd,
            addr,
        })
    }

    /// The record describing this listener in HELLO.
    pub(crate) fn record(&self) -> ListenerRecord {
        ListenerRecord {
            name: self.name.to_string(),
            kind: SocketKind::Tcp,
            address: self.addr.to_string(),
        }
    }
}

/// Whether a socket bound at `actual` satisfies a request for `wanted` (port 0 means any).
fn same_bind_address(wanted: SocketAddr, actual: SocketAddr) -> bool {
    wanted.ip() == actual.ip() && (wanted.port() == 0 || wanted.port() == actual.port())
}
