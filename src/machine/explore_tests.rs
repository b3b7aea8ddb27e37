//! The two machines of an upgrade together: the old process (P: the upgrade machine and its
//! successor's side, which has no predecessor) and the new one (N: a machine and a successor's
//! side that was handed the listeners), the handoff channel between them, and a model of what
//! each driver does with an action. A depth-first search walks every interleaving of their
//! events up to small budgets (two upgrade requests, one shutdown of each, one crash of N, one
//! failed start of N) and checks on every state it visits:
//!
//! - **coverage**: unless a process crashed or a shutdown was asked for, some process has its
//!   accepts armed at every moment (otherwise the backlog would hold connections nobody takes
//!   until something else happens);
//! - **no connection closed unserved**: no process that may hold connections (its accepts were
//!   armed) is SIGKILLed, and no process exits with its accepts still armed;
//! - **systemd hears the truth**: only the process systemd knows as the main one says
//!   `STOPPING=1`;
//! - **at rest** (no event left): without a shutdown, exactly one process is alive, accepts,
//!   is in `Serving` and is the one systemd knows as main; a failed upgrade therefore ends with
//!   exactly the old process serving. With a shutdown, the old process has exited and the new
//!   one either too or serves as the main process.
//!
//! The model executes actions the way `driver/` does (the comments name the driver's
//! function); `Bug` plants a known mistake in it, and each must be caught, so the search is
//! shown able to fail.
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use super::successor::{Notice, Succession, SuccessionAction as SA, SuccessionEvent as SE};
use super::*;

const TIMEOUTS: Timeouts = Timeouts {
    ready: Duration::from_secs(5),
    drain: Duration::from_secs(30),
};
const P_PID: u32 = 100;
const FIRST_CHILD: u32 = 200;

/// Mistakes the model's driver can be made to make; each must break an invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// N sends READY before its accepts are armed.
    ReadyBeforeArming,
    /// P SIGKILLs every child it abandons.
    AlwaysKill,
    /// P judges N's exit without reading what N sent before it (no `take_successor_messages`).
    ExitBeforeMessages,
    /// N says `STOPPING=1` whenever it shuts down, main or not.
    StoppingFromAnyone,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Msg {
    Hello(UpgradeId),
    Released(UpgradeId),
    Ready(UpgradeId),
    Retiring,
    Serving,
}

/// A running process as its driver sees it.
#[derive(Clone, Debug)]
struct Proc {
    pid: u32,
    m: Machine,
    s: Succession,
    /// Its accepts are armed (or their cancel is still in flight).
    accepting: bool,
    stop_pending: bool,
    drain_active: bool,
    drained_fed: bool,
    /// Its accepts were armed at some point: it may hold connections.
    held: bool,
    sigterm: bool,
    /// N: the predecessor's end of the channel ended and N has not been told yet.
    predecessor_gone_unseen: bool,
    /// N: the upgrade its HELLO named, echoed in its READY.
    handed_over_by: Option<UpgradeId>,
    /// N: READY is to be sent (a step of its own: the accepts run meanwhile).
    ready_pending: bool,
}

impl Proc {
    fn new(pid: u32, m: Machine, s: Succession) -> Proc {
        Proc {
            pid,
            m,
            s,
            accepting: false,
            stop_pending: false,
            drain_active: false,
            drained_fed: false,
            held: false,
            sigterm: false,
            predecessor_gone_unseen: false,
            handed_over_by: None,
            ready_pending: false,
        }
    }
}

#[derive(Clone, Debug)]
enum Child {
    None,
    /// Started, reading the HELLO.
    Spawned {
        pid: u32,
        upgrade: UpgradeId,
    },
    Running(Box<Proc>),
    /// Gone; `exit_seen` once P's exit watch fed it.
    Dead {
        pid: u32,
        exit_seen: bool,
    },
}

#[derive(Clone, Debug)]
struct World {
    bug: Bug,
    t0: Instant,
    now: Instant,
    p: Option<Proc>,
    n: Child,
    to_p: VecDeque<Msg>,
    to_n: VecDeque<Msg>,
    /// P's end of the channel to the current child is open.
    channel_open: bool,
    /// A spawn in flight on its thread.
    spawning: Option<UpgradeId>,
    /// The HELLO's send completion is pending.
    hello_pending: bool,
    next_child: u32,
    /// The pid systemd knows as the service's main process.
    systemd_main: u32,
    upgrades_left: u8,
    p_shutdowns_left: u8,
    n_shutdowns_left: u8,
    n_crashes_left: u8,
    n_start_failures_left: u8,
    shutdown_requested: bool,
    crashed: bool,
    /// N crashed after P had exited: the crash of the only server, which no upgrade logic
    /// can help.
    crashed_alone: bool,
    /// N's READY is on the open channel: the upgrade must not be reported failed.
    ready_queued: bool,
    /// The operator stopped P, or N.
    p_shut: bool,
    n_shut: bool,
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = |p: &Proc| format!("{} {:?} acc={}", p.pid, p.m.phase(), p.accepting);
        let n = match &self.n {
            Child::Running(n) => format!("{} {:?}", phase(n), n.s.stage()),
            other => format!("{other:?}"),
        };
        write!(
            f,
            "P: {:?}; N: {n}; to_p {:?}; to_n {:?}; main {}",
            self.p.as_ref().map(phase),
            self.to_p,
            self.to_n,
            self.systemd_main
        )
    }
}

/// The memo key: everything but the clock's base.
fn key(w: &World) -> String {
    let mut w = w.clone();
    let offset = w.now - w.t0;
    w.now = w.t0;
    format!("{offset:?}{w:?}")
}

impl World {
    fn new(bug: Bug) -> Result<World, String> {
        let t0 = Instant::now();
        let m = Machine::new(TIMEOUTS, 0).with_generation_limit(u32::MAX);
        let mut p = Proc::new(P_PID, m, Succession::alone());
        p.accepting = true;
        p.held = true;
        let mut w = World {
            bug,
            t0,
            now: t0,
            p: Some(p),
            n: Child::None,
            to_p: VecDeque::new(),
            to_n: VecDeque::new(),
            channel_open: false,
            spawning: None,
            hello_pending: false,
            next_child: FIRST_CHILD,
            systemd_main: P_PID,
            upgrades_left: 2,
            p_shutdowns_left: 1,
            n_shutdowns_left: 1,
            n_crashes_left: 1,
            n_start_failures_left: 1,
            shutdown_requested: false,
            crashed: false,
            crashed_alone: false,
            ready_queued: false,
            p_shut: false,
            n_shut: false,
        };
        w.p_succession(SE::Started)?;
        Ok(w)
    }

    fn p(&mut self) -> &mut Proc {
        self.p.as_mut().expect("P alive")
    }

    fn n(&mut self) -> &mut Proc {
        match &mut self.n {
            Child::Running(n) => n,
            _ => unreachable!("N running"),
        }
    }

    // ---- P's driver

    fn p_event(&mut self, event: Event) -> Result<(), String> {
        let now = self.now;
        self.p().m.handle(event, now);
        self.p_actions()
    }

    fn p_succession(&mut self, event: SE) -> Result<(), String> {
        let now = self.now;
        self.p().s.handle(event, now);
        self.p_actions()
    }

    /// `Driver::run_actions` / `act` for P.
    fn p_actions(&mut self) -> Result<(), String> {
        loop {
            let Some(p) = self.p.as_mut() else {
                return Ok(());
            };
            if let Some(action) = p.s.poll_action() {
                match action {
                    SA::AnnounceStopping if self.systemd_main != P_PID => {
                        return Err("STOPPING=1 from P, not the main process".into())
                    }
                    SA::TellPredecessor(_) | SA::SendReady => {
                        return Err(format!("P has no predecessor: {action:?}"))
                    }
                    SA::AnnounceMain => self.systemd_main = P_PID,
                    _ => {}
                }
                continue;
            }
            let Some(action) = p.m.poll_action() else {
                return Ok(());
            };
            match action {
                Action::SpawnChild(upgrade) => {
                    self.spawning = Some(upgrade);
                    self.ready_queued = false;
                }
                Action::SendListeners(upgrade) => {
                    self.to_n.push_back(Msg::Hello(upgrade));
                    self.hello_pending = true;
                }
                Action::StopAccepting => {
                    let p = self.p();
                    p.accepting = false;
                    p.stop_pending = true;
                }
                Action::ResumeAccepting => {
                    let p = self.p();
                    p.accepting = true;
                    p.stop_pending = false;
                    self.p_succession(SE::Resumed)?;
                }
                Action::StartDrain(cause) => {
                    let p = self.p();
                    p.drain_active = true;
                    p.drained_fed = false;
                    self.p_succession(SE::Draining(cause))?;
                }
                Action::StopDrain => self.p().drain_active = false,
                Action::AbandonChild { pid, stop } => self.abandon(pid, stop)?,
                Action::Reply(_, Outcome::Upgraded { pid }) => self.systemd_main = pid,
                Action::CheckSuccessor(pid) => {
                    // A poll of its pidfd.
                    let alive = matches!(&self.n, Child::Running(n) if n.pid == pid);
                    self.p_event(Event::SuccessorChecked { pid, alive })?;
                }
                Action::Reply(_, Outcome::Failed(why)) if self.ready_queued => {
                    return Err(format!(
                        "a READY was on the channel, yet the upgrade failed: {why}"
                    ))
                }
                Action::Reply(..) | Action::PhaseChanged(_) => {}
                Action::Exit(_) => {
                    let p = self.p();
                    if p.accepting || p.stop_pending {
                        return Err("P exits with its accepts armed".into());
                    }
                    self.p = None;
                    // Its end of the channel closes with it.
                    self.close_channel();
                }
            }
        }
    }

    fn close_channel(&mut self) {
        if self.channel_open {
            self.channel_open = false;
            self.to_p.clear();
            if let Child::Running(n) = &mut self.n {
                n.predecessor_gone_unseen = true;
            }
        }
    }

    /// `Action::AbandonChild`.
    fn abandon(&mut self, pid: u32, stop: Stop) -> Result<(), String> {
        let stop = if self.bug == Bug::AlwaysKill {
            Stop::Kill
        } else {
            stop
        };
        let current = match &self.n {
            Child::Spawned { pid: c, .. } => *c == pid,
            Child::Running(n) => n.pid == pid,
            _ => false,
        };
        if !current {
            return Ok(());
        }
        self.close_channel();
        match stop {
            Stop::Kill => {
                if let Child::Running(n) = &self.n {
                    if n.held {
                        return Err(format!("SIGKILL of N ({pid}), which may hold connections"));
                    }
                }
                self.n = Child::Dead {
                    pid,
                    exit_seen: false,
                };
            }
            Stop::Terminate => {
                // A child still starting finds the channel closed with P alive, and fails.
                if let Child::Running(n) = &mut self.n {
                    n.sigterm = true;
                }
            }
        }
        Ok(())
    }

    // ---- N's driver

    fn n_event(&mut self, event: Event) -> Result<(), String> {
        let now = self.now;
        self.n().m.handle(event, now);
        self.n_actions()
    }

    fn n_succession(&mut self, event: SE) -> Result<(), String> {
        let now = self.now;
        self.n().s.handle(event, now);
        self.n_actions()
    }

    fn n_actions(&mut self) -> Result<(), String> {
        loop {
            let Child::Running(n) = &mut self.n else {
                return Ok(());
            };
            let pid = n.pid;
            if let Some(action) = n.s.poll_action() {
                match action {
                    SA::SendReady => n.ready_pending = true,
                    SA::AnnounceStopping if self.systemd_main != pid => {
                        return Err(format!("STOPPING=1 from N ({pid}), not the main process"))
                    }
                    SA::AnnounceReady | SA::AnnounceMain => self.systemd_main = pid,
                    SA::TellPredecessor(notice) if self.channel_open => {
                        self.to_p.push_back(match notice {
                            Notice::Retiring => Msg::Retiring,
                            Notice::Serving => Msg::Serving,
                        });
                    }
                    _ => {}
                }
                continue;
            }
            let Some(action) = n.m.poll_action() else {
                return Ok(());
            };
            match action {
                Action::StopAccepting => {
                    n.accepting = false;
                    n.stop_pending = true;
                }
                Action::StartDrain(cause) => {
                    n.drain_active = true;
                    if self.bug == Bug::StoppingFromAnyone
                        && cause == DrainCause::Shutdown
                        && self.systemd_main != pid
                    {
                        return Err(format!("STOPPING=1 from N ({pid}), not the main process"));
                    }
                    self.n_succession(SE::Draining(cause))?;
                }
                Action::Exit(_) => {
                    if n.accepting || n.stop_pending {
                        return Err("N exits with its accepts armed".into());
                    }
                    self.n = Child::Dead {
                        pid,
                        exit_seen: false,
                    };
                    // N never upgrades in this model, so it has no channel of its own.
                }
                Action::PhaseChanged(_) | Action::Reply(..) => {}
                other => return Err(format!("N did {other:?} without being asked to upgrade")),
            }
        }
    }

    /// N reads the HELLO and starts (`Builder::build`, `Driver::prepare`, `Driver::start`).
    fn n_start(&mut self, fail: bool) -> Result<(), String> {
        let Child::Spawned { pid, upgrade } = self.n else {
            unreachable!()
        };
        // `prepare` fails if the predecessor gave up meanwhile (channel closed, P alive).
        if fail || (!self.channel_open && self.p.is_some()) {
            self.n = Child::Dead {
                pid,
                exit_seen: false,
            };
            return Ok(());
        }
        let m = Machine::new(TIMEOUTS, pid as u64);
        let mut n = Proc::new(pid, m, Succession::handed_over());
        n.handed_over_by = Some(upgrade);
        n.predecessor_gone_unseen = !self.channel_open;
        if self.bug != Bug::ReadyBeforeArming {
            n.accepting = true;
            n.held = true;
        }
        self.n = Child::Running(Box::new(n));
        // With the bug, the accepts are armed by a later step ("N: arms its accepts").
        self.n_succession(SE::Started)
    }

    // ---- The search

    /// Every state one event away, with the event's name.
    fn moves(&self) -> Vec<(&'static str, Result<World, String>)> {
        let mut out = Vec::new();
        let mut step = |name: &'static str, f: &dyn Fn(&mut World) -> Result<(), String>| {
            let mut w = self.clone();
            let r = f(&mut w).and_then(|()| w.check()).map(|()| w);
            out.push((name, r));
        };
        if let Some(p) = &self.p {
            // Upgrade requests and a shutdown, from outside.
            if self.upgrades_left > 0 {
                step("P: upgrade requested", &|w| {
                    w.upgrades_left -= 1;
                    w.p_event(Event::EldersDraining(0))?;
                    w.p_event(Event::UpgradeRequested(Requester::Signal))
                });
            }
            if self.p_shutdowns_left > 0 {
                step("P: SIGTERM", &|w| {
                    w.p_shutdowns_left -= 1;
                    w.shutdown_requested = true;
                    w.p_shut = true;
                    w.p_take_messages_if_handing_over()?;
                    w.p_event(Event::ShutdownRequested)
                });
            }
            if let Some(upgrade) = self.spawning {
                step("P: spawn done", &|w| {
                    w.spawning = None;
                    let pid = w.next_child;
                    w.next_child += 1;
                    if w.p().m.current_upgrade() == Some(upgrade)
                        && w.p().m.phase() == Phase::Forking
                    {
                        w.n = Child::Spawned { pid, upgrade };
                        w.ready_queued = false;
                        w.channel_open = true;
                        w.to_n.clear();
                        w.to_p.clear();
                        w.p_event(Event::ChildSpawned { pid })
                    } else {
                        Ok(()) // `collect_spawns` kills a child nobody waits for
                    }
                });
                step("P: spawn failed", &|w| {
                    w.spawning = None;
                    if w.p().m.phase() == Phase::Forking {
                        w.p_event(Event::SpawnFailed("ENOENT".into()))
                    } else {
                        Ok(())
                    }
                });
            }
            if self.hello_pending {
                step("P: HELLO send completes", &|w| {
                    w.hello_pending = false;
                    let alive = matches!(w.n, Child::Spawned { .. } | Child::Running(_));
                    if alive && w.channel_open {
                        w.p_event(Event::ListenersSent)
                    } else {
                        w.p_event(Event::HandoffFailed("EPIPE".into()))
                    }
                });
            }
            if self.channel_open && !self.to_p.is_empty() {
                step("P: reads N's message", &|w| w.p_read_one());
            }
            if let Child::Dead {
                exit_seen: false, ..
            } = self.n
            {
                step("P: N's exit seen", &|w| {
                    let Child::Dead { pid, .. } = w.n else {
                        unreachable!()
                    };
                    if w.bug != Bug::ExitBeforeMessages {
                        // `take_successor_messages`: what it said before it died.
                        while w.channel_open && !w.to_p.is_empty() {
                            w.p_read_one()?;
                        }
                    }
                    w.n = Child::Dead {
                        pid,
                        exit_seen: true,
                    };
                    w.close_channel();
                    w.p_event(Event::ChildExited {
                        pid,
                        status: "exit".into(),
                    })
                });
            }
            if p.stop_pending {
                step("P: accepts stopped", &|w| {
                    w.p().stop_pending = false;
                    w.p_event(Event::AcceptStopped)?;
                    // `report_if_stopped`: RELEASED to the successor, if any.
                    let upgrade = w.p().m.current_upgrade();
                    if let (Child::Running(_), true, Some(upgrade)) =
                        (&w.n, w.channel_open, upgrade)
                    {
                        w.to_n.push_back(Msg::Released(upgrade));
                    }
                    w.p_succession(SE::LetGo)
                });
            }
            if p.drain_active && !p.drained_fed && !p.accepting && !p.stop_pending {
                step("P: connections done", &|w| {
                    w.p().drained_fed = true;
                    w.p_event(Event::ConnectionsDrained)
                });
            }
            if matches!(p.m.phase(), Phase::Forking | Phase::HandingOver) {
                if let Some(deadline) = p.m.poll_timeout() {
                    step("P: ready deadline", &|w| {
                        w.now = w.now.max(deadline);
                        w.p_take_messages_if_handing_over()?;
                        let now = w.now;
                        w.p().m.handle_timeout(now);
                        w.p_actions()
                    });
                }
            }
        }
        match &self.n {
            // The HELLO's send completes (in P's ring) before N can read it.
            Child::Spawned { .. }
                if !self.hello_pending
                    && self
                        .to_n
                        .front()
                        .is_some_and(|m| matches!(m, Msg::Hello(_))) =>
            {
                step("N: reads HELLO, starts", &|w| {
                    w.to_n.pop_front();
                    w.n_start(false)
                });
                if self.n_start_failures_left > 0 {
                    step("N: fails to start", &|w| {
                        w.n_start_failures_left -= 1;
                        w.to_n.pop_front();
                        w.n_start(true)
                    });
                }
            }
            Child::Spawned { pid, .. } if !self.channel_open => {
                let pid = *pid;
                step("N: finds the channel closed", &move |w| {
                    w.n = Child::Dead {
                        pid,
                        exit_seen: false,
                    };
                    Ok(())
                });
            }
            Child::Running(n) => {
                if n.ready_pending {
                    step("N: sends READY", &|w| {
                        // `Driver::start`: READY goes out once the accepts are armed.
                        let n = w.n();
                        n.ready_pending = false;
                        let upgrade = n.handed_over_by.expect("handed over");
                        if w.channel_open {
                            w.ready_queued = true;
                            w.to_p.push_back(Msg::Ready(upgrade));
                            w.n_succession(SE::ReadySent)
                        } else {
                            let gave_up = w.p.is_some();
                            w.n_succession(SE::ReadyUnsent {
                                predecessor_gave_up: gave_up,
                            })
                        }
                    });
                }
                if !n.held {
                    step("N: arms its accepts", &|w| {
                        let n = w.n();
                        n.accepting = true;
                        n.held = true;
                        Ok(())
                    });
                }
                // What P sent stays readable after P closed its end, then the end is seen.
                if !self.to_n.is_empty() {
                    step("N: reads P's message", &|w| {
                        if let Some(Msg::Released(_)) = w.to_n.pop_front() {
                            w.n_succession(SE::Released)?;
                        }
                        Ok(())
                    });
                }
                if n.predecessor_gone_unseen && self.to_n.is_empty() {
                    step("N: P's channel ended", &|w| {
                        w.n().predecessor_gone_unseen = false;
                        w.to_n.clear();
                        w.n_succession(SE::PredecessorGone)
                    });
                }
                if let Some(at) = n.s.poll_timeout() {
                    step("N: takeover due", &|w| {
                        w.now = w.now.max(at);
                        let now = w.now;
                        let n = w.n();
                        let accepting = n.m.accepting();
                        n.s.handle_timeout(now, accepting);
                        w.n_actions()
                    });
                }
                if n.sigterm {
                    step("N: SIGTERM from P", &|w| {
                        // `signalfd_siginfo.ssi_pid` is P's pid.
                        w.n().sigterm = false;
                        w.n_event(Event::PredecessorGaveUp)
                    });
                }
                if self.n_shutdowns_left > 0 {
                    step("N: SIGTERM", &|w| {
                        w.n_shutdowns_left -= 1;
                        w.shutdown_requested = true;
                        w.n_shut = true;
                        w.n_event(Event::ShutdownRequested)
                    });
                }
                if n.stop_pending {
                    step("N: accepts stopped", &|w| {
                        w.n().stop_pending = false;
                        w.n_event(Event::AcceptStopped)?;
                        w.n_succession(SE::LetGo)
                    });
                }
                if n.drain_active && !n.drained_fed && !n.accepting && !n.stop_pending {
                    step("N: connections done", &|w| {
                        w.n().drained_fed = true;
                        w.n_event(Event::ConnectionsDrained)
                    });
                }
                if self.n_crashes_left > 0 {
                    step("N: crashes", &|w| {
                        w.n_crashes_left -= 1;
                        w.crashed = true;
                        w.crashed_alone = w.p.is_none();
                        let pid = w.n().pid;
                        w.n = Child::Dead {
                            pid,
                            exit_seen: false,
                        };
                        Ok(())
                    });
                }
            }
            _ => {}
        }
        out
    }

    fn p_read_one(&mut self) -> Result<(), String> {
        let event = match self.to_p.pop_front().expect("a message") {
            Msg::Ready(id) => Event::ChildReady(id),
            Msg::Retiring => Event::ChildRetired,
            Msg::Serving => Event::ChildResumed,
            other => Event::ChildMessageInvalid(format!("{other:?}")),
        };
        self.p_event(event)
    }

    /// `Driver::feed` before a shutdown and `on_time` before the ready deadline: a READY
    /// already on the channel counts.
    fn p_take_messages_if_handing_over(&mut self) -> Result<(), String> {
        while self.p().m.phase() == Phase::HandingOver && self.channel_open && !self.to_p.is_empty()
        {
            self.p_read_one()?;
        }
        Ok(())
    }

    /// The invariants of every state.
    fn check(&self) -> Result<(), String> {
        let p_acc = self.p.as_ref().is_some_and(|p| p.accepting);
        let n_acc = matches!(&self.n, Child::Running(n) if n.accepting);
        if !p_acc && !n_acc && !self.crashed && !self.shutdown_requested {
            return Err("no process accepts".into());
        }
        Ok(())
    }

    /// Events from outside, which may or may not come: a state whose only moves are these is at
    /// rest.
    const EXTERNAL: [&str; 4] = [
        "P: upgrade requested",
        "P: SIGTERM",
        "N: SIGTERM",
        "N: crashes",
    ];

    /// The invariants once no event is left but those from outside.
    fn check_at_rest(&self) -> Result<(), String> {
        let n = match &self.n {
            Child::Running(n) => Some(n.as_ref()),
            _ => None,
        };
        let serving = |p: &Proc| {
            p.accepting
                && p.m.phase() == Phase::Serving
                && self.systemd_main == p.pid
                && p.s.is_main()
        };
        match (&self.p, n) {
            (Some(p), None) if serving(p) && !self.p_shut => Ok(()),
            (None, Some(n)) if serving(n) => Ok(()),
            (None, None) if self.p_shut || self.n_shut || self.crashed_alone => Ok(()),
            _ => Err("at rest, not exactly one process serving as the main one".into()),
        }
    }
}

/// Walks every interleaving from the start; returns the number of distinct states visited,
/// or the first violation with the path to it.
fn explore(bug: Bug) -> Result<usize, String> {
    let start = World::new(bug)?;
    let mut seen = HashSet::new();
    let mut stack = vec![(start, Vec::<&'static str>::new())];
    let mut at_rest = 0usize;
    while let Some((w, path)) = stack.pop() {
        if !seen.insert(key(&w)) {
            continue;
        }
        assert!(seen.len() < 2_000_000, "the state space is not bounded");
        let moves = w.moves();
        if moves.iter().all(|(name, _)| World::EXTERNAL.contains(name)) {
            at_rest += 1;
            w.check_at_rest()
                .map_err(|e| format!("{e}\n  state: {w}\n  path: {}", path.join(" → ")))?;
        }
        for (name, next) in moves {
            let mut path = path.clone();
            path.push(name);
            match next {
                Ok(next) => stack.push((next, path)),
                Err(e) => {
                    return Err(format!(
                        "{e}\n  state before: {w}\n  path: {}",
                        path.join(" → ")
                    ))
                }
            }
        }
    }
    assert!(at_rest > 0);
    Ok(seen.len())
}

#[test]
fn every_interleaving_of_an_upgrade_keeps_the_guarantees() {
    match explore(Bug::None) {
        Ok(states) => {
            eprintln!("explored {states} states");
            assert!(
                states > 10_000,
                "only {states} states: the model lost a branch"
            );
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_explorer_catches_each_planted_bug() {
    for bug in [
        Bug::ReadyBeforeArming,
        Bug::AlwaysKill,
        Bug::ExitBeforeMessages,
        Bug::StoppingFromAnyone,
    ] {
        let found = explore(bug);
        assert!(found.is_err(), "{bug:?} went unnoticed");
        eprintln!(
            "{bug:?}: {}",
            found.unwrap_err().lines().next().unwrap_or("")
        );
    }
}
