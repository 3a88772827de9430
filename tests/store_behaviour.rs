//! One behaviour suite, run against every store: the embedded one and real Redis.

use std::time::Duration;

use rand::RngExt;
use support::{denied, fresh, granted, kind, spend, status};
use tower_reserve::{
    Budget, Claim, DenialReason, ErrorKind, HoldId, MAX_AMOUNT, Refund, Reservation, Reserved,
    Settled, Settlement, Store, Unique, Window,
};

const LONG: Duration = Duration::from_secs(60);

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&tower_reserve::MemoryStore::new()).await;
                }
            )*
        }
        mod redis {
            use support::redis_server::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = RedisServer::start();
                    let store = tower_reserve::RedisStore::connect(&server.url()).await.unwrap();
                    super::$case(&store).await;
                }
            )*
        }
        mod cluster {
            use support::redis_server::RedisCluster;
            // One three-primary cluster for every case: starting one takes seconds. The cases
            // use fresh keys, so they do not see each other.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case_on_a_three_primary_cluster() {
                let cluster = RedisCluster::start(3, 0);
                let store = tower_reserve::RedisStore::connect_cluster(cluster.urls()).await.unwrap();
                $(
                    eprintln!("cluster: {}", stringify!($case));
                    super::$case(&store).await;
                )*
            }
        }
    };
}

store_suite!(
    exact_limit_is_granted_and_one_more_is_denied,
    concurrent_reservations_never_exceed_the_limit,
    one_of_many_concurrent_claims_on_a_value_wins,
    reserve_is_idempotent_by_id,
    commit_and_release_are_idempotent,
    release_before_reserve_leaves_a_tombstone,
    an_expired_lease_gives_capacity_back,
    commit_after_expiry_is_refused,
    extend_keeps_a_hold_alive,
    windows_roll_over,
    a_denial_says_when_its_window_resets,
    unique_values_are_owned_and_freed,
    an_email_change_swaps_addresses_in_one_commit,
    a_denial_holds_nothing,
    bad_input_is_refused_and_writes_nothing,
    spent_can_be_seeded,
    the_largest_amounts_are_exact,
    claims_on_many_keys_are_all_or_nothing,
    holds_ending_together_settle_one_by_one,
    one_window_spelled_two_ways_is_one_budget,
    many_budgets_and_values_from_many_threads,
    a_partial_commit_spends_what_was_used,
    refunds_count_once_and_never_below_zero,
    concurrent_retries_of_one_refund_count_once,
    refunds_racing_purchases_near_the_limit_stay_exact,
    a_value_removed_while_its_owner_reclaims_it_stays_in_flight,
    a_memo_comes_back_byte_for_byte_even_empty,
);

async fn one_window_spelled_two_ways_is_one_budget<S: Store>(store: &S) {
    // `Window::Day` and `Window::Every(86 400 s)` name one period: one stored budget. Two claims
    // on it in one reservation must be refused like any two claims on one budget, never held side
    // by side past the limit.
    let key = fresh("customer");
    let day = Budget::new(key.clone(), 100).per(Window::Day);
    let every_day = Budget::new(key.clone(), 100).per(Window::Every(Duration::from_secs(86_400)));
    assert_eq!(day, every_day);
    let both = Reservation::builder()
        .lease(LONG)
        .claim(Claim::spend(day.clone(), 60))
        .claim(Claim::spend(every_day.clone(), 60))
        .build();
    assert_eq!(kind(both), ErrorKind::InvalidInput);
    // Apart, they share one counter.
    granted(store, &spend(&day, 60, LONG)).await;
    let d = denied(store, &spend(&every_day, 60, LONG)).await;
    let resets_at_ms = status(store, &day).await.resets_at_ms;
    assert!(resets_at_ms.is_some());
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 60,
            remaining: 40,
            resets_at_ms,
        }
    );
    assert_eq!(status(store, &every_day).await.held, 60);
    // A window too long to count in milliseconds is refused, not wrapped.
    let huge = Budget::new(key, 100).per(Window::Every(Duration::from_secs(u64::MAX / 10)));
    let r = Reservation::builder().claim(Claim::spend(huge, 1)).build();
    assert_eq!(kind(r), ErrorKind::InvalidInput);
}

async fn holds_ending_together_settle_one_by_one<S: Store>(store: &S) {
    // Holds whose leases end close together are counted together (per 100 ms of lease ends):
    // settling one must take out exactly its own amount, and expiry must give back exactly the
    // rest.
    let budget = Budget::new(fresh("customer"), 1_000);
    let lease = Duration::from_millis(250);
    let a = granted(store, &spend(&budget, 10, lease)).await;
    let b = granted(store, &spend(&budget, 20, lease)).await;
    let c = granted(store, &spend(&budget, 30, lease)).await;
    let d = granted(store, &spend(&budget, 40, lease)).await;
    let e = granted(store, &spend(&budget, 50, lease)).await;
    assert_eq!(status(store, &budget).await.held, 150);
    store.commit(&a.id).await.unwrap();
    store.release(&b.id).await.unwrap();
    // d moves to a later lease; c and e are left to expire.
    store.extend(&d.id, LONG).await.unwrap();
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (10, 120));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (10, 40, 950));
    assert_eq!(kind(store.commit(&c.id).await), ErrorKind::Expired);
    assert!(store.release(&e.id).await.is_ok());
    assert_eq!(store.commit(&d.id).await.unwrap(), Settled::Applied);
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (50, 0, 950));
}

async fn claims_on_many_keys_are_all_or_nothing<S: Store>(store: &S) {
    // On a Cluster these keys fall on different slots: the store reserves them group by group
    // and must still answer all or nothing.
    let budgets: Vec<Budget> = (0..4)
        .map(|_| Budget::new(fresh("customer"), 1_000))
        .collect();
    let tight = Budget::new(fresh("customer"), 10);
    let value = Unique::email(fresh("accounts"), "multi@example.com");
    store.set_spent(&tight, 5).await.unwrap();
    let id = HoldId::new(fresh("multi")).unwrap();
    let r = Reservation::builder()
        .id(id.clone())
        .lease(LONG)
        .claims(budgets.iter().map(|b| Claim::spend(b.clone(), 100)))
        .claim(Claim::own(value.clone(), "acct-1"))
        .claim(Claim::spend(tight.clone(), 6))
        .build()
        .unwrap();
    let d = denied(store, &r).await;
    assert_eq!(d.claim, 5);
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 6,
            remaining: 5,
            resets_at_ms: None,
        }
    );
    for b in &budgets {
        assert_eq!(
            status(store, b).await.held,
            0,
            "a denied reservation holds nothing"
        );
    }
    let rival = Reservation::builder()
        .claim(Claim::own(value.clone(), "acct-2"))
        .build()
        .unwrap();
    let g = granted(store, &rival).await;
    store.release(&g.id).await.unwrap();

    // A denial leaves no trace: the same id may be retried once the claims fit.
    store.set_spent(&tight, 0).await.unwrap();
    let g = granted(store, &r).await;
    assert!(!g.replayed);
    assert_eq!(g.remaining[0], Some(900));
    assert_eq!(g.remaining[4], None);
    assert_eq!(g.remaining[5], Some(4));
    let again = granted(store, &r).await;
    assert!(again.replayed);
    let until = store.extend(&id, LONG).await.unwrap();
    assert!(until >= g.expires_at_ms);
    assert_eq!(store.commit(&id).await.unwrap(), Settled::Applied);
    assert_eq!(store.commit(&id).await.unwrap(), Settled::Replayed);
    assert_eq!(kind(store.release(&id).await), ErrorKind::Committed);
    for b in &budgets {
        let s = status(store, b).await;
        assert_eq!((s.spent, s.held), (100, 0));
    }
    assert_eq!(status(store, &tight).await.spent, 6);
    assert_eq!(
        store.owner(&value).await.unwrap().as_deref(),
        Some("acct-1")
    );

    // Released across every key, and idempotently.
    let r2 = Reservation::builder()
        .lease(LONG)
        .claims(budgets.iter().map(|b| Claim::spend(b.clone(), 50)))
        .build()
        .unwrap();
    let g2 = granted(store, &r2).await;
    assert_eq!(store.release(&g2.id).await.unwrap(), Settled::Applied);
    assert_eq!(store.release(&g2.id).await.unwrap(), Settled::Replayed);
    for b in &budgets {
        let s = status(store, b).await;
        assert_eq!((s.spent, s.held), (100, 0));
    }
}

async fn exact_limit_is_granted_and_one_more_is_denied<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let a = granted(store, &spend(&budget, 60, LONG)).await;
    assert_eq!(a.remaining, vec![Some(40)]);
    let b = granted(store, &spend(&budget, 40, LONG)).await;
    assert_eq!(b.remaining, vec![Some(0)]);
    let d = denied(store, &spend(&budget, 1, LONG)).await;
    assert_eq!(d.claim, 0);
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 1,
            remaining: 0,
            resets_at_ms: None,
        }
    );
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (0, 100, 0));
    store.commit(&a.id).await.unwrap();
    store.commit(&b.id).await.unwrap();
    let s = status(store, &budget).await;
    assert_eq!((s.limit, s.spent, s.held, s.remaining), (100, 100, 0, 0));
}

async fn concurrent_reservations_never_exceed_the_limit<S: Store>(store: &S) {
    let limit = 50_000;
    let budget = Budget::new(fresh("customer"), limit);
    let amounts: Vec<u64> = (0..1000)
        .map(|_| rand::rng().random_range(1..=500))
        .collect();
    let tasks: Vec<_> = amounts
        .iter()
        .map(|&amount| {
            let store = store.clone();
            let r = spend(&budget, amount, LONG);
            tokio::spawn(async move {
                match store.reserve(&r).await.unwrap() {
                    Reserved::Granted(g) => Some((g.id, amount)),
                    Reserved::Denied(_) => None,
                }
            })
        })
        .collect();
    let mut grants = Vec::new();
    for task in tasks {
        grants.extend(task.await.unwrap());
    }
    let granted_sum: u64 = grants.iter().map(|(_, a)| a).sum();
    let total: u64 = amounts.iter().sum();
    assert!(granted_sum <= limit, "granted {granted_sum} above {limit}");
    assert!(total > limit, "the test must ask for more than the limit");
    // Every denial happened because the rest did not fit: at least one amount was too big.
    assert!(limit - granted_sum < 500);
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (0, granted_sum));

    let commits: Vec<_> = grants
        .iter()
        .map(|(id, _)| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { store.commit(&id).await.unwrap() })
        })
        .collect();
    for c in commits {
        assert_eq!(c.await.unwrap(), Settled::Applied);
    }
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (granted_sum, 0));
}

/// Eight threads, each with a runtime of its own, reserve across 24 budgets and 24 values at
/// once (one to three budgets and maybe a value per reservation), then commit or release at
/// random. Every budget ends with exactly what its commits spent and nothing held, never above
/// its limit, and every value with the one owner whose claim committed.
async fn many_budgets_and_values_from_many_threads<S: Store>(store: &S) {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 150;
    const LIMIT: u64 = 6_000;
    let run = fresh("crowd");
    let budgets: Vec<Budget> = (0..24)
        .map(|i| Budget::new(format!("{run}-b{i}"), LIMIT))
        .collect();
    let values: Vec<Unique> = (0..24)
        .map(|i| Unique::new(format!("{run}-names"), &format!("name-{i}")))
        .collect();

    // What each thread committed: amounts per budget, and the values it came to own.
    type Tally = (Vec<u64>, Vec<(usize, String)>);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, budgets, values) = (store.clone(), budgets.clone(), values.clone());
            tokio::task::spawn_blocking(move || -> Tally {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let mut spent = vec![0u64; budgets.len()];
                    let mut owned = Vec::new();
                    for i in 0..PER_THREAD {
                        let (picked, amounts, value, commit) = {
                            let mut rng = rand::rng();
                            let n = rng.random_range(1..=3);
                            let picked =
                                rand::seq::index::sample(&mut rng, budgets.len(), n).into_vec();
                            let amounts: Vec<u64> =
                                picked.iter().map(|_| rng.random_range(1..=400)).collect();
                            let value = rng
                                .random_bool(0.3)
                                .then(|| rng.random_range(0..values.len()));
                            (picked, amounts, value, rng.random_bool(0.6))
                        };
                        let owner = format!("t{t}-{i}");
                        let mut claims: Vec<Claim> = picked
                            .iter()
                            .zip(&amounts)
                            .map(|(&b, &a)| Claim::spend(budgets[b].clone(), a))
                            .collect();
                        if let Some(v) = value {
                            claims.push(Claim::own(values[v].clone(), owner.clone()));
                        }
                        let r = Reservation::builder()
                            .lease(LONG)
                            .claims(claims)
                            .build()
                            .unwrap();
                        let Reserved::Granted(grant) = store.reserve(&r).await.unwrap() else {
                            continue;
                        };
                        if commit {
                            assert_eq!(store.commit(&grant.id).await.unwrap(), Settled::Applied);
                            for (&b, &a) in picked.iter().zip(&amounts) {
                                spent[b] += a;
                            }
                            owned.extend(value.map(|v| (v, owner)));
                        } else {
                            assert_eq!(store.release(&grant.id).await.unwrap(), Settled::Applied);
                        }
                    }
                    (spent, owned)
                })
            })
        })
        .collect();
    let mut spent = vec![0u64; budgets.len()];
    let mut owners: Vec<Vec<String>> = vec![Vec::new(); values.len()];
    for thread in threads {
        let (thread_spent, thread_owned) = thread.await.unwrap();
        for (total, s) in spent.iter_mut().zip(thread_spent) {
            *total += s;
        }
        for (v, owner) in thread_owned {
            owners[v].push(owner);
        }
    }
    for (budget, &committed) in budgets.iter().zip(&spent) {
        let s = status(store, budget).await;
        assert_eq!((s.spent, s.held), (committed, 0), "{}", budget.key());
        assert!(s.spent <= LIMIT);
    }
    assert!(
        spent.iter().filter(|&&s| s > LIMIT / 2).count() > 0,
        "the crowd must press on the limits: {spent:?}"
    );
    for (value, committed) in values.iter().zip(&owners) {
        assert!(committed.len() <= 1, "one owner: {committed:?}");
        assert_eq!(
            store.owner(value).await.unwrap(),
            committed.first().cloned()
        );
    }
}

async fn one_of_many_concurrent_claims_on_a_value_wins<S: Store>(store: &S) {
    let value = Unique::email(fresh("accounts"), "ann@example.com");
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            let r = Reservation::builder()
                .lease(LONG)
                .claim(Claim::own(value.clone(), format!("account-{i}")))
                .build()
                .unwrap();
            tokio::spawn(async move {
                match store.reserve(&r).await.unwrap() {
                    Reserved::Granted(g) => {
                        store.commit(&g.id).await.unwrap();
                        Some(i)
                    }
                    Reserved::Denied(d) => {
                        assert_eq!(d.reason, DenialReason::Taken);
                        None
                    }
                }
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        winners.extend(task.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let owner = store.owner(&value).await.unwrap();
    assert_eq!(owner, Some(format!("account-{}", winners[0])));
}

async fn reserve_is_idempotent_by_id<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let id = HoldId::new(fresh("order")).unwrap();
    let r = Reservation::builder()
        .id(id.clone())
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 30))
        .build()
        .unwrap();
    let first = granted(store, &r).await;
    assert!(!first.replayed);
    let again = granted(store, &r).await;
    assert!(again.replayed);
    assert_eq!(again.expires_at_ms, first.expires_at_ms);
    assert_eq!(again.remaining, vec![Some(70)]);
    assert_eq!(
        status(store, &budget).await.held,
        30,
        "a retry holds nothing more"
    );

    let other = Reservation::builder()
        .id(id.clone())
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 31))
        .build()
        .unwrap();
    assert_eq!(kind(store.reserve(&other).await), ErrorKind::Conflict);

    // Bound to a payload, the same id and claims with another payload are another command.
    let paid = |payload: &[u8]| {
        Reservation::builder()
            .id(HoldId::new(format!("{id}-p")).unwrap())
            .lease(LONG)
            .claim(Claim::spend(budget.clone(), 1))
            .payload(payload)
            .build()
            .unwrap()
    };
    assert!(!granted(store, &paid(b"order 1")).await.replayed);
    assert!(granted(store, &paid(b"order 1")).await.replayed);
    assert_eq!(
        kind(store.reserve(&paid(b"order 2")).await),
        ErrorKind::Conflict
    );
    store.release(&paid(b"order 1").id().clone()).await.unwrap();

    store.commit(&id).await.unwrap();
    assert_eq!(kind(store.reserve(&r).await), ErrorKind::Committed);
    assert_eq!(kind(store.reserve(&other).await), ErrorKind::Conflict);
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (30, 0));
}

async fn commit_and_release_are_idempotent<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let a = granted(store, &spend(&budget, 10, LONG)).await;
    assert_eq!(store.commit(&a.id).await.unwrap(), Settled::Applied);
    assert_eq!(store.commit(&a.id).await.unwrap(), Settled::Replayed);
    assert_eq!(kind(store.release(&a.id).await), ErrorKind::Committed);
    assert_eq!(kind(store.extend(&a.id, LONG).await), ErrorKind::Committed);

    let b = granted(store, &spend(&budget, 20, LONG)).await;
    assert_eq!(store.release(&b.id).await.unwrap(), Settled::Applied);
    assert_eq!(store.release(&b.id).await.unwrap(), Settled::Replayed);
    assert_eq!(kind(store.commit(&b.id).await), ErrorKind::Released);
    assert_eq!(kind(store.extend(&b.id, LONG).await), ErrorKind::Released);

    let unknown = HoldId::new(fresh("never")).unwrap();
    assert_eq!(kind(store.commit(&unknown).await), ErrorKind::UnknownHold);
    assert_eq!(
        kind(store.extend(&unknown, LONG).await),
        ErrorKind::UnknownHold
    );

    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (10, 0, 90));
}

// A memo is any bytes, none of them special: an empty one is kept as one (not taken for no memo),
// and bytes that MessagePack and the hold record's binary head use come back as they were.
async fn a_memo_comes_back_byte_for_byte_even_empty<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    for (commit, memo) in [
        (true, &b""[..]),
        (false, &b""[..]),
        (true, &b"\x00\xff\xc0\x90\x91 H F T \x00"[..]),
        (false, &b"\xdc\x00\x10 released"[..]),
    ] {
        let r = spend(&budget, 10, LONG);
        granted(store, &r).await;
        let settle = if commit {
            Settlement::commit()
        } else {
            Settlement::release()
        };
        let settled = store.settle(r.id(), &settle.memo(memo.to_vec())).await;
        assert_eq!(settled.unwrap(), Settled::Applied);
        let retry = store
            .reserve(&r)
            .await
            .expect_err("a settled hold refuses its retry");
        let settled_kind = if commit {
            ErrorKind::Committed
        } else {
            ErrorKind::Released
        };
        assert_eq!(retry.kind(), settled_kind);
        assert_eq!(retry.memo(), Some(memo), "the memo kept with {:?}", r.id());
    }
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (20, 0));
}

async fn release_before_reserve_leaves_a_tombstone<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let id = HoldId::new(fresh("late")).unwrap();
    assert_eq!(store.release(&id).await.unwrap(), Settled::Tombstoned);
    assert_eq!(store.release(&id).await.unwrap(), Settled::Replayed);
    let late = Reservation::builder()
        .id(id.clone())
        .claim(Claim::spend(budget.clone(), 50))
        .build()
        .unwrap();
    assert_eq!(kind(store.reserve(&late).await), ErrorKind::Released);
    assert_eq!(kind(store.commit(&id).await), ErrorKind::Released);
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (0, 0));
}

async fn an_expired_lease_gives_capacity_back<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let value = Unique::new(fresh("names"), "ann");
    let short = Reservation::builder()
        .lease(Duration::from_millis(150))
        .claim(Claim::spend(budget.clone(), 100))
        .claim(Claim::own(value.clone(), "first"))
        .build()
        .unwrap();
    granted(store, &short).await;
    assert!(matches!(
        denied(store, &spend(&budget, 1, LONG)).await.reason,
        DenialReason::OverBudget { remaining: 0, .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No process ran in between: the capacity comes back because the lease ended.
    assert_eq!(status(store, &budget).await.held, 0);
    let next = Reservation::builder()
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 100))
        .claim(Claim::own(value.clone(), "second"))
        .build()
        .unwrap();
    let g = granted(store, &next).await;
    store.commit(&g.id).await.unwrap();
    assert_eq!(
        store.owner(&value).await.unwrap().as_deref(),
        Some("second")
    );
    assert_eq!(status(store, &budget).await.spent, 100);
}

async fn commit_after_expiry_is_refused<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let g = granted(store, &spend(&budget, 70, Duration::from_millis(100))).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(kind(store.commit(&g.id).await), ErrorKind::Expired);
    assert_eq!(kind(store.commit(&g.id).await), ErrorKind::Expired);
    assert_eq!(kind(store.extend(&g.id, LONG).await), ErrorKind::Expired);
    // Releasing an expired hold is fine: it is already given back.
    assert!(store.release(&g.id).await.is_ok());
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (0, 0, 100));
}

async fn extend_keeps_a_hold_alive<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let value = Unique::new(fresh("names"), "bob");
    let r = Reservation::builder()
        .lease(Duration::from_millis(200))
        .claim(Claim::spend(budget.clone(), 40))
        .claim(Claim::own(value.clone(), "bob"))
        .build()
        .unwrap();
    let g = granted(store, &r).await;
    let until = store.extend(&g.id, Duration::from_secs(30)).await.unwrap();
    assert!(until > g.expires_at_ms + 20_000);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        status(store, &budget).await.held,
        40,
        "still held after the first lease"
    );
    let rival = Reservation::builder()
        .claim(Claim::own(value.clone(), "eve"))
        .build()
        .unwrap();
    assert_eq!(denied(store, &rival).await.reason, DenialReason::Taken);
    assert_eq!(store.commit(&g.id).await.unwrap(), Settled::Applied);
    assert_eq!(status(store, &budget).await.spent, 40);
    assert_eq!(
        kind(store.extend(&g.id, Duration::ZERO).await),
        ErrorKind::InvalidInput
    );
}

async fn windows_roll_over<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100).per(Window::Every(Duration::from_secs(1)));
    // Start right after a boundary so the first steps sit in one window.
    let s = status(store, &budget).await;
    let ends = s.resets_at_ms.expect("a windowed budget resets");
    wait_until(ends + 20).await;
    let g = granted(store, &spend(&budget, 100, LONG)).await;
    store.commit(&g.id).await.unwrap();
    denied(store, &spend(&budget, 1, LONG)).await;
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.remaining), (100, 0));
    wait_until(s.resets_at_ms.unwrap() + 20).await;
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (0, 0, 100));
    granted(store, &spend(&budget, 100, LONG)).await;

    let lifetime = Budget::new(budget.key(), 100);
    assert_eq!(
        status(store, &lifetime).await.spent,
        0,
        "windows do not touch the lifetime budget"
    );
    assert_eq!(status(store, &lifetime).await.resets_at_ms, None);
}

async fn a_denial_says_when_its_window_resets<S: Store>(store: &S) {
    // Each window's denial carries the end of the window it was counted in, by the store's
    // clock: what a budget read says in that window. (A boundary crossed between the reads
    // makes the two reads differ; the denial's is one of them.)
    let key = fresh("customer");
    let hour = Window::Every(Duration::from_secs(3600));
    for window in [hour, Window::Day, Window::Month] {
        let budget = Budget::new(key.clone(), 100).per(window);
        let g = granted(store, &spend(&budget, 100, LONG)).await;
        store.commit(&g.id).await.unwrap();
        let before = status(store, &budget).await.resets_at_ms;
        let d = denied(store, &spend(&budget, 1, LONG)).await;
        let after = status(store, &budget).await.resets_at_ms;
        let DenialReason::OverBudget { resets_at_ms, .. } = d.reason else {
            panic!("{window:?}: over budget, not {:?}", d.reason);
        };
        assert!(resets_at_ms.is_some(), "{window:?}");
        assert!(
            resets_at_ms == before || resets_at_ms == after,
            "{window:?}: {resets_at_ms:?} is not {before:?} or {after:?}"
        );
    }
    // A lifetime budget never resets.
    let lifetime = Budget::new(key, 100);
    store.set_spent(&lifetime, 100).await.unwrap();
    let d = denied(store, &spend(&lifetime, 1, LONG)).await;
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 1,
            remaining: 0,
            resets_at_ms: None,
        }
    );
}

async fn wait_until(unix_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    if unix_ms > now {
        tokio::time::sleep(Duration::from_millis(unix_ms - now)).await;
    }
}

async fn unique_values_are_owned_and_freed<S: Store>(store: &S) {
    let ns = fresh("accounts");
    let value = Unique::email(ns.clone(), " Ann@Example.COM ");
    let same = Unique::email(ns.clone(), "ann@example.com");
    let own = |owner: &str, v: &Unique| {
        Reservation::builder()
            .lease(LONG)
            .claim(Claim::own(v.clone(), owner))
            .build()
            .unwrap()
    };
    let a = granted(store, &own("acct-1", &value)).await;
    // In flight: nobody else, not even the same owner through another command, gets it.
    assert_eq!(
        denied(store, &own("acct-2", &same)).await.reason,
        DenialReason::Taken
    );
    assert_eq!(
        store.owner(&value).await.unwrap(),
        None,
        "a hold is not ownership"
    );
    store.commit(&a.id).await.unwrap();
    assert_eq!(store.owner(&same).await.unwrap().as_deref(), Some("acct-1"));
    assert_eq!(
        denied(store, &own("acct-2", &same)).await.reason,
        DenialReason::Taken
    );
    // The owner claiming its own value again succeeds and changes nothing.
    let again = granted(store, &own("acct-1", &same)).await;
    store.release(&again.id).await.unwrap();
    assert_eq!(store.owner(&same).await.unwrap().as_deref(), Some("acct-1"));

    // A released claim frees the value for others.
    let other = Unique::new(ns.clone(), "someone@example.com");
    let b = granted(store, &own("acct-2", &other)).await;
    store.release(&b.id).await.unwrap();
    let c = granted(store, &own("acct-3", &other)).await;
    store.commit(&c.id).await.unwrap();
    assert_eq!(
        store.owner(&other).await.unwrap().as_deref(),
        Some("acct-3")
    );

    assert!(store.remove(&other).await.unwrap());
    assert!(!store.remove(&other).await.unwrap());
    assert_eq!(store.owner(&other).await.unwrap(), None);
}

async fn an_email_change_swaps_addresses_in_one_commit<S: Store>(store: &S) {
    let ns = fresh("accounts");
    let old = Unique::email(ns.clone(), "old@example.com");
    let new = Unique::email(ns.clone(), "new@example.com");
    let sign_up = Reservation::builder()
        .claim(Claim::own(old.clone(), "acct-1"))
        .build()
        .unwrap();
    let g = granted(store, &sign_up).await;
    store.commit(&g.id).await.unwrap();

    let change = Reservation::builder()
        .claim(Claim::own(new.clone(), "acct-1"))
        .claim(Claim::release_on_commit(old.clone(), "acct-1"))
        .build()
        .unwrap();
    let g = granted(store, &change).await;
    assert_eq!(
        store.owner(&old).await.unwrap().as_deref(),
        Some("acct-1"),
        "freed only on commit"
    );
    store.commit(&g.id).await.unwrap();
    assert_eq!(store.owner(&old).await.unwrap(), None);
    assert_eq!(store.owner(&new).await.unwrap().as_deref(), Some("acct-1"));

    // A failed change keeps the old address.
    let back = Reservation::builder()
        .claim(Claim::own(old.clone(), "acct-1"))
        .claim(Claim::release_on_commit(new.clone(), "acct-1"))
        .build()
        .unwrap();
    let g = granted(store, &back).await;
    store.release(&g.id).await.unwrap();
    assert_eq!(store.owner(&new).await.unwrap().as_deref(), Some("acct-1"));
    assert_eq!(store.owner(&old).await.unwrap(), None);

    // Only the owner can give a value up.
    let theft = Reservation::builder()
        .claim(Claim::release_on_commit(new.clone(), "acct-2"))
        .build()
        .unwrap();
    assert_eq!(denied(store, &theft).await.reason, DenialReason::NotOwner);
}

async fn a_denial_holds_nothing<S: Store>(store: &S) {
    let roomy = Budget::new(fresh("customer"), 1_000);
    let tight = Budget::new(fresh("customer"), 10);
    let value = Unique::new(fresh("names"), "carol");
    let r = Reservation::builder()
        .claim(Claim::spend(roomy.clone(), 500))
        .claim(Claim::own(value.clone(), "carol"))
        .claim(Claim::spend(tight.clone(), 11))
        .build()
        .unwrap();
    let d = denied(store, &r).await;
    assert_eq!(d.claim, 2);
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 11,
            remaining: 10,
            resets_at_ms: None,
        }
    );
    assert_eq!(status(store, &roomy).await.held, 0);
    let other = Reservation::builder()
        .claim(Claim::own(value.clone(), "dave"))
        .build()
        .unwrap();
    granted(store, &other).await;
}

async fn bad_input_is_refused_and_writes_nothing<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 100);
    let invalid = |b: tower_reserve::ReservationBuilder| b.build().unwrap_err().kind();
    let base = || Reservation::builder();
    assert_eq!(
        invalid(base()),
        ErrorKind::InvalidInput,
        "empty reservation"
    );
    assert_eq!(
        invalid(base().claim(Claim::spend(budget.clone(), 0))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::spend(budget.clone(), MAX_AMOUNT + 1))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::spend(Budget::new("k", MAX_AMOUNT + 1), 1))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::spend(Budget::new("", 10), 1))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::spend(Budget::new("k".repeat(513), 10), 1))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(
            base()
                .claim(Claim::spend(budget.clone(), 1))
                .claim(Claim::spend(budget.clone(), 2))
        ),
        ErrorKind::InvalidInput,
        "two claims on one budget"
    );
    let v = Unique::new("ns", "x");
    assert_eq!(
        invalid(
            base()
                .claim(Claim::own(v.clone(), "a"))
                .claim(Claim::release_on_commit(v, "a"))
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::own(Unique::email("ns", "   "), "a"))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claim(Claim::own(Unique::new("ns", "x"), ""))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(
            base()
                .lease(Duration::ZERO)
                .claim(Claim::spend(budget.clone(), 1))
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        invalid(base().claims((0..65).map(|i| Claim::spend(Budget::new(format!("k{i}"), 9), 1)))),
        ErrorKind::InvalidInput
    );
    assert!(HoldId::new("").is_err());
    assert!(HoldId::new("x".repeat(129)).is_err());
    assert!(HoldId::new("a{b}").is_err());
    assert_eq!(
        invalid(base().claim(Claim::spend(Budget::new("a{b}", 10), 1))),
        ErrorKind::InvalidInput,
        "braces would pick another Cluster slot"
    );

    assert_eq!(
        kind(store.set_spent(&budget, MAX_AMOUNT + 1).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(store.budget(&Budget::new("", 1)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(store.owner(&Unique::new("ns", "")).await),
        ErrorKind::InvalidInput
    );
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held), (0, 0), "nothing was written");
}

async fn spent_can_be_seeded<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 50_000);
    store.set_spent(&budget, 48_000).await.unwrap();
    let d = denied(store, &spend(&budget, 2_001, LONG)).await;
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 2_001,
            remaining: 2_000,
            resets_at_ms: None,
        }
    );
    let g = granted(store, &spend(&budget, 2_000, LONG)).await;
    store.commit(&g.id).await.unwrap();
    assert_eq!(status(store, &budget).await.spent, 50_000);
    // Seeding above the limit (the limit was lowered, say) denies everything, never underflows.
    store.set_spent(&budget, 60_000).await.unwrap();
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.remaining), (60_000, 0));
    denied(store, &spend(&budget, 1, LONG)).await;
}

async fn the_largest_amounts_are_exact<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), MAX_AMOUNT);
    let a = granted(store, &spend(&budget, MAX_AMOUNT - 1, LONG)).await;
    assert_eq!(a.remaining, vec![Some(1)]);
    let d = denied(store, &spend(&budget, 2, LONG)).await;
    assert_eq!(
        d.reason,
        DenialReason::OverBudget {
            requested: 2,
            remaining: 1,
            resets_at_ms: None,
        }
    );
    let b = granted(store, &spend(&budget, 1, LONG)).await;
    store.commit(&a.id).await.unwrap();
    store.commit(&b.id).await.unwrap();
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.held, s.remaining), (MAX_AMOUNT, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Partial commits and refunds

async fn a_partial_commit_spends_what_was_used<S: Store>(store: &S) {
    let a = Budget::new(fresh("metered"), 1_000);
    let b = Budget::new(fresh("metered"), 1_000);
    let two = |amount_a, amount_b| {
        Reservation::builder()
            .lease(LONG)
            .claim(Claim::spend(a.clone(), amount_a))
            .claim(Claim::spend(b.clone(), amount_b))
            .build()
            .unwrap()
    };
    let grant = granted(store, &two(300, 200)).await;

    // Above what was held, or on a budget the hold does not spend from: refused, nothing
    // changed, the hold still live.
    let over = Settlement::commit().actual(&a, 301);
    assert_eq!(
        kind(store.settle(&grant.id, &over).await),
        ErrorKind::ExceedsHold
    );
    let stranger = Budget::new(fresh("metered"), 1_000);
    let elsewhere = Settlement::commit().actual(&stranger, 1);
    assert_eq!(
        kind(store.settle(&grant.id, &elsewhere).await),
        ErrorKind::InvalidInput
    );
    let s = status(store, &a).await;
    assert_eq!((s.spent, s.held), (0, 300));

    // 120 of A's 300 is spent and the rest is back in the same step; B, not named, spends all.
    let used = Settlement::commit().actual(&a, 120);
    assert_eq!(
        store.settle(&grant.id, &used).await.unwrap(),
        Settled::Applied
    );
    assert_eq!(
        store.settle(&grant.id, &used).await.unwrap(),
        Settled::Replayed
    );
    let (sa, sb) = (status(store, &a).await, status(store, &b).await);
    assert_eq!((sa.spent, sa.held, sa.remaining), (120, 0, 880));
    assert_eq!((sb.spent, sb.held), (200, 0));

    // Zero used spends nothing on that budget.
    let grant = granted(store, &two(500, 100)).await;
    let nothing = Settlement::commit().actual(&a, 0).actual(&b, 100);
    assert_eq!(
        store.settle(&grant.id, &nothing).await.unwrap(),
        Settled::Applied
    );
    let (sa, sb) = (status(store, &a).await, status(store, &b).await);
    assert_eq!((sa.spent, sa.held), (120, 0));
    assert_eq!((sb.spent, sb.held), (300, 0));
}

async fn refunds_count_once_and_never_below_zero<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 1_000);
    let grant = granted(store, &spend(&budget, 500, LONG)).await;
    store.commit(&grant.id).await.unwrap();

    let id = HoldId::new(fresh("refund")).unwrap();
    let refund = Refund::new(id.clone(), budget.clone(), 200);
    assert_eq!(store.refund(&refund).await.unwrap(), Settled::Applied);
    assert_eq!(store.refund(&refund).await.unwrap(), Settled::Replayed);
    assert_eq!(status(store, &budget).await.spent, 300);
    // The same id for another amount is another refund: refused.
    let other = Refund::new(id, budget.clone(), 150);
    assert_eq!(kind(store.refund(&other).await), ErrorKind::Conflict);

    // More than was spent: refused, nothing changed.
    let too_much = Refund::new(HoldId::new(fresh("refund")).unwrap(), budget.clone(), 301);
    assert_eq!(kind(store.refund(&too_much).await), ErrorKind::ExceedsSpent);
    assert_eq!(status(store, &budget).await.spent, 300);
    let all = Refund::new(HoldId::new(fresh("refund")).unwrap(), budget.clone(), 300);
    assert_eq!(store.refund(&all).await.unwrap(), Settled::Applied);
    let s = status(store, &budget).await;
    assert_eq!((s.spent, s.remaining), (0, 1_000));

    // A window that has ended takes nothing back; the current one does.
    let daily = Budget::new(fresh("daily"), 1_000).per(Window::Day);
    let grant = granted(store, &spend(&daily, 400, LONG)).await;
    store.commit(&grant.id).await.unwrap();
    let yesterday = std::time::SystemTime::now() - Duration::from_secs(86_400);
    let late = Refund::new(HoldId::new(fresh("refund")).unwrap(), daily.clone(), 100)
        .in_window_of(yesterday);
    assert_eq!(kind(store.refund(&late).await), ErrorKind::Expired);
    let now = Refund::new(HoldId::new(fresh("refund")).unwrap(), daily.clone(), 100)
        .in_window_of(std::time::SystemTime::now());
    assert_eq!(store.refund(&now).await.unwrap(), Settled::Applied);
    assert_eq!(status(store, &daily).await.spent, 300);
}

async fn concurrent_retries_of_one_refund_count_once<S: Store>(store: &S) {
    let budget = Budget::new(fresh("customer"), 10_000);
    let grant = granted(store, &spend(&budget, 5_000, LONG)).await;
    store.commit(&grant.id).await.unwrap();
    let refund = Refund::new(HoldId::new(fresh("refund")).unwrap(), budget.clone(), 700);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (store, refund) = (store.clone(), refund.clone());
            tokio::spawn(async move { store.refund(&refund).await.unwrap() })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        if task.await.unwrap() == Settled::Applied {
            applied += 1;
        }
    }
    assert_eq!(
        applied, 1,
        "one of the retries applies, the others replay it"
    );
    assert_eq!(status(store, &budget).await.spent, 4_300);
}

/// A budget spent to its limit; refunds of 100 (each retried) race purchases of 50: the sum
/// is exact, and at no time is more granted than the limit allows.
async fn refunds_racing_purchases_near_the_limit_stay_exact<S: Store>(store: &S) {
    const LIMIT: u64 = 10_000;
    let budget = Budget::new(fresh("customer"), LIMIT);
    let grant = granted(store, &spend(&budget, LIMIT, LONG)).await;
    store.commit(&grant.id).await.unwrap();
    let refunds: Vec<_> = (0..20)
        .map(|_| Refund::new(HoldId::new(fresh("refund")).unwrap(), budget.clone(), 100))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..120 {
        let store = store.clone();
        let budget = budget.clone();
        // Each refund is sent twice, as a client that retries would.
        let refund = (i % 3 == 0).then(|| refunds[(i / 3) % refunds.len()].clone());
        tasks.push(tokio::spawn(async move {
            match refund {
                Some(refund) => {
                    store.refund(&refund).await.unwrap();
                    0
                }
                None => match store.reserve(&spend(&budget, 50, LONG)).await.unwrap() {
                    Reserved::Granted(g) => {
                        store.commit(&g.id).await.unwrap();
                        50
                    }
                    Reserved::Denied(d) => {
                        assert!(matches!(d.reason, DenialReason::OverBudget { .. }));
                        0
                    }
                },
            }
        }));
    }
    let mut bought = 0;
    for task in tasks {
        bought += task.await.unwrap();
    }
    let s = status(store, &budget).await;
    assert_eq!(
        s.spent,
        LIMIT - 20 * 100 + bought,
        "refunded once each, bought exactly"
    );
    assert!(s.spent <= LIMIT);
    assert_eq!(s.held, 0);
    assert!(
        bought <= 2_000,
        "no more bought than was given back: {bought}"
    );
}

// ---------------------------------------------------------------------------------------------
// Removal

/// An owner claiming its own value again has it in flight like any claimant: an operator's
/// removal meanwhile frees the ownership but not the hold, nobody else can take the value, and
/// the commit makes it the owner's again (a release leaves it free).
async fn a_value_removed_while_its_owner_reclaims_it_stays_in_flight<S: Store>(store: &S) {
    let value = Unique::email(fresh("accounts"), "ann@example.com");
    let own = |owner: &str| {
        Reservation::builder()
            .lease(LONG)
            .claim(Claim::own(value.clone(), owner))
            .build()
            .unwrap()
    };
    let first = granted(store, &own("a")).await;
    store.commit(&first.id).await.unwrap();

    for (settle_by_commit, after) in [(true, Some("a".to_owned())), (false, None)] {
        let again = granted(store, &own("a")).await;
        assert_eq!(denied(store, &own("b")).await.reason, DenialReason::Taken);
        assert!(store.remove(&value).await.unwrap());
        assert_eq!(store.owner(&value).await.unwrap(), None);
        assert_eq!(
            denied(store, &own("b")).await.reason,
            DenialReason::Taken,
            "still in flight"
        );
        if settle_by_commit {
            store.commit(&again.id).await.unwrap();
        } else {
            store.release(&again.id).await.unwrap();
        }
        assert_eq!(store.owner(&value).await.unwrap(), after);
    }
    let b = granted(store, &own("b")).await;
    store.commit(&b.id).await.unwrap();
    assert_eq!(store.owner(&value).await.unwrap(), Some("b".to_owned()));
}
