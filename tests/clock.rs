//! The stores' test clock: a lease, a retention and a window pass in one step, on every store,
//! and Redis's own expiries follow.

use std::time::Duration;

use support::redis_server::{RedisCluster, RedisServer};
use support::{Advance, fresh, granted, kind, spend, status};
use tower_reserve::{
    Budget, Claim, ErrorKind, MemoryStore, RedisStore, Reservation, Reserved, Settlement, Unique,
    Window,
};

async fn time_passes<S: Advance>(store: &S) {
    // A lease ends: its capacity is back, and a commit is refused.
    let budget = Budget::new(fresh("clock"), 100);
    let hold = granted(store, &spend(&budget, 100, Duration::from_secs(10))).await;
    assert_eq!(status(store, &budget).await.held, 100);
    store.advance(Duration::from_millis(10_100)).await;
    assert_eq!(status(store, &budget).await.held, 0);
    assert_eq!(kind(store.commit(&hold.id).await), ErrorKind::Expired);

    // A retention ends: the record is gone, so the id is unknown.
    let r = spend(&budget, 10, Duration::from_secs(10));
    let hold = granted(store, &r).await;
    store
        .settle(
            &hold.id,
            &Settlement::commit().retain(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(kind(store.reserve(&r).await), ErrorKind::Committed);
    store.advance(Duration::from_secs(61)).await;
    assert_eq!(kind(store.commit(&hold.id).await), ErrorKind::UnknownHold);
    assert_eq!(status(store, &budget).await.spent, 10);

    // A window ends: the next one starts empty.
    let daily = Budget::new(fresh("clock-day"), 100).per(Window::Day);
    let hold = granted(store, &spend(&daily, 60, Duration::from_secs(10))).await;
    store.commit(&hold.id).await.unwrap();
    assert_eq!(status(store, &daily).await.spent, 60);
    store.advance(Duration::from_secs(86_400)).await;
    assert_eq!(status(store, &daily).await.spent, 0);
}

/// Once the clock has passed a lease, its values are free, however the jumps fall: Redis still
/// serves a key in its last millisecond, so a jump that lands in it must remove that key too.
/// Landing there is a matter of timing (the first jump leaves the value's marker a millisecond
/// or a few, the second must come in the last of them: on a Cluster, after the nodes visited
/// before the value's), hence many tries.
async fn a_lease_passed_in_two_jumps_frees_its_value<S: Advance>(store: &S) {
    let ns = fresh("clock-value");
    let lease = Duration::from_secs(1);
    for attempt in 0..300 {
        let value = Unique::new(ns.clone(), &attempt.to_string());
        let own = |owner: &str| {
            Reservation::builder()
                .lease(lease)
                .claim(Claim::own(value.clone(), owner))
                .build()
                .unwrap()
        };
        let left = Duration::from_millis(1 + attempt % 4);
        granted(store, &own("first")).await;
        store.advance(lease - left).await;
        store.advance(left).await;
        let next = store.reserve(&own("second")).await;
        assert!(
            matches!(next, Ok(Reserved::Granted(_))),
            "try {attempt}: the lease has passed, yet {next:?}"
        );
    }
}

#[tokio::test]
async fn time_passes_on_the_embedded_store() {
    time_passes(&MemoryStore::with_test_clock()).await;
    a_lease_passed_in_two_jumps_frees_its_value(&MemoryStore::with_test_clock()).await;
}

#[tokio::test]
async fn time_passes_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .test_clock()
        .connect(&server.url())
        .await
        .unwrap();
    time_passes(&store).await;
    a_lease_passed_in_two_jumps_frees_its_value(&store).await;
}

#[tokio::test]
async fn time_passes_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let store = RedisStore::builder()
        .test_clock()
        .connect_cluster(cluster.urls())
        .await
        .unwrap();
    time_passes(&store).await;
    a_lease_passed_in_two_jumps_frees_its_value(&store).await;
}

#[tokio::test]
async fn a_store_without_a_test_clock_keeps_the_servers_time() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let budget = Budget::new(fresh("clock"), 100);
    granted(&store, &spend(&budget, 100, Duration::from_secs(10))).await;
    store.advance_clock(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status(&store, &budget).await.held, 100);
}
