//! Where a starting process gets its sockets: handed over by the previous process (started
//! as a successor), passed by systemd (socket activation), or bound here. Called by
//! `Builder::build` once the listener specs are known.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use crate::error::Error;
use crate::handoff::SocketKind;
use crate::inherit::state::StateStream;
use crate::inherit::{self, Inherited, PredecessorLink};
use crate::listener::{Endpoint, ListenSpec, Listener, UdpSocketEntry};
use crate::{sys, systemd};

/// What a starting process serves with, and what its predecessor handed it (nothing on a first
/// start).
pub(crate) struct Sockets {
    pub listeners: Vec<Listener>,
    pub parent: Option<PredecessorLink>,
    pub inherited_state: Option<StateStream>,
    pub elders: Vec<OwnedFd>,
    pub generation: u32,
    pub udp: Vec<UdpSocketEntry>,
    pub inherited_fds: Vec<(String, OwnedFd)>,
}

/// The listeners of `specs` and the UDP sockets of `udp_specs`: adopted from the previous
/// process when started as a successor, else taken from systemd or bound.
pub(crate) fn acquire(
    specs: &[ListenSpec],
    udp_specs: &[(String, SocketAddr)],
) -> Result<Sockets, Error> {
    // First, while the low fd numbers are free: the spawn of the next process copies only the
    // fds below this one (`spawn.rs`).
    crate::spawn::reserve_child_slot();
    match inherit::from_environment()? {
        Some(inherited) => adopt(inherited, specs, udp_specs),
        None => activate_or_bind(specs, udp_specs),
    }
}

/// A successor: every socket comes from the previous process, by name.
fn adopt(
    inherited: Inherited,
    specs: &[ListenSpec],
    udp_specs: &[(String, SocketAddr)],
) -> Result<Sockets, Error> {
    let mut udp = Vec::new();
    let mut inherited_fds = Vec::new();
    let inherited_state = Some(inherited.state);
    let elders = inherited.elders;
    let generation = inherited.generation;
    let upgrade = inherited.link.upgrade;
    tracing::info!(
        upgrade.id = %upgrade,
        parent = inherited.link.predecessor_pid,
        protocol.version = inherited.version,
        "started as a successor; adopting listeners"
    );
    let mut by_name: Vec<_> = inherited.listeners.into_iter().map(Some).collect();
    // The records of each name, in order: a lookup per spec, not a scan (with 10,000
    // listeners the scan was the successor's largest cost before READY: `perf` over
    // `benches/handover_scale.rs --curve listeners`).
    let mut index: HashMap<String, VecDeque<usize>> = HashMap::new();
    for (i, slot) in by_name.iter().enumerate() {
        if let Some((record, _)) = slot {
            index.entry(record.name.clone()).or_default().push_back(i);
        }
    }
    let mut listeners = Vec::with_capacity(specs.len());
    for spec in specs {
        let slot = index
            .get_mut(&spec.name)
            .and_then(VecDeque::pop_front)
            .map(|i| &mut by_name[i]);
        match slot {
            Some(slot) => {
                let (record, fd) = slot.take().expect("matched above");
                listeners.push(Listener::adopt(spec, &record, fd)?);
            }
            // A new member of a per-worker group (this binary runs more workers
            // than the previous one): it joins the inherited group, but listens
            // only once the previous process has let go (`listen_deferred` in the
            // driver): should this process fail before that, the kernel must not
            // have queued connections on a member that dies with it.
            None if spec.reuseport && spec.name.contains('#') => {
                listeners.push(bind_member(spec, &listeners, false)?);
            }
            None => {
                return Err(Error::MissingListener {
                    name: spec.name.clone(),
                })
            }
        }
    }
    // Members of a per-worker group beyond this binary's worker count: keep
    // accepting on them (closing one would reset the connections in its queue).
    for slot in by_name.iter_mut() {
        // Only a TCP record can be a member (an fd of `set_handoff_fds` may be named `x#1`).
        let extra = slot.as_ref().and_then(|(r, _)| {
            if r.kind != SocketKind::Tcp {
                return None;
            }
            let (base, _) = r.name.rsplit_once('#')?;
            specs
                .iter()
                .find(|s| s.name == base && matches!(s.endpoint, Endpoint::Tcp(_)))
        });
        if let Some(base) = extra {
            let (record, fd) = slot.take().expect("matched above");
            let spec = ListenSpec {
                name: record.name.clone(),
                ..base.clone()
            };
            listeners.push(Listener::adopt(&spec, &record, fd)?);
        }
    }
    for (name, addr) in udp_specs {
        let slot = by_name
            .iter_mut()
            .find(|l| {
                l.as_ref()
                    .is_some_and(|(r, _)| &r.name == name && r.kind == SocketKind::Udp)
            })
            .ok_or_else(|| Error::MissingListener { name: name.clone() })?;
        let (record, fd) = slot.take().expect("matched above");
        udp.push(UdpSocketEntry::adopt(name, *addr, &record, fd)?);
    }
    for (record, fd) in by_name.into_iter().flatten() {
        if record.kind == SocketKind::Raw {
            inherited_fds.push((record.name, fd));
            continue;
        }
        tracing::warn!(
            listener = %record.name,
            address = %record.address,
            "the previous process handed over a socket this binary does not use; closing it"
        );
    }
    Ok(Sockets {
        listeners,
        parent: Some(inherited.link),
        inherited_state,
        elders,
        generation,
        udp,
        inherited_fds,
    })
}

/// First boot: sockets from systemd socket activation (by LISTEN_FDNAMES name, else by
/// address), the rest bound here.
fn activate_or_bind(
    specs: &[ListenSpec],
    udp_specs: &[(String, SocketAddr)],
) -> Result<Sockets, Error> {
    let mut udp = Vec::new();
    let mut activated = systemd::take_listen_fds()?;
    let mut listeners = Vec::with_capacity(specs.len());
    let mut from_systemd: Vec<String> = Vec::new();
    for spec in specs {
        let found = activated
            .iter()
            .position(|a| a.name.as_deref() == Some(spec.name.as_str()))
            .or_else(|| {
                activated
                    .iter()
                    .position(|a| a.name.is_none() && Listener::fits(spec, a.fd.as_fd()))
            });
        listeners.push(match found {
            Some(i) => {
                let listener = Listener::adopt_activated(spec, activated.remove(i).fd)?;
                from_systemd.push(spec.name.clone());
                tracing::info!(listener = %spec.name, address = %listener.endpoint, "adopted the socket from systemd");
                listener
            }
            None if !spec.name.contains('#')
                && activated.iter().any(|a| {
                    a.name
                        .as_deref()
                        .and_then(|n| n.rsplit_once('#'))
                        .is_some_and(|(base, _)| base == spec.name)
                }) =>
            {
                return Err(Error::Config(format!(
                    "socket activation with workers: systemd passed members of {:?} but not \
                     {:?} itself; name the first worker's socket {:?} (FileDescriptorName=)",
                    spec.name, spec.name, spec.name
                )));
            }
            None => {
                if let Some((base, _)) = spec.name.split_once('#') {
                    if from_systemd.iter().any(|n| n == base) {
                        // Bound here, it would need SO_REUSEPORT on systemd's socket too, and
                        // would not be systemd's to keep across restarts: one socket per worker.
                        return Err(Error::Config(format!(
                            "socket activation with workers: systemd passed {base:?} but not \
                             {:?}; give each worker a socket of its own (a .socket unit per \
                             worker, each with ReusePort=yes and FileDescriptorName={base}, \
                             {base}#1, …)",
                            spec.name
                        )));
                    }
                }
                bind_member(spec, &listeners, true)?
            }
        });
    }
    for (name, addr) in udp_specs {
        udp.push(UdpSocketEntry::bind(name, *addr)?);
    }
    // Members of a per-worker group beyond this binary's worker count (more `.socket` units
    // than workers): accept on them too. systemd keeps its own copy of each, so one closed
    // here would stay in the group, and the kernel would queue a share of the connections on
    // it for no one.
    for a in std::mem::take(&mut activated) {
        let base = a
            .name
            .as_deref()
            .and_then(|n| n.rsplit_once('#'))
            .and_then(|(base, _)| {
                specs
                    .iter()
                    .find(|s| s.name == base && matches!(s.endpoint, Endpoint::Tcp(_)))
            });
        match base {
            Some(base) => {
                let spec = ListenSpec {
                    name: a.name.clone().expect("named above"),
                    reuseport: true,
                    ..base.clone()
                };
                let listener = Listener::adopt_activated(&spec, a.fd)?;
                tracing::info!(listener = %spec.name, "adopted an extra member from systemd");
                listeners.push(listener);
            }
            None => activated.push(a),
        }
    }
    for a in activated {
        tracing::warn!(name = ?a.name, "systemd passed a socket no listener asks for; closing it");
    }
    Ok(Sockets {
        listeners,
        parent: None,
        inherited_state: None,
        elders: Vec::new(),
        generation: 0,
        udp,
        inherited_fds: Vec::new(),
    })
}

/// Binds `spec`; a member `name#i` of a per-worker group asked for TCP port 0 joins the port
/// member 0 (`name`, bound before it in `bound`) got, not a port of its own.
fn bind_member(spec: &ListenSpec, bound: &[Listener], listen: bool) -> Result<Listener, Error> {
    if let (Endpoint::Tcp(addr), Some((base, _))) = (&spec.endpoint, spec.name.rsplit_once('#')) {
        if spec.reuseport && addr.port() == 0 {
            let first = bound
                .iter()
                .find(|l| &*l.name == base)
                .and_then(|l| sys::local_inet_addr(l.fd.as_fd()).ok());
            if let Some(first) = first {
                return Listener::bind_with(
                    &ListenSpec {
                        endpoint: Endpoint::Tcp(first),
                        ..spec.clone()
                    },
                    listen,
                );
            }
        }
    }
    Listener::bind_with(spec, listen)
}

#[cfg(test)]
mod tests;
