//! Transition tests for the successor's side: a table over every (stage, event) pair with the
//! facts that change the answer (main, linked, draining), then property tests over random
//! sequences with a virtual clock.
use super::*;
use proptest::prelude::*;

use SuccessionAction as A;
use SuccessionEvent as E;

const UPGRADED: DrainCause = DrainCause::Upgraded {
    child: 4242,
    upgrade: super::super::UpgradeId(7),
};

fn t0() -> Instant {
    // One base for the whole test binary, so the table's `Holding` deadlines compare equal.
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// A machine put in `stage` with the given facts, its action queue empty.
fn at(stage: Stage, main: bool, linked: bool, draining: bool) -> Succession {
    Succession {
        stage,
        linked,
        main,
        draining,
        actions: VecDeque::new(),
    }
}

fn drain(s: &mut Succession) -> Vec<SuccessionAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

const ALL_EVENTS: [SuccessionEvent; 11] = [
    E::Started,
    E::ReadySent,
    E::ReadyUnsent {
        predecessor_gave_up: true,
    },
    E::ReadyUnsent {
        predecessor_gave_up: false,
    },
    E::Released,
    E::PredecessorGone,
    E::GaveUp,
    E::NoDontwait,
    E::Draining(DrainCause::Shutdown),
    E::Draining(UPGRADED),
    E::Resumed,
];

fn holding() -> Stage {
    Stage::Holding {
        takeover_at: t0() + TAKEOVER_AFTER,
    }
}

fn all_stages() -> [Stage; 8] {
    [
        Stage::First,
        Stage::Starting,
        Stage::Readying,
        holding(),
        Stage::TakingOver,
        Stage::Sharing,
        Stage::Alone,
        Stage::Abandoned,
    ]
}

/// What a (stage, event) pair must do, given the facts: (stage after, main after, linked
/// after, draining after, actions).
fn expected(
    stage: Stage,
    event: SuccessionEvent,
    main: bool,
    linked: bool,
    draining: bool,
) -> (Stage, bool, bool, bool, Vec<SuccessionAction>) {
    let same = (stage, main, linked, draining, vec![]);
    let waiting = matches!(
        stage,
        Stage::Holding { .. } | Stage::TakingOver | Stage::Sharing
    );
    let free = |extra_main: bool| {
        let mut actions = vec![];
        if stage == Stage::TakingOver {
            actions.push(A::EndTakeover);
        }
        actions.push(A::QueuesFree);
        (Stage::Alone, main || extra_main, linked, draining, actions)
    };
    // A linked predecessor is forgotten first.
    let forgot = |mut actions: Vec<SuccessionAction>| {
        if linked {
            actions.insert(0, A::ForgetPredecessor);
        }
        actions
    };
    match (stage, event) {
        (Stage::Starting, E::Started) => {
            (Stage::Readying, main, linked, draining, vec![A::SendReady])
        }
        (Stage::First, E::Started) => (
            Stage::Alone,
            main,
            linked,
            draining,
            vec![A::ListenDeferred, A::DiscardOldPidFile, A::AnnounceReady],
        ),
        (Stage::Readying, E::ReadySent) => (
            holding(),
            main,
            linked,
            draining,
            vec![A::DiscardOldPidFile],
        ),
        (
            Stage::Readying,
            E::ReadyUnsent {
                predecessor_gave_up: true,
            },
        ) => (
            Stage::Abandoned,
            false,
            false,
            draining,
            forgot(vec![A::RestorePidFile]),
        ),
        (
            Stage::Readying,
            E::ReadyUnsent {
                predecessor_gave_up: false,
            },
        ) => (
            Stage::Alone,
            true,
            false,
            draining,
            forgot(vec![A::QueuesFree, A::DiscardOldPidFile, A::AnnounceMain]),
        ),
        (_, E::Released) if waiting => free(!draining),
        (Stage::Alone, E::Released) if linked => {
            (stage, main, linked, draining, vec![A::QueuesFree])
        }
        (_, E::GaveUp) if waiting => {
            let mut actions = forgot(vec![]);
            if stage == Stage::TakingOver {
                actions.push(A::EndTakeover);
            }
            (Stage::Abandoned, false, false, draining, actions)
        }
        (_, E::GaveUp) => (stage, main, false, draining, forgot(vec![])),
        (_, E::PredecessorGone) => {
            let (stage, main, _, draining, mut actions) = if waiting && !draining {
                let (stage, _, linked, draining, mut actions) = free(true);
                actions.insert(0, A::AnnounceMain);
                (stage, true, linked, draining, actions)
            } else if waiting {
                free(false)
            } else {
                same
            };
            if linked {
                actions.insert(0, A::ForgetPredecessor);
            }
            (stage, main, false, draining, actions)
        }
        (Stage::Holding { .. }, E::NoDontwait) => (Stage::Sharing, main, linked, draining, vec![]),
        (Stage::TakingOver, E::NoDontwait) => {
            (Stage::Sharing, main, linked, draining, vec![A::EndTakeover])
        }
        (_, E::Draining(cause)) => {
            let mut actions = vec![];
            if cause == DrainCause::Shutdown && main {
                actions.push(A::AnnounceStopping);
            }
            if linked {
                actions.push(A::TellPredecessor(Notice::Retiring));
            }
            let main = main && cause == DrainCause::Shutdown;
            (stage, main, linked, true, actions)
        }
        (_, E::Resumed) => {
            let mut actions = vec![];
            if stage != Stage::Abandoned {
                actions.push(A::AnnounceMain);
            }
            if linked {
                actions.push(A::TellPredecessor(Notice::Serving));
            }
            (
                stage,
                main || stage != Stage::Abandoned,
                linked,
                false,
                actions,
            )
        }
        _ => same,
    }
}

#[test]
fn every_stage_event_pair_with_every_fact() {
    let mut rows = 0;
    for stage in all_stages() {
        for event in ALL_EVENTS {
            for bits in 0..8u8 {
                let (main, linked, draining) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                let mut s = at(stage, main, linked, draining);
                s.handle(event, t0());
                let got = (s.stage, s.main, s.linked, s.draining, drain(&mut s));
                let want = expected(stage, event, main, linked, draining);
                assert_eq!(
                    got, want,
                    "{stage:?} + {event:?} (main {main}, linked {linked}, draining {draining})"
                );
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 8 * 11 * 8);
}

#[test]
fn the_takeover_starts_at_its_deadline_only_while_accepting() {
    for stage in all_stages() {
        for accepting in [true, false] {
            for late in [false, true] {
                let mut s = at(stage, false, true, false);
                let now = if late {
                    t0() + TAKEOVER_AFTER
                } else {
                    t0() + TAKEOVER_AFTER / 2
                };
                s.handle_timeout(now, accepting);
                let got = (s.stage, drain(&mut s));
                let want = match stage {
                    Stage::Holding { .. } if late && accepting => {
                        (Stage::TakingOver, vec![A::StartTakeover])
                    }
                    Stage::Holding { .. } if late => (Stage::Sharing, vec![]),
                    _ => (stage, vec![]),
                };
                assert_eq!(got, want, "{stage:?}, accepting {accepting}, late {late}");
            }
        }
    }
}

#[test]
fn poll_timeout_is_the_takeover_deadline_while_holding() {
    for stage in all_stages() {
        let s = at(stage, false, true, false);
        let want = match stage {
            Stage::Holding { takeover_at } => Some(takeover_at),
            _ => None,
        };
        assert_eq!(s.poll_timeout(), want, "{stage:?}");
    }
}

#[test]
fn a_normal_handover_seen_from_the_new_process() {
    let mut s = Succession::handed_over();
    let now = t0();
    assert!(s.predecessor_holds_queue());
    s.handle(E::Started, now);
    assert_eq!(drain(&mut s), [A::SendReady]);
    s.handle(E::ReadySent, now);
    assert_eq!(drain(&mut s), [A::DiscardOldPidFile]);
    assert!(s.predecessor_holds_queue() && !s.is_main());
    s.handle_timeout(now + TAKEOVER_AFTER, true);
    assert_eq!(drain(&mut s), [A::StartTakeover]);
    assert!(s.taking_over() && !s.predecessor_holds_queue());
    s.handle(E::Released, now);
    assert_eq!(drain(&mut s), [A::EndTakeover, A::QueuesFree]);
    assert!(s.is_main() && !s.taking_over());
    // Its own upgrade later: RETIRING for a predecessor still draining; the new successor is
    // the main process now.
    s.handle(E::Draining(UPGRADED), now);
    assert_eq!(drain(&mut s), [A::TellPredecessor(Notice::Retiring)]);
    assert!(!s.is_main());
    // That successor dies: serving again, SERVING withdraws the RETIRING.
    s.handle(E::Resumed, now);
    assert_eq!(
        drain(&mut s),
        [A::AnnounceMain, A::TellPredecessor(Notice::Serving)]
    );
    assert!(s.is_main());
    s.handle(E::PredecessorGone, now);
    assert_eq!(drain(&mut s), [A::ForgetPredecessor]);
    s.handle(E::Draining(DrainCause::Shutdown), now);
    assert_eq!(drain(&mut s), [A::AnnounceStopping]);
}

#[test]
fn a_release_forwarded_by_an_earlier_ringflip_sweeps_again() {
    // A predecessor of an earlier version, upgraded before its own predecessor noticed its
    // READY, forwards that older process's RELEASED: its accepts were ahead in the queue.
    let mut s = Succession::handed_over();
    let now = t0();
    s.handle(E::Started, now);
    s.handle(E::ReadySent, now);
    s.handle(E::Released, now);
    drain(&mut s);
    s.handle(E::Released, now);
    assert_eq!(drain(&mut s), [A::QueuesFree]);
}

/// The predecessor's ready deadline read nothing, and our READY landed just after: it rolls
/// back, signals, closes. Its channel's end is read here before its SIGTERM (or with it
/// pending): it gave up on this process, which must not name itself main nor say STOPPING=1
/// (taking the EOF for an exit did both, and systemd stopped the unit with the predecessor
/// serving in it; helper-30's review).
#[test]
fn a_successor_whose_ready_came_too_late_is_abandoned_not_main() {
    for signal_first in [false, true] {
        let mut s = Succession::handed_over();
        let now = t0();
        s.handle(E::Started, now);
        s.handle(E::ReadySent, now);
        drain(&mut s);
        let mut seen = Vec::new();
        if signal_first {
            s.handle(E::GaveUp, now);
            seen.extend(drain(&mut s));
            s.handle(E::PredecessorGone, now);
        } else {
            s.handle(E::GaveUp, now);
        }
        seen.extend(drain(&mut s));
        s.handle(E::Draining(DrainCause::Shutdown), now);
        seen.extend(drain(&mut s));
        assert_eq!(seen, [A::ForgetPredecessor], "signal first: {signal_first}");
        assert!(!s.is_main());
        assert_eq!(s.stage(), Stage::Abandoned);
    }
}

#[test]
fn an_abandoned_successor_never_says_stopping() {
    let mut s = Succession::handed_over();
    let now = t0();
    s.handle(E::Started, now);
    s.handle(
        E::ReadyUnsent {
            predecessor_gave_up: true,
        },
        now,
    );
    assert_eq!(
        drain(&mut s),
        [A::SendReady, A::ForgetPredecessor, A::RestorePidFile]
    );
    s.handle(E::Draining(DrainCause::Shutdown), now);
    assert_eq!(drain(&mut s), []);
    assert!(!s.is_main());
}

// ------------------------------------------------------------------------------------------
// Random sequences

fn event() -> impl Strategy<Value = Option<SuccessionEvent>> {
    // `None` is time passing (by more than the takeover delay).
    proptest::sample::select(
        ALL_EVENTS
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .collect::<Vec<_>>(),
    )
}

/// Invariants over the whole action history of one machine.
fn check(history: &[SuccessionAction], handed_over: bool) -> Result<(), String> {
    let count = |a: SuccessionAction| history.iter().filter(|&&x| x == a).count();
    let position = |a: SuccessionAction| history.iter().position(|&x| x == a);
    if count(A::AnnounceReady) > 1 {
        return Err("READY=1 twice".into());
    }
    if count(A::SendReady) > 1 {
        return Err("READY sent twice".into());
    }
    if count(A::ForgetPredecessor) > 1 {
        return Err("the predecessor forgotten twice".into());
    }
    if count(A::DiscardOldPidFile) + count(A::RestorePidFile) > 1 {
        return Err("the old pid file handled twice".into());
    }
    // QueuesFree may come again: a RELEASED forwarded by an earlier version sweeps once more.
    if !handed_over && (count(A::SendReady) > 0 || count(A::StartTakeover) > 0) {
        return Err("a process without a predecessor acted as a successor".into());
    }
    if let Some(forgot) = position(A::ForgetPredecessor) {
        if history[forgot..]
            .iter()
            .any(|a| matches!(a, A::TellPredecessor(_)))
        {
            return Err("a message to a predecessor already forgotten".into());
        }
    }
    // Takeover polls: at most one episode, ended before (or by) the queues being freed.
    let (starts, ends) = (count(A::StartTakeover), count(A::EndTakeover));
    if starts > 1 || ends > starts {
        return Err(format!("takeover started {starts}, ended {ends} times"));
    }
    if let Some(restore) = position(A::RestorePidFile) {
        let after = &history[restore..];
        if after
            .iter()
            .any(|a| matches!(a, A::AnnounceStopping | A::AnnounceReady | A::StartTakeover))
        {
            return Err("an abandoned process acted as the service".into());
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_sequences_keep_the_invariants(
        handed_over in any::<bool>(),
        events in proptest::collection::vec(event(), 1..60),
        accepting_bits in any::<u64>(),
    ) {
        let mut s = if handed_over { Succession::handed_over() } else { Succession::alone() };
        let mut now = t0();
        let mut history = vec![];
        let mut was_main = s.is_main();
        for (i, e) in events.into_iter().enumerate() {
            match e {
                Some(e) => s.handle(e, now),
                None => {
                    now += TAKEOVER_AFTER * 2;
                    s.handle_timeout(now, accepting_bits >> (i % 64) & 1 == 1);
                }
            }
            let actions = drain(&mut s);
            if actions.contains(&A::AnnounceStopping) && !s.is_main() {
                return Err(TestCaseError::fail("STOPPING=1 from a process that is not main"));
            }
            history.extend(actions);
            prop_assert!(
                !was_main
                    || s.is_main()
                    || s.stage() == Stage::Abandoned
                    || e == Some(E::Draining(UPGRADED)),
                "main lost"
            );
            was_main = s.is_main();
            prop_assert_eq!(s.taking_over(), s.stage() == Stage::TakingOver);
            if s.stage() == Stage::Alone && handed_over {
                prop_assert!(
                    history.iter().any(|a| matches!(a, A::QueuesFree)),
                    "alone without the queues freed"
                );
            }
        }
        if let Err(why) = check(&history, handed_over) {
            return Err(TestCaseError::fail(format!("{why}: {history:?}")));
        }
    }
}
