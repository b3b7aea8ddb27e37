//! The handoff protocol's version rule (see `docs/PROTOCOL.md`).
//!
//! Each side speaks a range of protocol versions. The serving process states its range first
//! (OFFER, in a preamble whose layout never changes); the new process picks the highest
//! version both speak and says so (ACCEPT), or refuses (REFUSE, with its own range) and exits.
//! Everything after uses the version picked.

use std::fmt;
use std::sync::OnceLock;

/// A range of handoff protocol versions, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProtocolVersions {
    /// The oldest version spoken.
    pub min: u8,
    /// The newest version spoken.
    pub max: u8,
}

impl ProtocolVersions {
    /// The highest version both ranges hold, if any.
    pub(crate) fn highest_common(self, other: ProtocolVersions) -> Option<u8> {
        let high = self.max.min(other.max);
        let low = self.min.max(other.min);
        (high >= low && high >= 1).then_some(high)
    }

    /// Whether `version` is in the range.
    pub(crate) fn contains(self, version: u8) -> bool {
        (self.min..=self.max).contains(&version)
    }
}

impl fmt::Display for ProtocolVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// The versions this build of the library speaks. Version 0 is reserved for the preamble
/// (OFFER, ACCEPT, REFUSE) and is never negotiated.
pub(crate) const SUPPORTED: ProtocolVersions = ProtocolVersions { min: 1, max: 1 };

/// Test builds only (`debug_assertions`): a process started with this variable (`MIN-MAX`,
/// or `N`) speaks that range instead of [`SUPPORTED`], so that the tests can run two builds
/// of different protocol versions against each other. Versions above 1 use version 1's
/// layouts: they exist only to test the negotiation. The variable is consumed (removed from
/// the environment) so that a process this one starts does not inherit it.
pub(crate) const ENV_TEST_VERSIONS: &str = "RINGFLIP_TEST_PROTOCOL_VERSIONS";

/// The versions this process speaks: [`SUPPORTED`], or in a debug build what
/// [`ENV_TEST_VERSIONS`] says. Read once; call it at start (before any child is spawned).
pub(crate) fn this_process() -> ProtocolVersions {
    static VERSIONS: OnceLock<ProtocolVersions> = OnceLock::new();
    *VERSIONS.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return SUPPORTED;
        }
        let Some(value) = std::env::var_os(ENV_TEST_VERSIONS) else {
            return SUPPORTED;
        };
        std::env::remove_var(ENV_TEST_VERSIONS);
        match parse(value.to_str().unwrap_or("")) {
            Some(v) => {
                tracing::warn!(versions = %v, "test override: speaking these protocol versions");
                v
            }
            None => {
                tracing::error!(value = ?value, "{ENV_TEST_VERSIONS}: not MIN-MAX; ignored");
                SUPPORTED
            }
        }
    })
}

fn parse(text: &str) -> Option<ProtocolVersions> {
    let (min, max) = text.split_once('-').unwrap_or((text, text));
    let v = ProtocolVersions {
        min: min.trim().parse().ok()?,
        max: max.trim().parse().ok()?,
    };
    (v.min >= 1 && v.min <= v.max).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u8, max: u8) -> ProtocolVersions {
        ProtocolVersions { min, max }
    }

    #[test]
    fn the_highest_common_version_is_picked() {
        assert_eq!(r(1, 1).highest_common(r(1, 2)), Some(1));
        assert_eq!(r(1, 2).highest_common(r(1, 1)), Some(1));
        assert_eq!(r(1, 3).highest_common(r(2, 5)), Some(3));
        assert_eq!(r(1, 1).highest_common(r(2, 3)), None);
        assert_eq!(r(3, 3).highest_common(r(1, 2)), None);
        // Version 0 is the preamble's, never a common version.
        assert_eq!(r(0, 0).highest_common(r(0, 1)), None);
    }

    #[test]
    fn the_test_override_parses() {
        assert_eq!(parse("1-2"), Some(r(1, 2)));
        assert_eq!(parse("3"), Some(r(3, 3)));
        assert_eq!(parse("2-1"), None);
        assert_eq!(parse("0-1"), None);
        assert_eq!(parse("x"), None);
    }
}
