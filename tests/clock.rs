//! The stores' test clock: a lease, a retention and a window pass in one step, on every store,
//! and Redis's own expiries follow.

use std::time::Duration;

use support::redis_server::{RedisCluster, RedisServer};
use support::{Advance, fresh, granted, kind, spend, status};
use tower_reserve::{Budget, ErrorKind, MemoryStore, RedisStore, Settlement, Window};

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

#[tokio::test]
async fn time_passes_on_the_embedded_store() {
    time_passes(&MemoryStore::with_test_clock()).await;
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
