//! Faults the process tests inject into a real ringflip process, in debug builds only.
//!
//! `RINGFLIP_FAULT` holds a comma-separated list of fault names. A build without debug
//! assertions (the default release profile) ignores it: the check compiles to `false`, and
//! the variable is not passed on. A build with them (a dev build, or a release profile with
//! `debug-assertions = true`) honours it, and logs a warning each time a fault acts. The tests run the examples' debug builds, set it for the
//! first generation, and so get it in every successor (ringflip passes this variable on, unlike its others).
//!
//! Faults:
//! - `never-ready`: a successor arms its accepts and serves, but never sends READY: its
//!   predecessor's ready deadline must stop it with SIGTERM, and it must drain what it took
//!   (`tests/faults.rs`, `a_successor_never_ready_drains_what_it_took`).
//! - `slow-start`: a successor sleeps 300 ms before its first accept, as a slow one would
//!   (that test stops the old process meanwhile, so that connections queue for the
//!   successor's first accept to take).

/// The variable that names the faults; passed on to successors (`launch.rs`).
pub(crate) const ENV: &str = "RINGFLIP_FAULT";

/// Whether the fault `name` is injected into this process.
pub(crate) fn injected(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var(ENV).is_ok_and(|v| v.split(',').any(|f| f == name))
}
