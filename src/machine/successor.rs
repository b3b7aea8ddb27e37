//! The successor's side of an upgrade: what a process decides about its predecessor, pure like
//! the upgrade machine ([`Machine`](super::Machine)): events in, actions out, time passed in.
//!
//! ```text
//!                     Started                 READY sent                 takeover due
//!   Starting ───────────────────► Readying ────────────► Holding ──────────────────────► TakingOver
//!      │                                                  │   │  no ACCEPT_DONTWAIT           │
//!      │ READY unsent, predecessor alive: Abandoned       │   └──────────► Sharing ◄──────────┘
//!      │ READY unsent, predecessor gone:  Alone           │                  │
//!      │                                                  ├─── RELEASED or predecessor gone ─┴──► Alone
//!      │                                                  └─── the predecessor gave up (any of the three) ──► Abandoned
//!   First ── Started ──► Alone
//! ```
//!
//! - **First**: the service's first process (no predecessor), not started yet.
//! - **Starting**: the predecessor handed over the listeners (the HELLO was read in `build`);
//!   the accepts are not armed yet.
//! - **Readying**: the accepts are armed (they take what is queued at once); READY is being
//!   sent.
//! - **Holding**: READY is sent. The predecessor's multishot accepts, armed first, still take
//!   every connection (accept wake-ups are exclusive and go to the waiter armed first); ours
//!   wait. If it has not let go by `takeover_at`, this process takes connections alongside it
//!   (`StartTakeover`).
//! - **TakingOver**: polls on the listeners (non-exclusive waiters) and non-waiting accepts
//!   take connections beside the predecessor's accepts, until it lets go.
//! - **Sharing**: the kernel has no `IORING_ACCEPT_DONTWAIT` (Linux < 6.10), so no takeover:
//!   the predecessor keeps the queue until it lets go.
//! - **Alone**: the accept queues are this process's alone: it started without a predecessor,
//!   or the predecessor let go (RELEASED) or is gone.
//! - **Abandoned**: the predecessor gave up on this process before it could read our READY (its
//!   ready deadline, its shutdown), also when READY was sent but landed after its last read;
//!   its SIGTERM is on the way, and this process drains what its accepts took.
//!
//! Besides the stage, three facts this side owns: whether the predecessor's channel is open
//! (`RETIRING`/`SERVING` go there), whether systemd knows this process as the service's main
//! one (only the main process says `STOPPING=1`: a successor abandoned before it was
//! announced must not stop the whole unit), and whether this process drains (then it is not
//! the main process, whatever its predecessor does).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::DrainCause;

/// How long a new process leaves its predecessor to stop accepting by itself after READY before
/// it starts its takeover polls (`StartTakeover`). Usually the predecessor lets go well within
/// it and the polls never run: on one busy core, two processes taking turns at every
/// connection cost more than they gain (measured: window p99.9 up by ~1.5x with the polls from
/// READY on). A predecessor busy in its runtime noticed READY 0.1–3 ms late.
pub(crate) const TAKEOVER_AFTER: Duration = Duration::from_millis(1);

/// Where this process stands with its predecessor. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Stage {
    First,
    Starting,
    Readying,
    Holding { takeover_at: Instant },
    TakingOver,
    Sharing,
    Alone,
    Abandoned,
}

/// What the driver observed on the successor's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SuccessionEvent {
    /// The accepts are armed and submitted: this process owns connections from now on.
    Started,
    /// READY reached the predecessor's channel.
    ReadySent,
    /// READY could not be sent: the predecessor closed the channel. `predecessor_gave_up`:
    /// it is still alive, so it abandoned this process (and sent SIGTERM); otherwise it is gone.
    ReadyUnsent { predecessor_gave_up: bool },
    /// The predecessor let go of the accept queues (RELEASED for our upgrade), after it
    /// announced this process to systemd as the main one.
    Released,
    /// The predecessor's channel ended (EOF or an error): it exited.
    PredecessorGone,
    /// The predecessor gave up on this process: its SIGTERM came, or its channel ended with
    /// a SIGTERM pending here (it signals before it closes). READY may have been sent: it
    /// landed after the predecessor's last read, at its ready deadline (helper-30's review).
    GaveUp,
    /// The kernel refused `IORING_ACCEPT_DONTWAIT`: no takeover is possible.
    NoDontwait,
    /// This process started to drain (the upgrade machine's `StartDrain`).
    Draining(DrainCause),
    /// This process serves again after its own successor died (the upgrade machine's
    /// `ResumeAccepting`).
    Resumed,
}

/// What the driver must do for the successor's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SuccessionAction {
    /// Send READY to the predecessor; answer with `ReadySent` or `ReadyUnsent`.
    SendReady,
    /// Tell systemd `READY=1`: the service's first process serves (systemd started it, so it
    /// is the main process already).
    AnnounceReady,
    /// Tell systemd `MAINPID=<this process>` and `READY=1`: it took the service back.
    AnnounceMain,
    /// Tell systemd `STOPPING=1`.
    AnnounceStopping,
    /// Say this to the predecessor (it may still be draining).
    TellPredecessor(Notice),
    /// Stop reading the predecessor's channel and close it.
    ForgetPredecessor,
    /// Remove the pid file's previous content (moved aside when this process wrote its pid).
    DiscardOldPidFile,
    /// Put the pid file's previous content back: this process was abandoned.
    RestorePidFile,
    /// Make the listeners bound but not listening yet listen (new SO_REUSEPORT members), and
    /// accept on them.
    ListenDeferred,
    /// Poll the listeners and take connections alongside the predecessor.
    StartTakeover,
    /// Cancel the takeover polls.
    EndTakeover,
    /// The predecessor let go: the queues are ours. New members listen, every queue is swept
    /// (a connection whose wake-up the predecessor's cancelled accept spent waits there), the
    /// workers are told. No RELEASED goes on to a successor of this process: it has none yet
    /// (an upgrade waits until the predecessor lets go, `Machine::predecessor_holds`).
    QueuesFree,
}

/// A message for the predecessor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Notice {
    /// This process's exit is planned (RETIRING): an upgrade or a shutdown.
    Retiring,
    /// This process serves again (SERVING): its exit would again be a crash.
    Serving,
}

/// The successor's side. See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Succession {
    stage: Stage,
    linked: bool,
    main: bool,
    /// This process drains (for its own successor, or a shutdown) and has not resumed.
    draining: bool,
    actions: VecDeque<SuccessionAction>,
}

impl Succession {
    /// A process started without a predecessor: systemd started it, it is the main process.
    pub(crate) fn alone() -> Succession {
        Succession {
            stage: Stage::First,
            linked: false,
            main: true,
            draining: false,
            actions: VecDeque::new(),
        }
    }

    /// A process the predecessor handed the listeners to. Its predecessor announces it to
    /// systemd (MAINPID=) before its RELEASED.
    pub(crate) fn handed_over() -> Succession {
        Succession {
            stage: Stage::Starting,
            linked: true,
            main: false,
            draining: false,
            actions: VecDeque::new(),
        }
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn stage(&self) -> Stage {
        self.stage
    }

    /// Whether the predecessor may still take this process's queued connections with its
    /// accepts, armed first, and no takeover runs beside them: sweeping a queue now would race
    /// the predecessor for nothing (its accept takes the connection anyway).
    pub(crate) fn predecessor_holds_queue(&self) -> bool {
        matches!(
            self.stage,
            Stage::Starting | Stage::Readying | Stage::Holding { .. }
        )
    }

    /// Whether the takeover polls are wanted (armed while this process accepts).
    pub(crate) fn taking_over(&self) -> bool {
        self.stage == Stage::TakingOver
    }

    /// Whether systemd knows this process as the service's main process.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn is_main(&self) -> bool {
        self.main
    }

    pub(crate) fn poll_action(&mut self) -> Option<SuccessionAction> {
        self.actions.pop_front()
    }

    /// When [`Succession::handle_timeout`] must be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.stage {
            Stage::Holding { takeover_at } => Some(takeover_at),
            _ => None,
        }
    }

    /// Time passed. `accepting`: whether this process accepts now (the upgrade machine's
    /// word): a process that already stopped for its own successor takes nothing over.
    pub(crate) fn handle_timeout(&mut self, now: Instant, accepting: bool) {
        if let Stage::Holding { takeover_at } = self.stage {
            if now < takeover_at {
                return;
            }
            if accepting {
                self.stage = Stage::TakingOver;
                self.push(SuccessionAction::StartTakeover);
            } else {
                // Stopped meanwhile: nothing to take over, and the queue is no longer held
                // for the predecessor alone.
                self.stage = Stage::Sharing;
            }
        }
    }

    pub(crate) fn handle(&mut self, event: SuccessionEvent, now: Instant) {
        use SuccessionAction as A;
        use SuccessionEvent as E;
        match (self.stage, event) {
            (Stage::Starting, E::Started) => {
                self.stage = Stage::Readying;
                self.push(A::SendReady);
            }
            (Stage::First, E::Started) => {
                self.stage = Stage::Alone;
                self.push(A::ListenDeferred);
                self.push(A::DiscardOldPidFile);
                self.push(A::AnnounceReady);
            }
            (Stage::Readying, E::ReadySent) => {
                self.stage = Stage::Holding {
                    takeover_at: now + TAKEOVER_AFTER,
                };
                self.push(A::DiscardOldPidFile);
            }
            (
                Stage::Readying,
                E::ReadyUnsent {
                    predecessor_gave_up,
                },
            ) => {
                self.forget_predecessor();
                if predecessor_gave_up {
                    // Not the main process, not serving alone: its SIGTERM drains what the
                    // accepts took, and the pid file goes back to what it was.
                    self.stage = Stage::Abandoned;
                    self.main = false;
                    self.push(A::RestorePidFile);
                } else {
                    // It is gone: serve alone what is taken and what comes, as the main
                    // process (systemd still names the predecessor: MAINPID=<this one>).
                    self.stage = Stage::Alone;
                    self.main = true;
                    self.push(A::QueuesFree);
                    self.push(A::DiscardOldPidFile);
                    self.push(A::AnnounceMain);
                }
            }
            (Stage::Holding { .. } | Stage::TakingOver | Stage::Sharing, E::Released) => {
                // Sent after its MAINPID=<this process> (unless this process has handed over
                // to its own successor since, which is the main one then).
                self.main |= !self.draining;
                self.queues_free();
            }
            (Stage::Alone, E::Released) if self.linked => {
                // A RELEASED again: a predecessor of an earlier ringflip, upgraded before its
                // own predecessor noticed its READY, forwards that older process's let-go.
                // Its accepts were ahead in the queue: sweep again.
                self.push(A::QueuesFree);
            }
            (Stage::Holding { .. } | Stage::TakingOver | Stage::Sharing, E::GaveUp) => {
                // As when READY could not be sent to a predecessor that gave up: not the main
                // process (the predecessor serves on, and says so), not serving alone; the
                // SIGTERM drains what the accepts took. Taking EOF for an exit instead named
                // this process main (MAINPID=) and its stop said STOPPING=1: systemd stopped
                // the unit, and the predecessor serving in it. (The pid file: the old content
                // was discarded at READY; the predecessor, rolling back, names itself again.)
                self.forget_predecessor();
                if self.stage == Stage::TakingOver {
                    self.push(A::EndTakeover);
                }
                self.stage = Stage::Abandoned;
                self.main = false;
            }
            // Elsewhere (after RELEASED, say, with an operator's SIGTERM pending as the channel
            // closes): the predecessor is forgotten as if gone, nothing else changes.
            (_, E::GaveUp) => self.forget_predecessor(),
            (_, E::PredecessorGone) => {
                self.forget_predecessor();
                if matches!(
                    self.stage,
                    Stage::Holding { .. } | Stage::TakingOver | Stage::Sharing
                ) {
                    // Gone without letting go (killed, crashed): whether it told systemd
                    // MAINPID=<this process> is unknown, and this process serves alone now —
                    // unless it is on its way out itself.
                    if !self.draining {
                        self.main = true;
                        self.push(A::AnnounceMain);
                    }
                    self.queues_free();
                }
            }
            (Stage::Holding { .. }, E::NoDontwait) => self.stage = Stage::Sharing,
            (Stage::TakingOver, E::NoDontwait) => {
                self.stage = Stage::Sharing;
                self.push(A::EndTakeover);
            }
            (_, E::Draining(cause)) => {
                self.draining = true;
                match cause {
                    DrainCause::Shutdown if self.main => self.push(A::AnnounceStopping),
                    // The successor is the main process now (announced with MAINPID= on its
                    // READY); this one has nothing more to tell systemd unless it resumes.
                    DrainCause::Upgraded { .. } => self.main = false,
                    DrainCause::Shutdown => {}
                }
                if self.linked {
                    // Our predecessor, if it still drains, must not take our exit for a crash.
                    self.push(A::TellPredecessor(Notice::Retiring));
                }
            }
            (_, E::Resumed) => {
                // Abandoned, this process is not the service's, whatever it does before the
                // predecessor's SIGTERM lands.
                if self.stage != Stage::Abandoned {
                    self.main = true;
                    self.push(A::AnnounceMain);
                }
                self.draining = false;
                if self.linked {
                    // Withdraw the RETIRING: our exit would again be a crash to recover from.
                    self.push(A::TellPredecessor(Notice::Serving));
                }
            }
            // Stale or impossible here: a second Started, a RELEASED after the predecessor was
            // forgotten, a READY outcome after the start, ….
            (_, _) => {}
        }
    }

    fn forget_predecessor(&mut self) {
        if self.linked {
            self.linked = false;
            self.push(SuccessionAction::ForgetPredecessor);
        }
    }

    /// The predecessor let go (or is gone): the queues are ours alone.
    fn queues_free(&mut self) {
        if self.stage == Stage::TakingOver {
            self.push(SuccessionAction::EndTakeover);
        }
        self.stage = Stage::Alone;
        self.push(SuccessionAction::QueuesFree);
    }

    fn push(&mut self, action: SuccessionAction) {
        self.actions.push_back(action);
    }
}

#[cfg(test)]
#[path = "successor_tests.rs"]
mod tests;
