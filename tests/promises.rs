//! Promises the crate's docs make that hold only when time passes, a node is slow, a slot moves,
//! an answer is lost or a response misbehaves: each case here once broke one, on every store
//! where it applies (the embedded one, one Redis node, a three-primary Cluster).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::redis_server::{RedisCluster, RedisServer};
use support::{Advance, fresh, granted, kind, spend, status};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_reserve::{
    Budget, Claim, DenialReason, ErrorKind, Extracted, HoldId, Idempotency, MAX_MEMO, MemoryStore,
    RedisStore, Refund, Reservation, ReserveLayer, Reserved, Settled, Settlement, Store, Window,
    extract,
};

const LONG: Duration = Duration::from_secs(30);

/// Runs a case on every store, each with a test clock and a short retention (2 s).
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = tower_reserve::MemoryStore::with_test_clock()
                        .retain(std::time::Duration::from_secs(2));
                    super::$case(&store, None).await;
                }
            )*
        }
        mod redis {
            use support::redis_server::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = RedisServer::start();
                    let store = tower_reserve::RedisStore::builder()
                        .test_clock()
                        .retain(std::time::Duration::from_secs(2))
                        .connect(&server.url())
                        .await
                        .unwrap();
                    super::$case(&store, None).await;
                }
            )*
        }
        mod cluster {
            use support::redis_server::RedisCluster;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case_on_a_three_primary_cluster() {
                let cluster = RedisCluster::start(3, 0);
                let store = tower_reserve::RedisStore::builder()
                    .test_clock()
                    .retain(std::time::Duration::from_secs(2))
                    .connect_cluster(cluster.urls())
                    .await
                    .unwrap();
                $(
                    eprintln!("cluster: {}", stringify!($case));
                    super::$case(&store, Some(&cluster)).await;
                )*
            }
        }
    };
}

on_every_store!(
    expired_holds_are_not_held_after_a_denial,
    a_refund_counts_once_whatever_window_its_retry_lands_in,
    a_replayed_settlement_keeps_its_record_as_long_as_it_asks,
    ids_that_differ_never_share_a_key,
    a_forgotten_release_across_slots_leaves_nothing,
    a_refused_actual_amount_changes_nothing,
);

/// A reservation whose record lives in `slot` with claims elsewhere: on a Cluster, a home and
/// groups.
fn across_slots(budgets: &[&Budget], amount: u64, lease: Duration) -> Reservation {
    // Slot 0's budgets are rare among fresh keys: the claims land elsewhere.
    let id = HoldId::new(format!("{}@0", fresh("across"))).unwrap();
    Reservation::builder()
        .id(id)
        .lease(lease)
        .claims(budgets.iter().map(|b| Claim::spend((*b).clone(), amount)))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Phantom capacity: a denial after an expiry must not leave the expired hold counted.

async fn expired_holds_are_not_held_after_a_denial<S: Advance>(
    store: &S,
    _: Option<&RedisCluster>,
) {
    let budget = Budget::new(fresh("phantom"), 100);
    let hold = |amount, lease| {
        Reservation::builder()
            .lease(lease)
            .claim(Claim::spend(budget.clone(), amount))
            .build()
            .unwrap()
    };
    // Two holds whose leases end in two buckets; the first ends, then a reserve is denied.
    granted(store, &hold(10, Duration::from_secs(1))).await;
    let second = granted(store, &hold(10, Duration::from_secs(5))).await;
    store.advance(Duration::from_millis(1_200)).await;
    assert!(matches!(
        store.reserve(&hold(95, LONG)).await.unwrap(),
        Reserved::Denied(_)
    ));
    assert_eq!(status(store, &budget).await.held, 10);
    // A live hold still extends.
    store
        .extend(&second.id, Duration::from_secs(5))
        .await
        .expect("extend a live hold");
    store.advance(Duration::from_millis(5_200)).await;
    assert_eq!(status(store, &budget).await.held, 0);
    granted(store, &hold(100, LONG)).await;
}

// ---------------------------------------------------------------------------------------------
// A refund id counts once, whatever window its retry lands in.

async fn a_refund_counts_once_whatever_window_its_retry_lands_in<S: Advance>(
    store: &S,
    _: Option<&RedisCluster>,
) {
    let budget = Budget::new(fresh("refund"), 200).per(Window::Every(Duration::from_secs(10)));
    let spend = |amount| {
        Reservation::builder()
            .lease(LONG)
            .claim(Claim::spend(budget.clone(), amount))
            .build()
            .unwrap()
    };
    let hold = granted(store, &spend(100)).await;
    store.commit(&hold.id).await.unwrap();
    let refund = Refund::new(HoldId::new(fresh("refund-id")).unwrap(), budget.clone(), 40);
    assert_eq!(store.refund(&refund).await.unwrap(), Settled::Applied);
    assert_eq!(status(store, &budget).await.spent, 60);
    // The next window: its own spending, then the retry.
    store.advance(Duration::from_secs(10)).await;
    let hold = granted(store, &spend(100)).await;
    store.commit(&hold.id).await.unwrap();
    assert_eq!(store.refund(&refund).await.unwrap(), Settled::Replayed);
    assert_eq!(status(store, &budget).await.spent, 100);
}

// ---------------------------------------------------------------------------------------------
// A settlement retried with a memo and a longer retention (a handler that committed its own
// hold, then the layer keeping its response) keeps the record that long: a retry after the
// store's retention is told it was committed, and is not charged again.

async fn a_replayed_settlement_keeps_its_record_as_long_as_it_asks<S: Advance>(
    store: &S,
    _: Option<&RedisCluster>,
) {
    let budget = Budget::new(fresh("self-commit"), 100);
    let r = Reservation::builder()
        .id(HoldId::new(fresh("keyed")).unwrap())
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 10))
        .build()
        .unwrap();
    granted(store, &r).await;
    assert_eq!(store.commit(r.id()).await.unwrap(), Settled::Applied);
    let keep = Settlement::commit()
        .memo(Bytes::from_static(b"the first answer"))
        .retain(Duration::from_secs(86_400));
    assert_eq!(
        store.settle(r.id(), &keep).await.unwrap(),
        Settled::Replayed
    );
    // Past the store's retention (2 s), within the settlement's.
    store.advance(Duration::from_secs(3)).await;
    let err = store.reserve(&r).await.expect_err("committed");
    assert_eq!(err.kind(), ErrorKind::Committed);
    assert_eq!(err.memo(), Some(&b"the first answer"[..]));
    assert_eq!(status(store, &budget).await.spent, 10);
}

// ---------------------------------------------------------------------------------------------
// Every valid id has keys of its own: `x:m@5`'s record is not `x@5`'s memo.

async fn ids_that_differ_never_share_a_key<S: Advance>(store: &S, _: Option<&RedisCluster>) {
    let name = fresh("x");
    let budget = Budget::new(fresh("ids"), 100);
    let reservation = |id: String| {
        Reservation::builder()
            .id(HoldId::new(id).unwrap())
            .lease(LONG)
            .claim(Claim::spend(budget.clone(), 10))
            .build()
            .unwrap()
    };
    let first = reservation(format!("{name}@5"));
    let second = reservation(format!("{name}:m@5"));
    granted(store, &first).await;
    granted(store, &second).await;
    let with_memo = Settlement::commit().memo(Bytes::from_static(b"memo of the first"));
    assert_eq!(
        store.settle(first.id(), &with_memo).await.unwrap(),
        Settled::Applied
    );
    assert_eq!(store.commit(second.id()).await.unwrap(), Settled::Applied);
    assert_eq!(status(store, &budget).await.spent, 20);
    let err = store.reserve(&second).await.expect_err("committed");
    assert_eq!(err.kind(), ErrorKind::Committed);
    assert_eq!(err.memo(), None);
}

// ---------------------------------------------------------------------------------------------
// A release that forgets leaves nothing, across slots too: the id may be reserved again.

async fn a_forgotten_release_across_slots_leaves_nothing<S: Advance>(
    store: &S,
    _: Option<&RedisCluster>,
) {
    let a = Budget::new(fresh("forget-a"), 100);
    let b = Budget::new(fresh("forget-b"), 100);
    let r = across_slots(&[&a, &b], 10, LONG);
    granted(store, &r).await;
    store
        .settle(r.id(), &Settlement::release().forget())
        .await
        .unwrap();
    let again = granted(store, &r).await;
    assert!(!again.replayed);
    assert_eq!(status(store, &a).await.held, 10);
    assert_eq!(status(store, &b).await.held, 10);
}

// ---------------------------------------------------------------------------------------------
// An actual amount above the hold is refused and changes nothing, across slots too.

async fn a_refused_actual_amount_changes_nothing<S: Advance>(store: &S, _: Option<&RedisCluster>) {
    let a = Budget::new(fresh("actual-a"), 100);
    let b = Budget::new(fresh("actual-b"), 100);
    let r = across_slots(&[&a, &b], 10, LONG);
    granted(store, &r).await;
    let too_much = Settlement::commit().actual(&b, 11).forget();
    assert_eq!(
        kind(store.settle(r.id(), &too_much).await),
        ErrorKind::ExceedsHold
    );
    assert_eq!(store.commit(r.id()).await.unwrap(), Settled::Applied);
    assert_eq!(status(store, &a).await.spent, 10);
    assert_eq!(status(store, &b).await.spent, 10);
}

// ---------------------------------------------------------------------------------------------
// Cluster: a commit is whole or nothing, however slow a group's node is.

/// A fresh key whose slot node `node` serves.
fn key_on(cluster: &RedisCluster, node: usize, prefix: &str) -> String {
    loop {
        let key = fresh(prefix);
        if cluster.node_of(&key) == node {
            return key;
        }
    }
}

/// A reservation across slots whose home lost its record (a failover to a replica that had not
/// received it) while a group still holds: reserved again, the group's record is replaced, and
/// what the earlier attempt held there is given back, not kept until its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replaced_by_a_new_attempt_gives_back_what_the_old_one_held() {
    let cluster = RedisCluster::start(3, 0);
    let prefix = fresh("regroup");
    let store = RedisStore::builder()
        .prefix(prefix.clone())
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let primaries = cluster.primaries();
    let home = Budget::new(key_on(&cluster, primaries[0], "home"), 100);
    let group = Budget::new(key_on(&cluster, primaries[1], "group"), 100);
    let slot = cluster.keyslot(home.key());
    let r = Reservation::builder()
        .id(HoldId::new(format!("{}@{slot}", fresh("regroup"))).unwrap())
        .lease(LONG)
        .claim(Claim::spend(home.clone(), 30))
        .claim(Claim::spend(group.clone(), 30))
        .build()
        .unwrap();
    granted(&store, &r).await;
    let home_node = &cluster.nodes[primaries[0]];
    // The home's node forgets the reservation (its record, and what its budget held), as a
    // replica that never received it would after a failover.
    let keys = home_node.cli(&["--scan", "--pattern", &format!("{prefix}:*")]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 2, "the home's record and budget: {keys:?}");
    for key in keys {
        home_node.cli(&["DEL", key]);
    }
    granted(&store, &r).await;
    assert_eq!(status(&store, &group).await.held, 30);
    assert_eq!(status(&store, &home).await.held, 30);
    store.commit(r.id()).await.unwrap();
    let settled = status(&store, &group).await;
    assert_eq!((settled.spent, settled.held), (30, 0));
}

/// Both claims are over their budgets; the first is served by another node than the hold's
/// home. A check answers the first claim that fails, as a reserve does and as on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_across_slots_names_the_first_claim_that_fails() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let primaries = cluster.primaries();
    let early = Budget::new(key_on(&cluster, primaries[1], "early"), 10);
    let late = Budget::new(key_on(&cluster, primaries[0], "late"), 10);
    let slot = cluster.keyslot(late.key());
    let r = Reservation::builder()
        .id(HoldId::new(format!("{}@{slot}", fresh("check"))).unwrap())
        .claim(Claim::spend(early.clone(), 11))
        .claim(Claim::spend(late.clone(), 11))
        .build()
        .unwrap();
    for answer in [store.check(&r).await, store.reserve(&r).await] {
        match answer.unwrap() {
            Reserved::Denied(d) => assert_eq!(d.claim, 0, "{d:?}"),
            other => panic!("expected a denial, got {other:?}"),
        }
    }
    assert_eq!(status(&store, &early).await.held, 0);
    assert_eq!(status(&store, &late).await.held, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_across_slots_is_whole_however_slow_a_group_node_is() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let primaries = cluster.primaries();
    let (home_node, group_node) = (primaries[0], primaries[1]);
    // The group's node stops answering at 650 ms, for as long as each round says; the commit
    // goes at 724 ms of a 1 s lease.
    for pause_ms in [800u64, 300, 400] {
        let home = Budget::new(key_on(&cluster, home_node, "home"), 100);
        let group = Budget::new(key_on(&cluster, group_node, "group"), 100);
        let slot = cluster.keyslot(home.key());
        let r = Reservation::builder()
            .id(HoldId::new(format!("{}@{slot}", fresh("slow"))).unwrap())
            .lease(Duration::from_secs(1))
            .claim(Claim::spend(home.clone(), 10))
            .claim(Claim::spend(group.clone(), 10))
            .build()
            .unwrap();
        let started = Instant::now();
        granted(&store, &r).await;
        tokio::time::sleep_until((started + Duration::from_millis(650)).into()).await;
        let port = cluster.nodes[group_node].port();
        let pause = std::thread::spawn(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "debug", "sleep"])
                .arg(format!("{}", pause_ms as f64 / 1000.0))
                .output()
                .expect("redis-cli")
        });
        tokio::time::sleep_until((started + Duration::from_millis(724)).into()).await;
        let mut answer = store.commit(r.id()).await;
        // A commit the store could not finish is settled again, as the docs say to.
        for _ in 0..20 {
            match &answer {
                Err(err) if err.is_unavailable() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    answer = store.commit(r.id()).await;
                }
                _ => break,
            }
        }
        let paused = pause.join().unwrap();
        assert!(paused.status.success(), "{paused:?}");
        assert!(
            String::from_utf8_lossy(&paused.stdout).contains("OK"),
            "{paused:?}"
        );
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (h, g) = (status(&store, &home).await, status(&store, &group).await);
        assert_eq!((h.held, g.held), (0, 0), "pause {pause_ms} ms");
        match answer {
            Ok(_) => assert_eq!(
                (h.spent, g.spent),
                (10, 10),
                "pause {pause_ms} ms: committed"
            ),
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::Expired, "pause {pause_ms} ms: {err}");
                assert_eq!((h.spent, g.spent), (0, 0), "pause {pause_ms} ms: {err}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster: a slot that moves while a hold is settled fails the settlement before anything
// changed, whichever of its keys has moved first; once the slot has moved, settling again
// finishes it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moving_under_a_commit_changes_nothing_until_it_has_moved() {
    a_slot_moving_under_a_commit(Moves::BudgetFirst).await;
}

/// The record moves first: the node the slot leaves turns the commit away (`ASK`), and one that
/// followed to the new node under `ASKING` would find the budget absent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moving_under_a_commit_record_first_changes_nothing_until_it_has_moved() {
    a_slot_moving_under_a_commit(Moves::RecordFirst).await;
}

enum Moves {
    BudgetFirst,
    RecordFirst,
}

/// Marks `slot` as moving from node `from` to node `to` (`IMPORTING` there, `MIGRATING` here),
/// moving no key yet; answers the id of `to`.
fn start_moving(cluster: &RedisCluster, slot: u16, from: usize, to: usize) -> String {
    let id_of = |i: usize| cluster.nodes[i].cli(&["cluster", "myid"]).trim().to_owned();
    let (from_id, to_id) = (id_of(from), id_of(to));
    let slot = slot.to_string();
    cluster.nodes[to].cli(&["cluster", "setslot", &slot, "importing", &from_id]);
    cluster.nodes[from].cli(&["cluster", "setslot", &slot, "migrating", &to_id]);
    to_id
}

async fn a_slot_moving_under_a_commit(moves: Moves) {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .timeout(Duration::from_secs(2))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let key = key_on(&cluster, from, "moving");
    let budget = Budget::new(key.clone(), 100);
    let slot = cluster.keyslot(&key);
    let r = Reservation::builder()
        .id(HoldId::new(format!("{}@{slot}", fresh("m"))).unwrap())
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 10))
        .build()
        .unwrap();
    granted(&store, &r).await;

    let to_id = start_moving(&cluster, slot, from, to);
    let slot_text = slot.to_string();
    let to_port = cluster.nodes[to].port().to_string();
    let budget_key = format!("reserve:b:{{{key}}}");
    let migrate = |keys: &[&str]| {
        let mut args = vec!["migrate", "127.0.0.1", &to_port, "", "0", "5000", "keys"];
        args.extend_from_slice(keys);
        cluster.nodes[from].cli(&args)
    };
    let in_slot = || {
        let keys = cluster.nodes[from].cli(&["cluster", "getkeysinslot", &slot_text, "100"]);
        keys.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let first: Vec<String> = match moves {
        Moves::BudgetFirst => vec![budget_key.clone()],
        Moves::RecordFirst => in_slot().into_iter().filter(|k| *k != budget_key).collect(),
    };
    assert!(!first.is_empty());
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    assert!(migrate(&first).contains("OK"));
    // The layer's own commits forget the hold's record.
    let commit = Settlement::commit().forget();
    let err = store
        .settle(r.id(), &commit)
        .await
        .expect_err("the slot is moving");
    assert!(err.is_unavailable(), "{err}");

    // The rest of the slot moves, and the slot is the new node's.
    let left = in_slot();
    assert!(!left.is_empty(), "part of the hold is still to move");
    let left: Vec<&str> = left.iter().map(String::as_str).collect();
    assert!(
        migrate(&left).contains("OK"),
        "nothing was written where the slot goes"
    );
    for i in primaries {
        cluster.nodes[i].cli(&["cluster", "setslot", &slot_text, "node", &to_id]);
    }
    cluster.wait_until_ok(Duration::from_secs(10));
    let mut answer = store.settle(r.id(), &commit).await;
    for _ in 0..20 {
        match &answer {
            Err(err) if err.is_unavailable() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                answer = store.settle(r.id(), &commit).await;
            }
            _ => break,
        }
    }
    assert_eq!(answer.unwrap(), Settled::Applied);
    let s = status(&store, &budget).await;
    assert_eq!((s.spent, s.held), (10, 0));
}

/// A budget with two holds in two buckets of lease ends keeps them in a sorted set. Extending the
/// earlier hold past the later one empties its bucket and makes a new one: the set goes down to
/// one member and up to two again in one operation. While the budget's slot is moving, a node
/// refuses a command on a key it does not hold, even one the same operation removed a moment
/// before: the set must never stop existing mid-operation, or the writes before the refusal land
/// and the rest do not (the set gone, the budget's state and the record unchanged), and a hold
/// is then counted in the wrong bucket: its capacity comes back while it is held, and its commit
/// spends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_while_a_slot_is_moving_keeps_every_hold_in_its_bucket() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .timeout(Duration::from_secs(2))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let key = key_on(&cluster, from, "resplit");
    let budget = Budget::new(key.clone(), 100);
    let slot = cluster.keyslot(&key);
    let hold = |amount: u64, lease: Duration| {
        Reservation::builder()
            .id(HoldId::new(format!("{}@{slot}", fresh("resplit"))).unwrap())
            .lease(lease)
            .claim(Claim::spend(budget.clone(), amount))
            .build()
            .unwrap()
    };
    let (early, late) = (hold(10, LONG), hold(20, 2 * LONG));
    granted(&store, &early).await;
    granted(&store, &late).await;

    start_moving(&cluster, slot, from, to);
    let slot_text = slot.to_string();
    // Every key is still where it was: the node serves them all.
    let during = store.extend(early.id(), 3 * LONG).await;
    for i in [from, to] {
        cluster.nodes[i].cli(&["cluster", "setslot", &slot_text, "stable"]);
    }
    if let Err(err) = during {
        assert!(err.is_unavailable(), "{err}");
        store.extend(early.id(), 3 * LONG).await.unwrap();
    }
    assert_eq!(status(&store, &budget).await.held, 30);
    for r in [&early, &late] {
        let answer = store.settle(r.id(), &Settlement::commit()).await.unwrap();
        assert_eq!(answer, Settled::Applied);
    }
    let s = status(&store, &budget).await;
    assert_eq!((s.spent, s.held), (30, 0));
}

// ---------------------------------------------------------------------------------------------
// A reserve whose answer was lost (it landed after its caller gave up) is given back by the
// store, and its id may be reserved again at once.

/// `budget`'s claim and the hold's record live on `node`.
async fn a_reserve_whose_answer_was_lost_is_given_back(
    store: &RedisStore,
    node: &RedisServer,
    budget: Budget,
    id: HoldId,
) {
    let r = Reservation::builder()
        .id(id)
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 10))
        .build()
        .unwrap();
    let asleep = sleep_node(node, "2").await;
    let err = store.reserve(&r).await.expect_err("the node sleeps");
    assert!(err.is_unavailable(), "{err}");
    asleep.woken();
    // The reserve has landed by now (its node ran it after the sleep); the store gives it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(store, &budget).await;
        if s.held == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = granted(store, &r).await;
    assert!(!again.replayed, "a new attempt, not the lost one");
    assert_eq!(status(store, &budget).await.held, 10);
}

/// `DEBUG SLEEP` of `node` for `seconds`, in a thread; answers once well into the sleep, however
/// slowly redis-cli started.
async fn sleep_node(node: &RedisServer, seconds: &str) -> Asleep {
    let (port, seconds) = (node.port(), seconds.to_owned());
    let thread = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "debug", "sleep", &seconds])
            .output()
            .expect("redis-cli")
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Asleep(thread)
}

struct Asleep(std::thread::JoinHandle<std::process::Output>);

impl Asleep {
    /// Waits for the sleep to end; asserts it happened.
    fn woken(self) {
        let out = self.0.join().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("OK"),
            "{out:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The time limit holds for operations queued behind calls that hang, not only for the calls:
// each is answered "unavailable" at its own deadline, long before the node answers, and what
// the calls that did run held is given back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_queued_behind_a_hung_node_are_answered_within_their_time_limit() {
    let server = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        // One operation a call: two calls in flight, the rest queued behind them.
        .max_batch(1)
        .connect(&server.url())
        .await
        .unwrap();
    let budget = Budget::new(fresh("queued"), 1_000);
    let asleep = sleep_node(&server, "4").await;
    let calls = (0..50).map(|_| {
        let (store, r) = (store.clone(), spend(&budget, 10, LONG));
        tokio::spawn(async move { store.reserve(&r).await })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(kind(call.unwrap()), ErrorKind::Unavailable);
    }
    assert!(
        !asleep.0.is_finished(),
        "every operation was answered while the node still slept"
    );
    asleep.woken();
    // What the two calls in flight held, once they ran, is given back in the background.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&store, &budget).await;
        if s.held == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A settlement that forgets a hold settled before answers Replayed even when its answer was
// lost and the store sent it again (the first send has dropped the record by then).

async fn a_forgetting_replay_whose_answer_was_lost_answers_replayed(
    store: &RedisStore,
    node: &RedisServer,
    budget: Budget,
    id: HoldId,
) {
    let r = Reservation::builder()
        .id(id)
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 10))
        .build()
        .unwrap();
    granted(store, &r).await;
    let first = store.settle(r.id(), &Settlement::commit()).await.unwrap();
    assert_eq!(first, Settled::Applied);
    // The node sleeps through the store's first two sends (300 ms each, 50 ms apart); the third
    // arrives after the first has run.
    let asleep = sleep_node(node, "0.9").await;
    let again = store
        .settle(r.id(), &Settlement::commit().forget())
        .await
        .expect("answered from what the first send left");
    assert_eq!(again, Settled::Replayed);
    asleep.woken();
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (10, 0));
    assert_eq!(
        kind(store.settle(r.id(), &Settlement::commit()).await),
        ErrorKind::UnknownHold,
        "forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgetting_replay_whose_answer_was_lost_answers_replayed_on_redis() {
    let server = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let id = HoldId::new(fresh("lost-replay")).unwrap();
    let budget = Budget::new(fresh("lost-replay"), 100);
    a_forgetting_replay_whose_answer_was_lost_answers_replayed(&store, &server, budget, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgetting_replay_whose_answer_was_lost_answers_replayed_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let node = cluster.primaries()[0];
    let key = key_on(&cluster, node, "lost-replay");
    let slot = cluster.keyslot(&key);
    let id = HoldId::new(format!("{}@{slot}", fresh("lost-replay"))).unwrap();
    let server = &cluster.nodes[node];
    a_forgetting_replay_whose_answer_was_lost_answers_replayed(
        &store,
        server,
        Budget::new(key, 100),
        id,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_whose_answer_was_lost_is_given_back_on_redis() {
    let server = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let id = HoldId::new(fresh("lost-key")).unwrap();
    a_reserve_whose_answer_was_lost_is_given_back(
        &store,
        &server,
        Budget::new(fresh("lost"), 100),
        id,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_whose_answer_was_lost_is_given_back_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    // A hold on one slot; then one across slots, whose home is on the node that sleeps.
    let node = cluster.primaries()[0];
    let key = key_on(&cluster, node, "lost");
    let slot = cluster.keyslot(&key);
    let id = HoldId::new(format!("{}@{slot}", fresh("lost-key"))).unwrap();
    let server = &cluster.nodes[node];
    a_reserve_whose_answer_was_lost_is_given_back(&store, server, Budget::new(key, 100), id).await;
    let elsewhere = key_on(&cluster, cluster.primaries()[1], "lost");
    let id = HoldId::new(format!("{}@{slot}", fresh("lost-key"))).unwrap();
    a_reserve_whose_answer_was_lost_is_given_back(&store, server, Budget::new(elsewhere, 100), id)
        .await;
}

/// A loopback proxy in front of a Redis node that can lose what the node answers, after the
/// request landed, and hold back what the client sends next, until it is let go.
struct LossyProxy {
    port: u16,
    /// 0: everything passes; 1: answers are lost, and after the next request the client's
    /// traffic is held back; 2: let go (everything held back goes on, answers are lost still).
    mode: Arc<std::sync::atomic::AtomicU8>,
    let_go: Arc<tokio::sync::Notify>,
}

impl LossyProxy {
    async fn start(node: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let let_go = Arc::new(tokio::sync::Notify::new());
        let (m, n) = (mode.clone(), let_go.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", node))
                    .await
                    .unwrap();
                let (mut client_r, mut client_w) = client.into_split();
                let (mut server_r, mut server_w) = server.into_split();
                let (m1, n1, m2) = (m.clone(), n.clone(), m.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent_since_loss = false;
                    loop {
                        let Ok(read) = client_r.read(&mut buf).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        if m1.load(Ordering::SeqCst) == 1 {
                            if sent_since_loss {
                                n1.notified().await;
                            }
                            sent_since_loss = true;
                        }
                        if server_w.write_all(&buf[..read]).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(read) = server_r.read(&mut buf).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        if m2.load(Ordering::SeqCst) == 0
                            && client_w.write_all(&buf[..read]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, mode, let_go }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn lose_answers_then_hold(&self) {
        self.mode.store(1, Ordering::SeqCst);
    }

    fn let_go(&self) {
        self.mode.store(2, Ordering::SeqCst);
        self.let_go.notify_waiters();
    }
}

/// One instance reserves; the node runs the reserve but its answer is lost, so that instance
/// answers `Unavailable` and gives back, in the background, what its call may hold. Before that
/// give-back lands, a retry of the same reservation through another instance is answered that
/// it has the hold (a replay). The give-back must then leave the hold alone: the retry was told
/// it holds, and its commit must find the hold and charge it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_a_retry_was_answered_for_outlives_the_give_back_of_its_lost_first_call() {
    two_calls_told_they_hold(Lost::First).await;
}

/// The other way round: the first call is answered, and a retry's answer (a replay) is lost. Its
/// instance gives back what the retry may hold, which must not be the hold the first call was
/// told it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_outlives_the_give_back_of_a_retry_whose_answer_was_lost() {
    two_calls_told_they_hold(Lost::Retry).await;
}

enum Lost {
    First,
    Retry,
}

async fn two_calls_told_they_hold(lost: Lost) {
    let server = RedisServer::start();
    let proxy = LossyProxy::start(server.port()).await;
    let lossy = RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect(&proxy.url())
        .await
        .unwrap();
    let direct = RedisStore::builder().connect(&server.url()).await.unwrap();
    let budget = Budget::new(fresh("twice"), 100);
    let r = Reservation::builder()
        .id(HoldId::new(fresh("twice")).unwrap())
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 30))
        .build()
        .unwrap();

    let answered = |reserved: Reserved, replayed: bool| match reserved {
        Reserved::Granted(g) => assert_eq!(g.replayed, replayed, "{g:?}"),
        other => panic!("{other:?}"),
    };
    if let Lost::Retry = lost {
        answered(direct.reserve(&r).await.unwrap(), false);
    }
    proxy.lose_answers_then_hold();
    let err = lossy.reserve(&r).await.expect_err("its answer is lost");
    assert!(err.is_unavailable(), "{err}");
    if let Lost::First = lost {
        assert_eq!(
            status(&direct, &budget).await.held,
            30,
            "the reserve landed"
        );
        answered(direct.reserve(&r).await.unwrap(), true);
    }
    // The lossy instance's give-back (held back until now) lands, and is tried again.
    proxy.let_go();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        status(&direct, &budget).await.held,
        30,
        "the hold is still held"
    );
    assert_eq!(
        direct.settle(r.id(), &Settlement::commit()).await.unwrap(),
        Settled::Applied
    );
    let s = status(&direct, &budget).await;
    assert_eq!((s.spent, s.held), (30, 0));
}

/// A reservation across three nodes: its home grants, one group denies, and the node of the
/// third sleeps past the call's time limit (its reserve lands after the store gave up, and so
/// does the store's give-back). The store cannot tell yet that nothing is held there, so it
/// answers that it could not finish, never a denial that leaves capacity held; and once the
/// node wakes, what it held comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_across_slots_is_answered_only_once_every_group_gave_back() {
    let Across {
        cluster,
        store,
        budgets,
        r,
    } = across_three_nodes(100).await;
    let [home, asleep, full] = &budgets;
    // Longer than the store's tries to give back (about 550 ms with a 100 ms limit), shorter than
    // the Cluster's node timeout (1.5 s), so that no node is marked failed meanwhile.
    let sleeping = sleep_node(&cluster.nodes[cluster.primaries()[1]], "1.3").await;
    let answer = store.reserve(&r).await;
    match &answer {
        Err(err) => assert!(err.is_unavailable(), "{err}"),
        Ok(other) => panic!("answered {other:?} while a group may still hold"),
    }
    sleeping.woken();
    nothing_held_soon(&store, &[home, asleep, full]).await;
}

/// A reservation across three nodes whose home grants: the node of claim 1 sleeps past the call's
/// time limit, and claim 2's group denies. Claim 1 fails too, so the denial must name it, as one
/// node's would: the store checks the group it did not hear from once that group has given back,
/// rather than answer the later claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_across_slots_names_the_first_claim_that_fails_though_a_group_was_slow() {
    let Across {
        cluster,
        store,
        budgets,
        r,
    } = across_three_nodes(10).await;
    let [home, asleep, full] = &budgets;
    // The node sleeps about 200 ms into the reserve: past the reserve's call, within the store's
    // tries to give back (about 550 ms with a 100 ms limit). On a machine so loaded that the
    // sleep starts late and outlasts those tries, the store cannot check the group and answers
    // that it could not finish; it never names claim 2.
    let sleeping = sleep_node(&cluster.nodes[cluster.primaries()[1]], "0.5").await;
    let answer = store.reserve(&r).await;
    sleeping.woken();
    match answer {
        Ok(Reserved::Denied(d)) => {
            assert_eq!(d.claim, 1, "{d:?}");
            assert!(
                matches!(d.reason, DenialReason::OverBudget { remaining: 10, .. }),
                "{d:?}"
            );
        }
        Err(err) if err.is_unavailable() => {}
        other => panic!("answered {other:?}"),
    }
    // Nothing stays held (given back in place, or in the background after `Unavailable`).
    nothing_held_soon(&store, &[home, asleep, full]).await;
}

/// A reservation across the three nodes of a fresh Cluster, spending 30 from each of three
/// budgets: the home's (limit 100) on the first node, then one of limit `second` on the second
/// node, then one of limit 10 on the third (so that claim 2 always fails). The store gives a call
/// 100 ms.
struct Across {
    cluster: RedisCluster,
    store: RedisStore,
    budgets: [Budget; 3],
    r: Reservation,
}

async fn across_three_nodes(second: u64) -> Across {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .timeout(Duration::from_millis(100))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let primaries = cluster.primaries();
    let budgets = [
        Budget::new(key_on(&cluster, primaries[0], "home"), 100),
        Budget::new(key_on(&cluster, primaries[1], "second"), second),
        Budget::new(key_on(&cluster, primaries[2], "full"), 10),
    ];
    let slot = cluster.keyslot(budgets[0].key());
    let mut r = Reservation::builder()
        .id(HoldId::new(format!("{}@{slot}", fresh("across"))).unwrap())
        .lease(LONG);
    for budget in &budgets {
        r = r.claim(Claim::spend(budget.clone(), 30));
    }
    let r = r.build().unwrap();
    Across {
        cluster,
        store,
        budgets,
        r,
    }
}

/// Waits up to 10 s until none of `budgets` holds anything (a node just awake may take a moment
/// to answer again).
async fn nothing_held_soon(store: &RedisStore, budgets: &[&Budget]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut held = Vec::new();
        for budget in budgets {
            held.push(store.budget(budget).await.map(|s| s.held).ok());
        }
        if held.iter().all(|h| *h == Some(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "still held: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Batches are bounded in bytes: large memos never make commits that landed answer
// "unavailable".

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_memos_are_committed_and_answered_every_one() {
    let server = RedisServer::start();
    // A limit no call of this test nears, however loaded the machine: what is shown is how the
    // commits were carried (each memo alone), not how fast.
    let store = RedisStore::builder()
        .timeout(Duration::from_secs(10))
        .connect(&server.url())
        .await
        .unwrap();
    let budget = Budget::new(fresh("memos"), 1_000_000);
    let mut ids = Vec::new();
    for _ in 0..64 {
        let r = Reservation::builder()
            .id(HoldId::new(fresh("memo")).unwrap())
            .lease(LONG)
            .claim(Claim::spend(budget.clone(), 10))
            .build()
            .unwrap();
        granted(&store, &r).await;
        ids.push(r.id().clone());
    }
    let memo = Bytes::from(vec![b'm'; 512 * 1024]);
    let before = store.batch_stats();
    let answers = futures_util::future::join_all(ids.iter().map(|id| {
        let store = store.clone();
        let settle = Settlement::commit().memo(memo.clone());
        async move { store.settle(id, &settle).await }
    }))
    .await;
    let after = store.batch_stats();
    for answer in answers {
        assert_eq!(answer.expect("every commit answered"), Settled::Applied);
    }
    // 64 commits sent at once, each larger than a batch may be: each went in a call of its own,
    // so no call carried more than one memo's bytes (32 MiB in one script would block the node
    // for as long as it took to run).
    assert_eq!(
        (after.calls - before.calls, after.ops - before.ops),
        (64, 64),
        "calls and operations"
    );
    let s = status(&store, &budget).await;
    assert_eq!((s.spent, s.held), (640, 0));
}

// ---------------------------------------------------------------------------------------------
// Cluster: a keyed response is kept once, at its home.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memo_is_kept_at_the_home_alone() {
    let cluster = RedisCluster::start(3, 0);
    let prefix = fresh("once");
    let store = RedisStore::builder()
        .prefix(prefix.clone())
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let budgets: Vec<Budget> = (0..4).map(|_| Budget::new(fresh("memo"), 100)).collect();
    let r = across_slots(&budgets.iter().collect::<Vec<_>>(), 10, LONG);
    granted(&store, &r).await;
    let memo = fresh("the-response");
    store
        .settle(r.id(), &Settlement::commit().memo(memo.clone()))
        .await
        .unwrap();
    let mut copies = 0;
    for node in &cluster.nodes {
        let keys = node.cli(&["--scan", "--pattern", &format!("{prefix}:*")]);
        for key in keys.lines().filter(|k| !k.is_empty()) {
            if node.cli(&["get", key]).trim() == memo {
                copies += 1;
            }
        }
    }
    assert_eq!(copies, 1);
}

// ---------------------------------------------------------------------------------------------
// The layer: what a keyed request's response does to its hold, and whose it is.

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Spends `amount` (the `x-amount` header, default 10) from the caller's budget, named by the
/// `x-api-key` header.
fn credits(store: MemoryStore) -> ReserveLayer<MemoryStore, impl tower_reserve::ExtractClaims> {
    ReserveLayer::new(store, |req: Request<Bytes>| async move {
        let key = extract::header(&req, "x-api-key")?.to_owned();
        let amount = extract::header(&req, "x-amount")
            .ok()
            .and_then(|a| a.parse().ok())
            .unwrap_or(10);
        let claims = vec![Claim::spend(
            Budget::new(format!("credits-{key}"), 1_000),
            amount,
        )];
        Extracted::Ok((req, claims))
    })
}

fn keyed(key: &str, api_key: &str, body: &'static str) -> Request<String> {
    Request::post("/jobs")
        .header("idempotency-key", key)
        .header("x-api-key", api_key)
        .body(body.to_owned())
        .unwrap()
}

async fn spent(store: &MemoryStore, api_key: &str) -> u64 {
    status(store, &Budget::new(format!("credits-{api_key}"), 1_000))
        .await
        .spent
}

/// A body that sends `first`, then fails.
fn failing_body(first: &'static str) -> axum::body::Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(first.as_bytes())),
        Err(std::io::Error::other("the stream broke")),
    ];
    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_keyed_success_whose_body_fails_is_charged_once_in_place_and_detached() {
    let store = MemoryStore::new();
    let handler = tower::service_fn(|req: Request<tower_reserve::RequestBody>| async move {
        if req.headers().contains_key("x-slow") {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, BoxError>(Response::new(failing_body("half")))
    });
    let svc = credits(store.clone())
        .idempotency(Idempotency::new())
        .layer(handler);
    // In place: the client is told the response failed; the work was done, and charged.
    let key = fresh("k");
    let response = svc.clone().oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(spent(&store, "ann").await, 10);
    let retry = svc.clone().oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert_eq!(spent(&store, "ann").await, 10);

    // Detached: the client left while the handler ran; the same rule.
    let mut slow = keyed(&fresh("k"), "bob", "{}");
    slow.headers_mut().insert("x-slow", "1".parse().unwrap());
    let gone = tokio::time::timeout(Duration::from_millis(20), svc.clone().oneshot(slow)).await;
    assert!(gone.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while spent(&store, "bob").await != 10 {
        assert!(
            Instant::now() < deadline,
            "the detached handler was not charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_keyed_success_too_large_to_keep_whole_is_charged() {
    let store = MemoryStore::new();
    let handler = tower::service_fn(|_req: Request<tower_reserve::RequestBody>| async move {
        // A body within the largest `max_body`, with 8 KiB of headers beside it.
        let body = vec![b'b'; MAX_MEMO - 4 * 1024];
        let response = Response::builder()
            .header("x-large", "h".repeat(8 * 1024))
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        Ok::<_, BoxError>(response)
    });
    let svc = credits(store.clone())
        .idempotency(Idempotency::new().max_body(MAX_MEMO))
        .layer(handler);
    let key = fresh("k");
    let response = svc.clone().oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), MAX_MEMO - 4 * 1024);
    assert_eq!(spent(&store, "ann").await, 10);
    let retry = svc.oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert_eq!(spent(&store, "ann").await, 10);
}

#[tokio::test]
async fn an_idempotency_key_never_shows_one_caller_another_callers_result() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = tower::service_fn(move |req: Request<tower_reserve::RequestBody>| {
        let runs = counted.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let who = req.headers()["x-api-key"].to_str().unwrap().to_owned();
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let response = Response::builder()
                .header("authentication-info", "nextnonce=\"n1\"")
                .body(http_body_util::Full::new(Bytes::from(format!(
                    "job for {who} {auth}"
                ))))
                .unwrap();
            Ok::<_, BoxError>(response)
        }
    });
    let svc = credits(store.clone())
        .idempotency(Idempotency::new())
        .layer(handler);
    let text = |r: Response<_>| async move {
        let (parts, body) = r.into_parts();
        let body: Bytes = BodyExt::collect(body).await.unwrap().to_bytes();
        (parts, String::from_utf8(body.to_vec()).unwrap())
    };
    // Bob sends Alice's key and body with his own API key: his own job, his own charge.
    let key = fresh("k");
    let (_, alice) = text(
        svc.clone()
            .oneshot(keyed(&key, "alice", "{}"))
            .await
            .unwrap(),
    )
    .await;
    let (bob_parts, bob) = text(svc.clone().oneshot(keyed(&key, "bob", "{}")).await.unwrap()).await;
    assert_eq!(alice, "job for alice ");
    assert_eq!(bob, "job for bob ");
    assert!(!bob_parts.headers.contains_key("idempotency-replayed"));
    assert_eq!(spent(&store, "alice").await, 10);
    assert_eq!(spent(&store, "bob").await, 10);
    // One budget, two credentials: two requests.
    let mut carol = keyed(&key, "shared", "{}");
    carol
        .headers_mut()
        .insert("authorization", "Bearer carol".parse().unwrap());
    let mut dave = keyed(&key, "shared", "{}");
    dave.headers_mut()
        .insert("authorization", "Bearer dave".parse().unwrap());
    let (_, carol) = text(svc.clone().oneshot(carol).await.unwrap()).await;
    let (_, dave) = text(svc.clone().oneshot(dave).await.unwrap()).await;
    assert_eq!(carol, "job for shared Bearer carol");
    assert_eq!(dave, "job for shared Bearer dave");
    // The same caller again: a replay, without the credential the first response issued.
    let (parts, again) = text(
        svc.clone()
            .oneshot(keyed(&key, "alice", "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again, "job for alice ");
    assert_eq!(parts.headers["idempotency-replayed"], "true");
    assert!(!parts.headers.contains_key("authentication-info"));
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_panic_caught_inside_the_layer_is_not_replayed() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = tower::service_fn(move |_req: Request<tower_reserve::RequestBody>| {
        let runs = counted.clone();
        async move {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the first run panics (on purpose)");
            }
            Ok::<_, BoxError>(Response::new(http_body_util::Full::new(Bytes::from(
                "done",
            ))))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(credits(store.clone()).idempotency(Idempotency::new()))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(handler);
    let key = fresh("k");
    let first = svc.clone().oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(spent(&store, "ann").await, 0);
    let retry = svc.oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(spent(&store, "ann").await, 10);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A timeout outside the layer drops the request as a client that left does: with the
/// default (`Disconnect::Finish`) the handler finishes and its success is charged, as the docs
/// say; the key lets the client's retry get that result instead of paying twice.
#[tokio::test]
async fn an_outer_timeout_finishes_the_handler_and_its_key_replays_the_result() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = tower::service_fn(move |_req: Request<tower_reserve::RequestBody>| {
        let runs = counted.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, BoxError>(Response::new(http_body_util::Full::new(Bytes::from(
                "done",
            ))))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_millis(100),
        ))
        .layer(credits(store.clone()).idempotency(Idempotency::new()))
        .service(handler);
    let key = fresh("k");
    let first = svc.clone().oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::GATEWAY_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while spent(&store, "ann").await != 10 {
        assert!(
            Instant::now() < deadline,
            "the finished handler was not charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retry = svc.oneshot(keyed(&key, "ann", "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotency-replayed"], "true");
    assert_eq!(spent(&store, "ann").await, 10);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
