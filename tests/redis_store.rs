//! What only the Redis store can show: the expiry of every key its operations create, its
//! Cluster reservations across slots under racing attempts, half-finished commits and extends,
//! batches that mix slots, and the server settings it refuses. Every case runs against real
//! `redis-server` processes started here.

use std::time::Duration;

use support::redis_server::{RedisCluster, RedisServer};
use support::{fresh, spend};
use tower_reserve::{
    Budget, Claim, ErrorKind, HoldId, RedisStore, Reservation, Reserved, Settled, Store, Unique,
    Window,
};

const LONG: Duration = Duration::from_secs(60);

/// Every key under `prefix` on `node`, with its time to live in ms (-1: none).
fn keys_and_ttls(node: &RedisServer, prefix: &str) -> Vec<(String, i64)> {
    node.cli(&["--scan", "--pattern", &format!("{prefix}:*")])
        .lines()
        .filter(|k| !k.is_empty())
        .map(|k| {
            let ttl = node.cli(&["pttl", k]).trim().parse().expect("a PTTL");
            (k.to_owned(), ttl)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_windowed_budget_and_its_holds_expires() {
    // A windowed budget's keys, its holds' records and their buckets must all carry an expiry:
    // an extend that takes a hold out of its only bucket, or moves holds between buckets, must
    // never leave a key that outlives its window forever.
    let redis = RedisServer::start();
    let prefix = fresh("ttl");
    let store = RedisStore::builder()
        .prefix(&prefix)
        .connect(&redis.url())
        .await
        .unwrap();
    let budget =
        Budget::new(fresh("customer"), 1_000).per(Window::Every(Duration::from_secs(3_600)));
    let reserve = |lease: Duration| {
        Reservation::builder()
            .lease(lease)
            .claim(Claim::spend(budget.clone(), 100))
            .build()
            .unwrap()
    };
    let lone = match store
        .reserve(&reserve(Duration::from_secs(10)))
        .await
        .unwrap()
    {
        Reserved::Granted(g) => g.id,
        other => panic!("{other:?}"),
    };
    // Out of its only bucket, into another.
    store
        .extend(&lone.clone(), Duration::from_secs(20))
        .await
        .unwrap();
    let no_expiry: Vec<_> = keys_and_ttls(&redis, &prefix)
        .into_iter()
        .filter(|(_, ttl)| *ttl < 0)
        .collect();
    assert!(
        no_expiry.is_empty(),
        "keys without an expiry: {no_expiry:?}"
    );

    // Holds in several buckets, moved about.
    let other = match store
        .reserve(&reserve(Duration::from_secs(40)))
        .await
        .unwrap()
    {
        Reserved::Granted(g) => g.id,
        other => panic!("{other:?}"),
    };
    store.extend(&lone, Duration::from_secs(50)).await.unwrap();
    store.extend(&other, Duration::from_secs(15)).await.unwrap();
    store.extend(&lone, Duration::from_secs(25)).await.unwrap();
    let keys = keys_and_ttls(&redis, &prefix);
    assert!(
        keys.len() >= 3,
        "the budget, its buckets and two records: {keys:?}"
    );
    let no_expiry: Vec<_> = keys.iter().filter(|(_, ttl)| *ttl < 0).collect();
    assert!(
        no_expiry.is_empty(),
        "keys without an expiry: {no_expiry:?}"
    );

    // When the window's keys expire before a late release (a lease longer than the window), the
    // release still succeeds: no script fails half-way on its own arithmetic.
    for (key, _) in keys.iter().filter(|(k, _)| k.contains(":b:")) {
        redis.cli(&["del", key]);
    }
    assert!(store.release(&lone).await.is_ok());
    assert!(store.release(&other).await.is_ok());
}

/// Two budget keys on different nodes of `cluster`, neither on the node of `avoid`'s slot if
/// given: the claims of a reservation across slots (and nodes).
fn keys_on_two_nodes(cluster: &RedisCluster, prefix: &str) -> (String, String) {
    let first = fresh("a");
    let node = cluster.node_of(&format!("{prefix}:b:{{{first}}}"));
    for _ in 0..1_000 {
        let second = fresh("b");
        if cluster.node_of(&format!("{prefix}:b:{{{second}}}")) != node {
            return (first, second);
        }
    }
    panic!("no key on another node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_attempts_of_one_reservation_across_slots_run_once() {
    // Two sends of one reservation (one id, claims on several slots) at the same moment: exactly
    // one may be the fresh grant whose handler runs; the other is a replay, or told the first
    // is still in flight. Many rounds, so that every interleaving of the groups comes up.
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 0));
    let prefix = fresh("race");
    let store = RedisStore::builder()
        .prefix(&prefix)
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    for round in 0..60 {
        let (a, b) = keys_on_two_nodes(&cluster, &prefix);
        let (a, b) = (Budget::new(a, 1_000), Budget::new(b, 1_000));
        let value = Unique::email(fresh("accounts"), "race@example.com");
        let r = Reservation::builder()
            .id(HoldId::new(fresh("order")).unwrap())
            .lease(LONG)
            .claim(Claim::spend(a.clone(), 100))
            .claim(Claim::own(value, "acct"))
            .claim(Claim::spend(b.clone(), 100))
            .build()
            .unwrap();
        let (x, y) = tokio::join!(store.reserve(&r), store.reserve(&r));
        let fresh_grants = [&x, &y]
            .iter()
            .filter(|a| matches!(a, Ok(Reserved::Granted(g)) if !g.replayed))
            .count();
        assert_eq!(fresh_grants, 1, "round {round}: {x:?} / {y:?}");
        for answer in [&x, &y] {
            match answer {
                Ok(Reserved::Granted(_)) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::InFlight, "round {round}: {e:?}"),
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(store.commit(r.id()).await.unwrap(), Settled::Applied);
        for budget in [&a, &b] {
            let s = store.budget(budget).await.unwrap();
            assert_eq!((s.spent, s.held), (100, 0), "round {round}: spent once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_reach_a_group_commits_nothing_until_it_can() {
    // A group's node is paused past the call's time limit. The home commits only once every
    // group is sure to outlive the commit, so nothing is committed meanwhile (never one group
    // spent and another not), and a retried commit finishes the job.
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 0));
    let prefix = fresh("half");
    let store = RedisStore::builder()
        .prefix(&prefix)
        .timeout(Duration::from_millis(300))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let (a, b) = keys_on_two_nodes(&cluster, &prefix);
    let (a, b) = (Budget::new(a, 1_000), Budget::new(b, 1_000));
    let r = Reservation::builder()
        .lease(LONG)
        .claim(Claim::spend(a.clone(), 100))
        .claim(Claim::spend(b.clone(), 200))
        .build()
        .unwrap();
    let id = match store.reserve(&r).await.unwrap() {
        Reserved::Granted(g) => g.id,
        other => panic!("{other:?}"),
    };
    let paused = cluster.node_of(&format!("{prefix}:b:{{{}}}", b.key()));
    assert_ne!(
        paused,
        cluster.node_of(&format!("{prefix}:b:{{{}}}", a.key()))
    );
    cluster.nodes[paused].cli(&["client", "pause", "1500", "write"]);
    let commit = store.commit(&id).await;
    assert_eq!(
        commit.as_ref().map_err(tower_reserve::Error::kind),
        Err(ErrorKind::Unavailable),
        "the paused group did not answer in time: {commit:?}"
    );
    let home = store.budget(&a).await.unwrap();
    assert_eq!((home.spent, home.held), (0, 100), "the home did not commit");
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert!(store.commit(&id).await.is_ok());
    let (sa, sb) = (
        store.budget(&a).await.unwrap(),
        store.budget(&b).await.unwrap(),
    );
    assert_eq!((sa.spent, sa.held, sb.spent, sb.held), (100, 0, 200, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_across_slots_keeps_the_home_ending_first() {
    // The home record decides a commit within its lease; every group must still be held then.
    // So after an extend, each group's lease (and record) ends after the home's.
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 0));
    let prefix = fresh("ext");
    let store = RedisStore::builder()
        .prefix(&prefix)
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let (a, b) = keys_on_two_nodes(&cluster, &prefix);
    let r = Reservation::builder()
        .lease(Duration::from_secs(5))
        .claim(Claim::spend(Budget::new(a, 1_000), 100))
        .claim(Claim::spend(Budget::new(b, 1_000), 100))
        .build()
        .unwrap();
    let id = match store.reserve(&r).await.unwrap() {
        Reserved::Granted(g) => g.id,
        other => panic!("{other:?}"),
    };
    for lease in [20, 8, 30] {
        store.extend(&id, Duration::from_secs(lease)).await.unwrap();
        // Records: the home's is an `h`, each group's a `g`.
        let mut home = None;
        let mut groups = Vec::new();
        for node in &cluster.nodes {
            for key in node
                .cli(&["--scan", "--pattern", &format!("{prefix}:[hg]:*")])
                .lines()
                .filter(|k| !k.is_empty())
            {
                let at: i64 = node.cli(&["pexpiretime", key]).trim().parse().unwrap();
                if key.starts_with(&format!("{prefix}:g:")) {
                    groups.push(at);
                } else {
                    home = Some(at);
                }
            }
        }
        let home = home.expect("a home record");
        assert!(!groups.is_empty(), "a group record");
        for group in groups {
            assert!(
                group >= home + 50,
                "lease {lease}: a group ends at {group}, before its home at {home}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_that_mix_slots_of_one_node_stay_exact() {
    // Many one-slot reservations on budgets all over the slots, at once: a node's batch carries
    // operations of many of its slots. Every sum is exact, and batching happened.
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 0));
    let store = RedisStore::builder()
        .prefix(fresh("mix"))
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    let budgets: Vec<Budget> = (0..40)
        .map(|_| Budget::new(fresh("customer"), 1_000))
        .collect();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let (store, r) = (store.clone(), spend(&budgets[i % budgets.len()], 30, LONG));
            tokio::spawn(async move {
                match store.reserve(&r).await.unwrap() {
                    Reserved::Granted(g) => {
                        if i % 3 == 0 {
                            store.release(&g.id).await.unwrap();
                            0
                        } else {
                            store.commit(&g.id).await.unwrap();
                            30
                        }
                    }
                    Reserved::Denied(_) => 0,
                }
            })
        })
        .collect();
    let mut committed = 0;
    for t in tasks {
        committed += t.await.unwrap();
    }
    let mut spent = 0;
    for b in &budgets {
        let s = store.budget(b).await.unwrap();
        assert_eq!(s.held, 0, "{}", b.key());
        assert!(s.spent <= 1_000);
        spent += s.spent;
    }
    assert_eq!(spent, committed);
    let stats = store.batch_stats();
    assert!(
        stats.ops > stats.calls,
        "operations went out together: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_is_refused_unless_accepted() {
    // An eviction policy other than noeviction may evict an in-flight marker or a window's
    // budget: two owners for one value, or a budget granted again.
    let lru = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let err = RedisStore::connect(&lru.url()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("maxmemory-policy"), "{err}");
    let store = RedisStore::builder()
        .allow_eviction(true)
        .connect(&lru.url())
        .await
        .expect("accepted on purpose");
    store.budget(&Budget::new("k", 1)).await.unwrap();

    let volatile = RedisServer::start_with(&["--maxmemory-policy", "volatile-ttl"]);
    assert!(RedisStore::connect(&volatile.url()).await.is_err());
    let safe = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    assert!(RedisStore::connect(&safe.url()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_limit_too_long_to_add_to_the_clock_is_no_limit() {
    // `Duration::MAX` as a store's time limit: no deadline can be computed from it, and every
    // call must still run (not panic, not time out at once).
    let redis = RedisServer::start();
    let store = RedisStore::builder()
        .prefix(fresh("nolimit"))
        .timeout(Duration::MAX)
        .connect(&redis.url())
        .await
        .unwrap();
    let budget = Budget::new(fresh("nolimit"), 100);
    let r = spend(&budget, 30, LONG);
    assert!(matches!(store.reserve(&r).await, Ok(Reserved::Granted(_))));
    assert_eq!(
        store
            .settle(r.id(), &tower_reserve::Settlement::commit())
            .await
            .unwrap(),
        Settled::Applied
    );
    assert_eq!(store.budget(&budget).await.unwrap().spent, 30);
}
