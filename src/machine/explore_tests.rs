//! Generations of a service together: each process runs the upgrade machine and its successor's
//! side (`Succession`), each pair of generations shares a handoff channel, and a model of each
//! driver carries out the actions. A depth-first search walks every interleaving of their events
//! up to small budgets (two upgrade requests — so up to three generations, a successor upgrading
//! before its predecessor let go —, one operator SIGTERM to any process, one crash, one failed
//! start, one application's commit to a drain as `http::Incoming` makes it, at any moment after
//! that drain began, one READY that lands just after its predecessor's ready deadline read the
//! channel and before it closed it) and checks on every state it visits:
//!
//! - **coverage**: unless a process crashed or the operator stopped one, some process has its
//!   accepts armed at every moment;
//! - **no connection closed unserved**: no process that may hold connections (its accepts were
//!   armed) is SIGKILLed, and none exits with its accepts still armed;
//! - **systemd hears the truth**: only the process systemd knows as the main one says
//!   `STOPPING=1`;
//! - **a READY counts**: no child is abandoned with its READY unread on the channel, unless it
//!   landed after the predecessor's last read (the late READY above: that child must then take
//!   itself for abandoned, which the systemd and at-rest checks hold it to);
//! - **a planned exit is no crash**: no process takes the service back after its successor
//!   announced its exit (RETIRING);
//! - **a closed application gets nothing**: once a commit is answered (the application stopped
//!   taking connections), that process's accepts are stopped and never armed again;
//! - **at rest** (nothing left but what the operator or a crash may do): at most one process
//!   runs and it serves as the main one (exactly one unless the operator stopped it or it
//!   crashed alone); and no connection waits in a queue with nobody woken for it — after a
//!   process lets go (its cancelled accept may have spent a connection's wake-up, see
//!   `driver/takeover.rs`), some process that accepts has swept the queue since.
//!
//! The model carries out actions the way `driver/` does (the comments name the driver's
//! functions); where it is coarser than the kernel, it allows more orders, never fewer, except
//! that a pending signal of each kind is delivered as it comes (the kernel merges a second
//! pending SIGTERM into the first). `Bug` plants a known mistake in it, and each must be
//! caught, so the search is shown able to fail.
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use super::successor::{Notice, Stage, Succession, SuccessionAction as SA, SuccessionEvent as SE};
use super::*;

const TIMEOUTS: Timeouts = Timeouts {
    ready: Duration::from_secs(5),
    drain: Duration::from_secs(30),
};
/// Generation `g` has pid `FIRST_PID + g`.
const FIRST_PID: u32 = 100;

/// Mistakes the model's driver can be made to make; each must break an invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// A successor sends READY before its accepts are armed.
    ReadyBeforeArming,
    /// A predecessor SIGKILLs every child it abandons.
    AlwaysKill,
    /// A predecessor judges its successor's exit without reading what it sent before it.
    ExitBeforeMessages,
    /// `CheckSuccessor` looks at the pidfd without reading the successor's messages first.
    CheckBeforeMessages,
    /// A process says `STOPPING=1` whenever it shuts down, main or not.
    StoppingFromAnyone,
    /// `ReadSuccessor` is answered without reading the channel.
    ReadNothing,
    /// A commit is answered while the accepts are still stopping (`drain_commit` → `None`).
    CommitAnsweredEarly,
    /// A successor takes its predecessor's closed channel for its exit even with the
    /// predecessor's SIGTERM pending (`on_predecessor_recv` before helper-30's review).
    EofIsAnExit,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Msg {
    Hello(UpgradeId),
    Released(UpgradeId),
    Ready(UpgradeId),
    Retiring,
    Serving,
}

/// The handoff channel between a generation and its predecessor.
#[derive(Clone, Debug)]
struct Link {
    pred: usize,
    upgrade: UpgradeId,
    to_succ: VecDeque<Msg>,
    to_pred: VecDeque<Msg>,
    /// The predecessor's end is open: it neither abandoned the successor nor exited.
    open: bool,
    /// The HELLO's send completion is pending in the predecessor's ring.
    hello_pending: bool,
    /// A READY is on the open channel.
    ready_queued: bool,
    /// The successor's last notice was RETIRING: its exit is planned.
    retiring: bool,
}

/// A running process as its driver sees it.
#[derive(Clone, Debug)]
struct Proc {
    m: Machine,
    s: Succession,
    /// Its accepts are armed (or their cancel is still in flight).
    accepting: bool,
    stop_pending: bool,
    drain_active: bool,
    drained_fed: bool,
    /// Its accepts were armed at some point: it may hold connections.
    held: bool,
    /// Its predecessor sent it SIGTERM, not delivered yet.
    sigterm_from_pred: bool,
    /// Its predecessor's end closed and it has not been told yet.
    pred_gone_unseen: bool,
    /// READY is to be sent (a step of its own: the accepts run meanwhile).
    ready_pending: bool,
    /// The successor it is handing over to or drained for (`Driver::successor`).
    successor: Option<usize>,
    /// When its accepts were last armed: exclusive accept wake-ups go to the waiter armed
    /// first.
    armed_at: u32,
    /// The application's shutdown signal read this drain number and will commit to it
    /// (`Incoming::shutdown_signal`: it sleeps the idle grace first).
    commit_due: Option<u64>,
    /// A commit sent, its answer not had yet (`Handle::commit_drain`, answered each turn).
    commit_asked: Option<u64>,
    /// The application stopped taking connections: its commit was answered yes.
    app_closed: bool,
}

#[derive(Clone, Debug)]
enum Life {
    /// Started, reading its HELLO.
    Spawned,
    Running(Box<Proc>),
    /// Gone; `exit_seen` once its predecessor's exit watch fed it.
    Dead {
        exit_seen: bool,
    },
}

#[derive(Clone, Debug)]
struct Gen {
    life: Life,
    /// The channel to its predecessor (none for the first generation).
    link: Option<Link>,
}

#[derive(Clone, Debug)]
struct World {
    bug: Bug,
    t0: Instant,
    now: Instant,
    gens: Vec<Gen>,
    /// A spawn in flight on its thread: the spawning generation and its upgrade.
    spawning: Option<(usize, UpgradeId)>,
    /// The pid systemd knows as the service's main process.
    systemd_main: u32,
    upgrades_left: u8,
    /// Budget of READYs landing after the predecessor's deadline read (see the module docs).
    late_readies_left: u8,
    /// The child whose READY lands at its predecessor's next `AbandonSuccessor`.
    late_ready: Option<usize>,
    shutdowns_left: u8,
    crashes_left: u8,
    start_failures_left: u8,
    commits_left: u8,
    /// The operator stopped a process.
    shut: bool,
    crashed: bool,
    /// A crash of the only running process: nobody is left to take over.
    crashed_alone: bool,
    /// A process let go since some accepting process last swept its queues.
    stranded: bool,
    /// A middle generation crashed with both its predecessor and its successor alive: the
    /// known split (RELIABILITY.md) where both may serve and both think they are the main one.
    middle_crashed: bool,
    /// Counts the arming of accepts (`Proc::armed_at`).
    arms: u32,
    /// A committed drain's successor died unannounced where the driver logs it
    /// (`log_if_nobody_left`): that process never serves again, so nobody may (the documented
    /// price of `Incoming`).
    lost: bool,
}

fn pid(g: usize) -> u32 {
    FIRST_PID + g as u32
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (g, gen) in self.gens.iter().enumerate() {
            match &gen.life {
                Life::Running(p) => write!(
                    f,
                    "[{} {:?} acc={} {:?}] ",
                    pid(g),
                    p.m.phase(),
                    p.accepting,
                    p.s.stage()
                )?,
                other => write!(f, "[{} {other:?}] ", pid(g))?,
            }
        }
        write!(f, "main {}", self.systemd_main)
    }
}

/// The memo key: a hash of everything but the clock's base.
fn key(w: &World) -> u64 {
    let mut w = w.clone();
    let offset = w.now - w.t0;
    w.now = w.t0;
    let mut h = DefaultHasher::new();
    format!("{offset:?}{w:?}").hash(&mut h);
    h.finish()
}

type Step = Result<(), String>;
/// Records one move: its name, whether it comes from outside, and what it does.
type Mover<'a> = dyn FnMut(String, bool, &dyn Fn(&mut World) -> Step) + 'a;

impl World {
    fn new(bug: Bug) -> Result<World, String> {
        let t0 = Instant::now();
        let first = Proc {
            m: Machine::new(TIMEOUTS, 0),
            s: Succession::alone(),
            accepting: true,
            stop_pending: false,
            drain_active: false,
            drained_fed: false,
            held: true,
            sigterm_from_pred: false,
            pred_gone_unseen: false,
            ready_pending: false,
            successor: None,
            armed_at: 0,
            commit_due: None,
            commit_asked: None,
            app_closed: false,
        };
        let mut w = World {
            bug,
            t0,
            now: t0,
            gens: vec![Gen {
                life: Life::Running(Box::new(first)),
                link: None,
            }],
            spawning: None,
            systemd_main: pid(0),
            upgrades_left: 2,
            late_readies_left: 1,
            late_ready: None,
            shutdowns_left: 1,
            crashes_left: 1,
            start_failures_left: 1,
            commits_left: 1,
            shut: false,
            crashed: false,
            crashed_alone: false,
            stranded: false,
            middle_crashed: false,
            arms: 0,
            lost: false,
        };
        w.succession(0, SE::Started)?;
        Ok(w)
    }

    fn proc(&mut self, g: usize) -> &mut Proc {
        match &mut self.gens[g].life {
            Life::Running(p) => p,
            other => unreachable!("generation {g} is not running: {other:?}"),
        }
    }

    fn running(&self, g: usize) -> bool {
        matches!(self.gens[g].life, Life::Running(_))
    }

    fn link(&mut self, g: usize) -> &mut Link {
        self.gens[g].link.as_mut().expect("a successor has a link")
    }

    fn event(&mut self, g: usize, event: Event) -> Step {
        let now = self.now;
        self.proc(g).m.handle(event, now);
        self.actions(g)
    }

    fn succession(&mut self, g: usize, event: SE) -> Step {
        let now = self.now;
        self.proc(g).s.handle(event, now);
        self.actions(g)
    }

    /// `g`'s machine deadline `at` fires (the clock moves there if it is behind).
    fn fire_deadline(&mut self, g: usize, at: Instant) -> Step {
        self.now = self.now.max(at);
        let now = self.now;
        self.proc(g).m.handle_timeout(now);
        self.actions(g)
    }

    /// `Driver::run_actions`: both machines' actions, until neither has one.
    fn actions(&mut self, g: usize) -> Step {
        loop {
            if !self.running(g) {
                return Ok(());
            }
            if let Some(action) = self.proc(g).s.poll_action() {
                self.act_succession(g, action)?;
            } else if let Some(action) = self.proc(g).m.poll_action() {
                self.act(g, action)?;
            } else {
                return Ok(());
            }
        }
    }

    /// `Driver::act_succession` (`driver/takeover.rs`).
    fn act_succession(&mut self, g: usize, action: SA) -> Step {
        match action {
            SA::SendReady => self.proc(g).ready_pending = true,
            // READY=1 alone names no main process; MAINPID= does.
            SA::AnnounceReady => {}
            SA::AnnounceMain => self.systemd_main = pid(g),
            SA::AnnounceStopping if self.systemd_main != pid(g) && !self.middle_crashed => {
                return Err(format!("STOPPING=1 from {}, not the main process", pid(g)))
            }
            SA::TellPredecessor(notice) => {
                let link = self.link(g);
                link.retiring = notice == Notice::Retiring;
                if link.open {
                    link.to_pred.push_back(match notice {
                        Notice::Retiring => Msg::Retiring,
                        Notice::Serving => Msg::Serving,
                    });
                }
            }
            SA::QueuesFree => {
                if self.proc(g).accepting {
                    self.stranded = false; // `sweep_queues`
                }
                // Its actions run after this one's (`run_actions`).
                let now = self.now;
                self.proc(g).m.handle(Event::PredecessorLetGo, now);
            }
            SA::AnnounceStopping
            | SA::ForgetPredecessor
            | SA::DiscardOldPidFile
            | SA::RestorePidFile
            | SA::ListenDeferred
            | SA::StartTakeover
            | SA::EndTakeover => {}
        }
        Ok(())
    }

    /// `Driver::act` (`driver/upgrade.rs`).
    fn act(&mut self, g: usize, action: Action) -> Step {
        match action {
            Action::SpawnSuccessor(upgrade) => self.spawning = Some((g, upgrade)),
            Action::SendListeners(upgrade) => {
                let child = self.proc(g).successor.expect("a child");
                let link = self.link(child);
                link.to_succ.push_back(Msg::Hello(upgrade));
                link.hello_pending = true;
            }
            Action::StopAccepting => {
                let p = self.proc(g);
                p.accepting = false;
                p.stop_pending = true;
            }
            Action::ResumeAccepting => {
                let child_retired = self
                    .last_child(g)
                    .is_some_and(|c| self.gens[c].link.as_ref().is_some_and(|l| l.retiring));
                if child_retired {
                    return Err(format!(
                        "{} took the service back after its successor announced its exit",
                        pid(g)
                    ));
                }
                let p = self.proc(g);
                p.accepting = true;
                p.stop_pending = false;
                self.arm(g);
                self.succession(g, SE::Resumed)?;
            }
            Action::StartDrain(cause) => {
                if self.bug == Bug::StoppingFromAnyone
                    && cause == DrainCause::Shutdown
                    && self.systemd_main != pid(g)
                {
                    return Err(format!("STOPPING=1 from {}, not the main process", pid(g)));
                }
                let commits_left = self.commits_left;
                let p = self.proc(g);
                p.drain_active = true;
                p.drained_fed = false;
                if commits_left > 0 && !p.app_closed && p.commit_due.is_none() {
                    // `Incoming::shutdown_signal` wakes on the Draining phase and reads the
                    // drain's number (published before the phase). One read earlier and not
                    // sent yet stays: it may reach a later drain (and be refused).
                    p.commit_due = Some(p.m.drains_started());
                }
                self.succession(g, SE::Draining(cause))?;
            }
            Action::StopDrain => self.proc(g).drain_active = false,
            Action::AbandonSuccessor { pid: child, stop } => {
                if let Some(c) = self.late_ready.take().filter(|&c| pid(c) == child) {
                    // `send_ready` of the child runs between the deadline's read of the
                    // channel (`take_successor_messages`, which found nothing) and the close:
                    // its READY is in the socket and never read.
                    if self.running(c) && self.proc(c).ready_pending && self.link(c).open {
                        self.proc(c).ready_pending = false;
                        self.succession(c, SE::ReadySent)?;
                    }
                }
                self.abandon(g, child, stop)?
            }
            Action::ReadSuccessor => {
                if self.bug != Bug::ReadNothing {
                    self.take_successor_messages(g)?;
                }
                if self.running(g) {
                    self.event(g, Event::SuccessorRead)?;
                }
            }
            Action::CheckSuccessor(child) => {
                if self.bug != Bug::CheckBeforeMessages {
                    self.take_successor_messages(g)?;
                    if !self.running(g) {
                        return Ok(()); // a RETIRING ended the drain
                    }
                }
                let alive = self
                    .proc(g)
                    .successor
                    .is_some_and(|c| pid(c) == child && self.running(c));
                // `log_if_nobody_left`, as at the exit watch.
                self.lost |= !alive && self.proc(g).m.exit_leaves_nobody(child);
                self.event(g, Event::SuccessorChecked { pid: child, alive })?;
            }
            Action::Reply(_, Outcome::Upgraded { pid }) => self.systemd_main = pid,
            Action::Reply(..) | Action::PhaseChanged(_) => {}
            Action::Exit(_) => {
                let p = self.proc(g);
                if p.accepting || p.stop_pending {
                    return Err(format!("{} exits with its accepts armed", pid(g)));
                }
                self.gens[g].life = Life::Dead { exit_seen: false };
                self.close_links_of(g);
            }
        }
        Ok(())
    }

    /// `g`'s accepts are armed (anew): a fresh accept takes what is queued before it waits,
    /// which sweeps; its wait-queue entries go behind the others'.
    fn arm(&mut self, g: usize) {
        self.arms += 1;
        let at = self.arms;
        let p = self.proc(g);
        if p.accepting {
            p.armed_at = at;
            self.stranded = false;
        }
    }

    /// Generation `g` dies abruptly (SIGKILL from outside, a bug).
    fn crash(&mut self, g: usize) -> Step {
        self.crashes_left -= 1;
        self.crashed = true;
        // Alone: no other process serves or will (one draining or told to stop is on its way
        // out).
        self.crashed_alone = !(0..self.gens.len()).any(|o| {
            o != g
                && match &self.gens[o].life {
                    Life::Spawned => true,
                    Life::Running(q) => {
                        q.m.phase() != Phase::Draining
                            && !q.sigterm_from_pred
                            && q.s.stage() != Stage::Abandoned
                    }
                    Life::Dead { .. } => false,
                }
        });
        let pred_alive = self.gens[g]
            .link
            .as_ref()
            .is_some_and(|l| self.running(l.pred));
        let child_alive = (0..self.gens.len()).any(|c| {
            self.gens[c].link.as_ref().is_some_and(|l| l.pred == g)
                && matches!(self.gens[c].life, Life::Spawned | Life::Running(_))
        });
        self.middle_crashed |= pred_alive && child_alive;
        self.gens[g].life = Life::Dead { exit_seen: false };
        self.close_links_of(g);
        Ok(())
    }

    /// The youngest child generation of `g`, if any.
    fn last_child(&self, g: usize) -> Option<usize> {
        (0..self.gens.len())
            .rev()
            .find(|&c| self.gens[c].link.as_ref().is_some_and(|l| l.pred == g))
    }

    /// `g` exited or abandoned its children: their channels' predecessor ends close.
    fn close_links_of(&mut self, g: usize) {
        for c in 0..self.gens.len() {
            let Some(link) = &mut self.gens[c].link else {
                continue;
            };
            if link.pred == g && link.open {
                link.open = false;
                link.to_pred.clear();
                // The HELLO is in the socket (or not); nobody waits for the send now.
                link.hello_pending = false;
                if let Life::Running(p) = &mut self.gens[c].life {
                    p.pred_gone_unseen = true;
                }
            }
        }
    }

    /// `send_released`: RELEASED to the current successor, if any.
    fn send_released(&mut self, g: usize) {
        if let Some(c) = self.proc(g).successor {
            let link = self.link(c);
            if link.open {
                let upgrade = link.upgrade;
                link.to_succ.push_back(Msg::Released(upgrade));
            }
        }
    }

    /// `Action::AbandonSuccessor`.
    fn abandon(&mut self, g: usize, child: u32, stop: Stop) -> Step {
        let stop = if self.bug == Bug::AlwaysKill {
            Stop::Kill
        } else {
            stop
        };
        let Some(c) = self.proc(g).successor.filter(|&c| pid(c) == child) else {
            return Ok(());
        };
        self.proc(g).successor = None;
        let link = self.link(c);
        if link.ready_queued && link.open && !link.to_pred.is_empty() {
            return Err(format!(
                "{child} abandoned with its READY unread on the channel"
            ));
        }
        link.open = false;
        link.to_pred.clear();
        link.hello_pending = false;
        match (&mut self.gens[c].life, stop) {
            (Life::Running(p), Stop::Kill) if p.held => {
                return Err(format!("SIGKILL of {child}, which may hold connections"))
            }
            (Life::Running(_) | Life::Spawned, Stop::Kill) => {
                self.gens[c].life = Life::Dead { exit_seen: false };
                self.close_links_of(c);
            }
            (Life::Running(p), Stop::Terminate) => {
                p.sigterm_from_pred = true;
                p.pred_gone_unseen = true;
            }
            // Still starting: the SIGTERM's default action ends it before `build` blocks the
            // signal, or `prepare` finds the channel closed with its predecessor alive.
            (Life::Spawned, Stop::Terminate) => {
                self.gens[c].life = Life::Dead { exit_seen: false };
            }
            (Life::Dead { .. }, _) => {}
        }
        Ok(())
    }

    /// `take_successor_messages`: what the successor said and was not read yet.
    fn take_successor_messages(&mut self, g: usize) -> Step {
        while let Some(c) = self.running(g).then(|| self.proc(g).successor).flatten() {
            let link = self.link(c);
            if !link.open {
                return Ok(());
            }
            let Some(msg) = link.to_pred.pop_front() else {
                return Ok(());
            };
            self.read(g, msg)?;
        }
        Ok(())
    }

    fn read(&mut self, g: usize, msg: Msg) -> Step {
        let event = match msg {
            Msg::Ready(id) => Event::SuccessorReady(id),
            Msg::Retiring => Event::SuccessorRetired,
            Msg::Serving => Event::SuccessorResumed,
            other => Event::SuccessorMessageInvalid(format!("{other:?}")),
        };
        self.event(g, event)
    }

    /// Generation `c` reads its HELLO and starts (`build`, `Driver::prepare`, `start`).
    fn start(&mut self, c: usize, fail: bool) -> Step {
        let link = self.link(c);
        let (pred, open) = (link.pred, link.open);
        link.to_succ.pop_front();
        // `prepare` fails if the predecessor gave up meanwhile (channel closed, it alive; a
        // child still starting was never sent its SIGTERM in this model: see `abandon`).
        if fail || (!open && self.running(pred)) {
            self.gens[c].life = Life::Dead { exit_seen: false };
            return Ok(());
        }
        let armed = self.bug != Bug::ReadyBeforeArming;
        self.gens[c].life = Life::Running(Box::new(Proc {
            m: Machine::new(TIMEOUTS, u64::from(pid(c)) << 8).with_predecessor(),
            s: Succession::handed_over(),
            accepting: armed,
            stop_pending: false,
            drain_active: false,
            drained_fed: false,
            held: armed,
            sigterm_from_pred: false,
            pred_gone_unseen: !open,
            ready_pending: false,
            successor: None,
            armed_at: 0,
            commit_due: None,
            commit_asked: None,
            app_closed: false,
        }));
        self.arm(c);
        self.succession(c, SE::Started)
    }

    // ---- The search

    /// Every state one event away, with the event's name and whether it comes from outside
    /// (the operator, a crash) rather than from what the processes already do.
    fn moves(&self) -> Vec<(String, bool, Result<World, String>)> {
        let mut out = Vec::new();
        let mut step = |name: String, external: bool, f: &dyn Fn(&mut World) -> Step| {
            let mut w = self.clone();
            let r = f(&mut w).and_then(|()| w.check()).map(|()| w);
            out.push((name, external, r));
        };
        for g in 0..self.gens.len() {
            let me = pid(g);
            match &self.gens[g].life {
                Life::Running(p) => self.running_moves(g, p, &mut step),
                Life::Spawned => {
                    let link = self.gens[g].link.as_ref().expect("a link");
                    let hello =
                        !link.hello_pending && matches!(link.to_succ.front(), Some(Msg::Hello(_)));
                    if hello {
                        step(format!("{me}: reads HELLO, starts"), false, &|w| {
                            w.start(g, false)
                        });
                        if self.start_failures_left > 0 {
                            step(format!("{me}: fails to start"), false, &|w| {
                                w.start_failures_left -= 1;
                                w.start(g, true)
                            });
                        }
                    } else if !link.open && !link.hello_pending {
                        step(format!("{me}: finds the channel closed"), false, &|w| {
                            w.gens[g].life = Life::Dead { exit_seen: false };
                            Ok(())
                        });
                    }
                }
                Life::Dead { exit_seen: false } => {
                    let pred = self.gens[g].link.as_ref().map(|l| l.pred);
                    match pred {
                        Some(pred) if self.running(pred) => {
                            step(format!("{}: sees {me} exit", pid(pred)), false, &|w| {
                                // `on_successor_exit`: what it said first.
                                if w.proc(pred).successor == Some(g) {
                                    if w.bug != Bug::ExitBeforeMessages {
                                        w.take_successor_messages(pred)?;
                                    }
                                    if w.running(pred) {
                                        w.proc(pred).successor = None;
                                    }
                                    let link = w.link(g);
                                    link.open = false;
                                    link.to_pred.clear();
                                }
                                w.gens[g].life = Life::Dead { exit_seen: true };
                                if !w.running(pred) {
                                    return Ok(());
                                }
                                // `on_successor_exit` → `log_if_nobody_left`.
                                w.lost |= w.proc(pred).m.exit_leaves_nobody(me);
                                w.event(
                                    pred,
                                    Event::SuccessorExited {
                                        pid: me,
                                        status: "exited".into(),
                                    },
                                )
                            });
                        }
                        _ => {}
                    }
                }
                Life::Dead { .. } => {}
            }
        }
        // Timing assumption: a drain timeout (30 s) is far longer than anything else the
        // processes do (a driver turn, a message, a cancel), so a drain deadline fires only
        // once nothing else is left to happen but what comes from outside.
        let busy = out
            .iter()
            .any(|(name, external, _)| !external && !name.ends_with("Draining deadline"));
        if busy {
            out.retain(|(name, _, _)| !name.ends_with("Draining deadline"));
        }
        out
    }

    fn running_moves(&self, g: usize, p: &Proc, step: &mut Mover<'_>) {
        let me = pid(g);
        if p.ready_pending {
            // Inside `Driver::start`: READY goes out before this process reads any event of
            // its own (a crash aside); the others run meanwhile.
            return self.ready_moves(g, p, step);
        }
        // From outside: SIGHUP to the main process, or to whichever process serves (the pid
        // file names a new process from its READY on, before its predecessor has read it; or
        // the application's own `Handle::upgrade`); a SIGTERM to anyone.
        if self.upgrades_left > 0 && (self.systemd_main == me || p.m.phase() == Phase::Serving) {
            step(format!("{me}: upgrade requested"), true, &|w| {
                w.upgrades_left -= 1;
                w.event(g, Event::EldersDraining(0))?;
                w.event(g, Event::UpgradeRequested(Requester::Signal))
            });
        }
        if self.shutdowns_left > 0 {
            step(format!("{me}: SIGTERM"), true, &|w| {
                w.shutdowns_left -= 1;
                w.shut = true;
                w.event(g, Event::ShutdownRequested)
            });
        }
        if self.crashes_left > 0 {
            step(format!("{me}: crashes"), true, &|w| w.crash(g));
        }
        // Its own upgrade.
        if let Some((spawner, upgrade)) = self.spawning {
            if spawner == g {
                step(format!("{me}: spawn done"), false, &|w| {
                    w.spawning = None;
                    if !w.proc(g).m.awaits_spawn(upgrade) {
                        return Ok(()); // `collect_spawns` kills a child nobody waits for
                    }
                    let c = w.gens.len();
                    w.gens.push(Gen {
                        life: Life::Spawned,
                        link: Some(Link {
                            pred: g,
                            upgrade,
                            to_succ: VecDeque::new(),
                            to_pred: VecDeque::new(),
                            open: true,
                            hello_pending: false,
                            ready_queued: false,
                            retiring: false,
                        }),
                    });
                    w.proc(g).successor = Some(c);
                    w.event(g, Event::SuccessorSpawned { pid: pid(c) })
                });
                step(format!("{me}: spawn failed"), false, &|w| {
                    w.spawning = None;
                    if w.proc(g).m.phase() != Phase::Forking {
                        return Ok(());
                    }
                    w.event(g, Event::SpawnFailed("ENOENT".into()))
                });
            }
        }
        if let Some(c) = p.successor {
            let link = self.gens[c].link.as_ref().expect("a link");
            if link.hello_pending {
                step(format!("{me}: HELLO sent"), false, &|w| {
                    w.link(c).hello_pending = false;
                    let alive = matches!(w.gens[c].life, Life::Spawned | Life::Running(_));
                    if alive && w.link(c).open {
                        w.event(g, Event::ListenersSent)
                    } else {
                        w.event(g, Event::HandoffFailed("EPIPE".into()))
                    }
                });
            }
            // The ring reads the channel only until READY (`on_successor_recv`).
            if p.m.awaits_ready() && link.open && !link.to_pred.is_empty() {
                step(
                    format!("{me}: reads its successor's message"),
                    false,
                    &|w| {
                        let msg = w.link(c).to_pred.pop_front().expect("a message");
                        w.read(g, msg)
                    },
                );
            }
        }
        if p.stop_pending {
            step(format!("{me}: accepts stopped"), false, &|w| {
                w.proc(g).stop_pending = false;
                // Its cancelled accept may have spent a connection's wake-up, if it was the
                // first waiter (no accepting process armed before it). Promised for a let-go
                // to a successor, whose chain sweeps on RELEASED; a shutdown's let-go beside
                // an unrelated process that accepts (one that resumed) is not covered.
                let mine = w.proc(g).armed_at;
                let behind = (0..w.gens.len()).any(|o| {
                    matches!(&w.gens[o].life, Life::Running(q) if q.accepting && q.armed_at < mine)
                });
                let upgraded = w.proc(g).m.current_upgrade().is_some();
                w.stranded |= !behind && upgraded;
                w.event(g, Event::AcceptStopped)?;
                if w.running(g) {
                    w.send_released(g); // `report_if_stopped`
                }
                Ok(())
            });
        }
        if p.drain_active && !p.drained_fed && !p.accepting && !p.stop_pending {
            step(format!("{me}: connections done"), false, &|w| {
                w.proc(g).drained_fed = true;
                w.event(g, Event::ConnectionsDrained)
            });
        }
        // The application's commit (feature `axum`): after its idle grace, at any point of
        // this drain or later (it may find the drain resumed, or another begun).
        if let (Some(seq), true) = (p.commit_due, self.commits_left > 0) {
            step(
                format!("{me}: the application commits drain {seq}"),
                false,
                &|w| {
                    w.commits_left -= 1;
                    let p = w.proc(g);
                    p.commit_due = None;
                    p.commit_asked = Some(seq);
                    w.event(g, Event::DrainCommitted(seq))
                },
            );
        }
        if let Some(seq) = p.commit_asked {
            // `Driver::answer_commits`, at a turn's end.
            let answer = match p.m.drain_commit(seq) {
                None if self.bug == Bug::CommitAnsweredEarly => Some(true),
                answer => answer,
            };
            if let Some(yes) = answer {
                step(format!("{me}: commit {seq} answered {yes}"), false, &|w| {
                    let p = w.proc(g);
                    p.commit_asked = None;
                    // Yes: the application takes no more connections, for good. No: that
                    // drain resumed; it would wait for the next (no budget for a second).
                    p.app_closed |= yes;
                    Ok(())
                });
            }
        }
        if let Some(deadline) = p.m.poll_timeout() {
            step(format!("{me}: {:?} deadline", p.m.phase()), false, &|w| {
                w.fire_deadline(g, deadline)
            });
            // The ready deadline, with the successor's READY landing just after its read.
            let readying = p.successor.filter(|&c| {
                matches!(&self.gens[c].life, Life::Running(q) if q.ready_pending)
                    && self.gens[c].link.as_ref().is_some_and(|l| l.open)
            });
            if let (Phase::HandingOver, Some(c), 1..) =
                (p.m.phase(), readying, self.late_readies_left)
            {
                step(
                    format!(
                        "{me}: ready deadline; {}'s READY lands after the read",
                        pid(c)
                    ),
                    false,
                    &|w| {
                        w.late_readies_left -= 1;
                        w.late_ready = Some(c);
                        w.fire_deadline(g, deadline)?;
                        // Only at this deadline's own rollback.
                        w.late_ready = None;
                        Ok(())
                    },
                );
            }
        }
        // As a successor.
        let Some(link) = &self.gens[g].link else {
            return;
        };
        self.ready_moves(g, p, step);
        // What the predecessor sent stays readable after it closed its end.
        if !link.to_succ.is_empty() {
            step(
                format!("{me}: reads its predecessor's message"),
                false,
                &|w| {
                    let msg = w.link(g).to_succ.pop_front();
                    let ours = w.link(g).upgrade;
                    match msg {
                        Some(Msg::Released(id)) if id == ours => w.succession(g, SE::Released),
                        _ => Ok(()),
                    }
                },
            );
        }
        if p.pred_gone_unseen && link.to_succ.is_empty() {
            step(format!("{me}: its predecessor's end closed"), false, &|w| {
                w.proc(g).pred_gone_unseen = false;
                // `on_predecessor_recv`: with its SIGTERM pending, it gave up on this process.
                if w.proc(g).sigterm_from_pred && w.bug != Bug::EofIsAnExit {
                    w.succession(g, SE::GaveUp)
                } else {
                    w.succession(g, SE::PredecessorGone)
                }
            });
        }
        if let Some(at) = p.s.poll_timeout() {
            step(format!("{me}: takeover due"), false, &|w| {
                w.now = w.now.max(at);
                let now = w.now;
                let p = w.proc(g);
                let accepting = p.m.accepting();
                p.s.handle_timeout(now, accepting);
                w.actions(g)
            });
        }
        if p.sigterm_from_pred {
            step(format!("{me}: SIGTERM from its predecessor"), false, &|w| {
                w.proc(g).sigterm_from_pred = false;
                // `on_signal`.
                w.succession(g, SE::GaveUp)?;
                w.event(g, Event::PredecessorGaveUp)
            });
        }
    }

    /// Sending READY, and (with the planted bug) arming the accepts after it.
    fn ready_moves(&self, g: usize, p: &Proc, step: &mut Mover<'_>) {
        let me = pid(g);
        if p.ready_pending {
            step(format!("{me}: sends READY"), false, &|w| {
                // `send_ready`: the accepts are armed (unless the planted bug).
                w.proc(g).ready_pending = false;
                let link = w.link(g);
                let (open, upgrade, pred) = (link.open, link.upgrade, link.pred);
                if open {
                    link.ready_queued = true;
                    link.to_pred.push_back(Msg::Ready(upgrade));
                    w.succession(g, SE::ReadySent)
                } else {
                    // `predecessor_gave_up`: it lives, or its SIGTERM is pending here.
                    let gave_up = w.running(pred) || w.proc(g).sigterm_from_pred;
                    w.succession(
                        g,
                        SE::ReadyUnsent {
                            predecessor_gave_up: gave_up,
                        },
                    )
                }
            });
        }
        if !p.held {
            step(format!("{me}: arms its accepts"), false, &|w| {
                let p = w.proc(g);
                p.accepting = true;
                p.held = true;
                w.arm(g);
                Ok(())
            });
        }
        if p.ready_pending && self.crashes_left > 0 {
            step(format!("{me}: crashes"), true, &|w| w.crash(g));
        }
    }

    /// The invariants of every state.
    fn check(&self) -> Step {
        let accepting = self
            .gens
            .iter()
            .any(|gen| matches!(&gen.life, Life::Running(p) if p.accepting));
        if !accepting && !self.crashed && !self.shut {
            return Err("no process accepts".into());
        }
        for (g, gen) in self.gens.iter().enumerate() {
            if let Life::Running(p) = &gen.life {
                if p.app_closed && (p.accepting || p.stop_pending) {
                    return Err(format!(
                        "{} accepts for an application that takes no more connections",
                        pid(g)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The invariants once nothing is left but what comes from outside.
    fn check_at_rest(&self) -> Step {
        let running: Vec<(usize, &Proc)> = self
            .gens
            .iter()
            .enumerate()
            .filter_map(|(g, gen)| match &gen.life {
                Life::Running(p) => Some((g, p.as_ref())),
                _ => None,
            })
            .collect();
        let serving = |g: usize, p: &Proc| {
            p.accepting
                && p.m.phase() == Phase::Serving
                && self.systemd_main == pid(g)
                && p.s.is_main()
        };
        match running.as_slice() {
            [(g, p)] if serving(*g, p) => {}
            [(_, p)] if self.middle_crashed && p.accepting && p.m.phase() == Phase::Serving => {}
            // Known limit (RELIABILITY.md): the middle generation crashing during its own
            // handover leaves its predecessor (which resumes) and its successor (alone) both
            // serving. Both accept, so no connection is lost; each is then checked as serving.
            many if self.middle_crashed
                && many.len() == 2
                && many
                    .iter()
                    .all(|(_, p)| p.accepting && p.m.phase() == Phase::Serving)
                && many.iter().any(|&(g, _)| self.systemd_main == pid(g)) => {}
            // Two faults (a crash, then the successor's start fails): nothing to promise.
            [] if self.shut
                || self.crashed_alone
                || (self.crashed && self.lost)
                || (self.crashed && self.start_failures_left == 0) => {}
            _ => return Err("at rest, not exactly one process serving as the main one".into()),
        }
        // Also after a crash: no process is upgraded before its predecessor let go, so no
        // RELEASED chain forms that a crashed middle generation could break.
        if self.stranded && !running.is_empty() {
            return Err(
                "a process let go and no accepting process swept the queues since: a \
                 connection may wait with nobody woken for it"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Walks every interleaving from the start; returns the number of distinct states visited,
/// or the first violation with the path to it.
fn explore(bug: Bug) -> Result<usize, String> {
    let start = World::new(bug)?;
    let mut seen = HashSet::new();
    let mut stack = vec![(start, Vec::<String>::new())];
    let mut at_rest = 0usize;
    while let Some((w, path)) = stack.pop() {
        if !seen.insert(key(&w)) {
            continue;
        }
        assert!(seen.len() < 3_000_000, "the state space is not bounded");
        let moves = w.moves();
        if moves.iter().all(|(_, external, _)| *external) {
            at_rest += 1;
            w.check_at_rest()
                .map_err(|e| format!("{e}\n  state: {w}\n  path: {}", path.join(" → ")))?;
        }
        for (name, _, next) in moves {
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
fn every_interleaving_of_three_generations_keeps_the_guarantees() {
    match explore(Bug::None) {
        Ok(states) => {
            eprintln!("explored {states} states");
            assert!(
                states > 100_000,
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
        Bug::CheckBeforeMessages,
        Bug::StoppingFromAnyone,
        Bug::ReadNothing,
        Bug::CommitAnsweredEarly,
        Bug::EofIsAnExit,
    ] {
        let found = explore(bug);
        assert!(found.is_err(), "{bug:?} went unnoticed");
        eprintln!(
            "{bug:?}: {}",
            found.unwrap_err().lines().next().unwrap_or("")
        );
    }
}
