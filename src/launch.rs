//! What an upgrade starts: the binary (by default the path this process was started with, as
//! `argv[0]` gave it), its arguments and its environment. Fixed by `Builder::build`, used by
//! `spawn.rs` at each upgrade.
//!
//! Why not `current_exe()`: it reads `/proc/self/exe`, the file this process runs *after*
//! symlinks were followed. A service deployed as `/srv/app/current/bin/app` with `current ->
//! releases/v1` would, after `current` is flipped to `releases/v2`, start v1 again. The path
//! as given is exec'ed anew at each upgrade, so the kernel follows the symlink as it is then.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where `execvp` looks when `PATH` is unset (glibc's `_CS_PATH`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// The default binary of an upgrade, from this process's `argv[0]`: `(path to exec, argv[0]
/// for the new process)`, or `None` if `argv[0]` names nothing that can be found.
///
/// - With a slash, the path as given; if relative, joined to `cwd` (the working directory at
///   `build`), and the new process gets the joined path as its `argv[0]` (its working
///   directory may have changed by the upgrade).
/// - Without one, the first executable file of that name in the directories of `path_var`
///   (`PATH` at `build`), as `execvp` searches; the new process keeps the bare name.
///
/// Symlinks are never resolved here: exec follows them at each upgrade.
pub(crate) fn default_binary(
    argv0: &OsStr,
    cwd: Option<&Path>,
    path_var: Option<&OsStr>,
) -> Option<(PathBuf, OsString)> {
    if argv0.is_empty() {
        return None;
    }
    let given = Path::new(argv0);
    if argv0.as_bytes().contains(&b'/') {
        if given.is_absolute() {
            return Some((given.to_path_buf(), argv0.to_os_string()));
        }
        let joined = cwd?.join(given);
        return Some((joined.clone(), joined.into_os_string()));
    }
    let path_var = path_var.unwrap_or(OsStr::new(DEFAULT_PATH));
    std::env::split_paths(path_var)
        .map(|dir| {
            // An empty entry means the working directory, as for execvp.
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            dir.join(given)
        })
        .filter_map(|candidate| {
            if candidate.is_absolute() {
                Some(candidate)
            } else {
                cwd.map(|cwd| cwd.join(candidate))
            }
        })
        .find(|candidate| is_executable_file(candidate))
        .map(|found| (found, argv0.to_os_string()))
}

/// A regular file (after symlinks) with an execute bit.
fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A hook that edits the new process's environment at each upgrade.
pub(crate) type EnvHook = Arc<dyn Fn(&mut BTreeMap<OsString, OsString>) + Send + Sync>;

/// How the new process's environment differs from this process's (as it is at the upgrade).
#[derive(Clone, Default)]
pub(crate) struct EnvOverrides {
    /// In order: `Some` sets the variable, `None` removes it.
    pub changes: Vec<(OsString, Option<OsString>)>,
    /// Run last, on the spawn thread, at each upgrade.
    pub hook: Option<EnvHook>,
}

impl fmt::Debug for EnvOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvOverrides")
            .field("changes", &self.changes)
            .field("hook", &self.hook.as_ref().map(|_| "Fn"))
            .finish()
    }
}

impl EnvOverrides {
    /// The new process's environment: `current` with the changes, then the hook, applied, and
    /// without ringflip's own variables (the spawn sets those) and socket activation's (for the
    /// first boot only), whatever the hook did. A panicking hook fails the upgrade.
    pub(crate) fn apply(
        &self,
        current: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> io::Result<BTreeMap<OsString, OsString>> {
        let mut env: BTreeMap<OsString, OsString> = current.into_iter().collect();
        for (key, value) in &self.changes {
            match value {
                Some(value) => env.insert(key.clone(), value.clone()),
                None => env.remove(key),
            };
        }
        if let Some(hook) = &self.hook {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&mut env))).map_err(
                |_| io::Error::other("the environment hook (Builder::env_refresh) panicked"),
            )?;
        }
        env.retain(|key, _| {
            // ringflip's own variables describe this process's handoff, not the next one's;
            // an injected fault (debug builds) is meant for every generation.
            (!key.as_bytes().starts_with(b"RINGFLIP_")
                || (cfg!(debug_assertions) && key == crate::fault::ENV))
                && !crate::systemd::LISTEN_VARS.iter().any(|v| key == *v)
        });
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        s.into()
    }

    #[test]
    fn an_absolute_argv0_is_taken_as_given() {
        let got = default_binary(OsStr::new("/srv/app/current/app"), None, None);
        assert_eq!(
            got,
            Some(("/srv/app/current/app".into(), os("/srv/app/current/app")))
        );
    }

    /// Relative with a slash: joined to the working directory at start, never resolved
    /// through symlinks (`current` stays in the path).
    #[test]
    fn a_relative_argv0_is_joined_to_the_start_directory() {
        let got = default_binary(
            OsStr::new("./current/app"),
            Some(Path::new("/srv/app")),
            None,
        );
        assert_eq!(
            got,
            Some((
                "/srv/app/./current/app".into(),
                os("/srv/app/./current/app")
            ))
        );
        assert_eq!(default_binary(OsStr::new("bin/app"), None, None), None);
    }

    /// A bare name is searched in PATH as execvp does: the first executable file, symlinks
    /// kept in the path.
    #[test]
    fn a_bare_argv0_is_searched_in_path() {
        let dir = std::env::temp_dir().join(format!("ringflip-launch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["a", "b", "c", "releases/v1"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // a/app: not executable; b/app: a symlink to an executable; c/app: executable too.
        std::fs::write(dir.join("a/app"), "").unwrap();
        std::fs::write(dir.join("releases/v1/app"), "").unwrap();
        std::fs::set_permissions(
            dir.join("releases/v1/app"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink(dir.join("releases/v1/app"), dir.join("b/app")).unwrap();
        std::fs::copy(dir.join("releases/v1/app"), dir.join("c/app")).unwrap();
        let path = std::env::join_paths([dir.join("a"), dir.join("b"), dir.join("c")]).unwrap();
        let got = default_binary(OsStr::new("app"), None, Some(&path));
        assert_eq!(got, Some((dir.join("b/app"), os("app"))));
        // A relative PATH entry is relative to the working directory.
        let got = default_binary(OsStr::new("app"), Some(&dir), Some(OsStr::new("a:c")));
        assert_eq!(got, Some((dir.join("c/app"), os("app"))));
        assert_eq!(
            default_binary(OsStr::new("nowhere"), None, Some(&path)),
            None
        );
        assert_eq!(default_binary(OsStr::new(""), None, Some(&path)), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_overrides_set_remove_refresh_and_keep_ringflip_variables_out() {
        let current = [
            (os("KEEP"), os("1")),
            (os("DROP"), os("1")),
            (os("RINGFLIP_HANDOFF_FD"), os("3")),
            (os("LISTEN_FDS"), os("2")),
        ];
        let overrides = EnvOverrides {
            changes: vec![
                (os("DROP"), None),
                (os("NEW"), Some(os("a"))),
                (os("KEEP"), Some(os("2"))),
            ],
            hook: Some(Arc::new(|env: &mut BTreeMap<OsString, OsString>| {
                env.insert(os("FROM_HOOK"), os("x"));
                env.insert(os("RINGFLIP_UPGRADE_ID"), os("forged"));
            })),
        };
        let env = overrides.apply(current).unwrap();
        let want: BTreeMap<OsString, OsString> = [
            (os("FROM_HOOK"), os("x")),
            (os("KEEP"), os("2")),
            (os("NEW"), os("a")),
        ]
        .into_iter()
        .collect();
        assert_eq!(env, want);

        let panicking = EnvOverrides {
            changes: Vec::new(),
            hook: Some(Arc::new(|_: &mut BTreeMap<OsString, OsString>| {
                panic!("no env file")
            })),
        };
        assert!(panicking.apply(std::iter::empty()).is_err());
    }
}
