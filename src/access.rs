//! Who the control socket serves: the service's own uid, root, and the uids and gids the
//! application allows (`Builder::control_socket_allow_uid`, `..._gid`), checked against the
//! peer's credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) as they were at its `connect`.

/// The peers the control socket admits besides the service's own uid and root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ControlAccess {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// A peer's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    pub uid: u32,
    pub gid: u32,
}

impl ControlAccess {
    /// Whether `peer` is served by a service running as `own_uid`: its uid is `own_uid`, root
    /// or an allowed uid, or its gid or one of its supplementary groups (`groups`, asked only
    /// when the rest did not decide) is an allowed gid.
    pub(crate) fn admits(
        &self,
        own_uid: u32,
        peer: &Peer,
        groups: impl FnOnce() -> Vec<u32>,
    ) -> bool {
        if peer.uid == own_uid || peer.uid == 0 || self.uids.contains(&peer.uid) {
            return true;
        }
        if self.gids.is_empty() {
            return false;
        }
        self.gids.contains(&peer.gid) || groups().iter().any(|g| self.gids.contains(g))
    }

    /// The control socket file's mode: 0600 (only the service's uid; root gets in anyway),
    /// 0660 when only gids are allowed (the file then belongs to the first of them), 0666
    /// when other uids are (the peer check is then the only gate).
    pub(crate) fn file_mode(&self) -> u32 {
        if !self.uids.is_empty() {
            0o666
        } else if !self.gids.is_empty() {
            0o660
        } else {
            0o600
        }
    }

    /// The group the control socket file should belong to, if any.
    pub(crate) fn file_group(&self) -> Option<u32> {
        if self.uids.is_empty() {
            self.gids.first().copied()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { uid, gid }
    }

    #[test]
    fn the_own_uid_and_root_are_always_admitted_others_only_when_allowed() {
        let none = ControlAccess::default();
        let no_groups = || panic!("groups asked for without any gid allowed");
        assert!(none.admits(1000, &peer(1000, 1000), no_groups));
        assert!(none.admits(1000, &peer(0, 0), no_groups));
        assert!(!none.admits(1000, &peer(1001, 1000), no_groups));
        assert_eq!(none.file_mode(), 0o600);
        assert_eq!(none.file_group(), None);

        let uids = ControlAccess {
            uids: vec![1001],
            gids: Vec::new(),
        };
        assert!(uids.admits(1000, &peer(1001, 5), no_groups));
        assert!(!uids.admits(1000, &peer(1002, 5), no_groups));
        assert_eq!(uids.file_mode(), 0o666);

        let gids = ControlAccess {
            uids: Vec::new(),
            gids: vec![50, 51],
        };
        // By primary gid, or by a supplementary group.
        assert!(gids.admits(1000, &peer(1002, 51), Vec::new));
        assert!(gids.admits(1000, &peer(1002, 7), || vec![3, 50]));
        assert!(!gids.admits(1000, &peer(1002, 7), || vec![3, 4]));
        assert_eq!(gids.file_mode(), 0o660);
        assert_eq!(gids.file_group(), Some(50));
    }
}
