//! The Redis store: every operation one run of one Lua function, batched per node.
//!
//! - `connection.rs`: the connection (one node or a Cluster), the script, the checks at connect.
//! - `batch.rs`: the worker per node that coalesces concurrent operations into one call.
//! - `protocol.rs`: operations and answers on the wire (MessagePack).
//! - `ops.rs`: each operation written, each answer read back into the crate's types.
//! - `cluster.rs`: the slot map, and reservations whose claims span slots.
//! - `keys.rs`: key names.
//!
//! The Lua is in `src/store/lua/`.

mod batch;
mod cluster;
mod connection;
mod keys;
mod ops;
mod protocol;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use self::batch::{Batcher, Counters, Limits};
use self::cluster::Router;
use self::connection::{CallArgs, Conn, check_server};
use self::keys::Keys;
use self::ops::{Mode, Nonce, ReserveArgs};
use self::protocol::Op;
use super::{DEFAULT_RETAIN, Store, check_set_spent};
use crate::store::clock::Clock;
use crate::{
    Budget, BudgetStatus, Error, ErrorKind, HoldId, Refund, Reservation, Reserved, Settled,
    Settlement, Unique,
};
#[cfg(feature = "test-clock")]
use redis::Value;

/// A [`Store`] on Redis (one node or a Cluster), shared by every process that uses the same
/// Redis and key prefix.
///
/// Every operation is one run of one Lua function (a Redis Function) that checks and writes
/// atomically. Operations that requests ask of one node while a call is in flight there are sent
/// together as the next call, each answered on its own: a lone request waits for nothing, and
/// under load one call carries many. On a Cluster, a reservation whose claims share a slot is one
/// operation on one node, as on a single node (see the [crate docs](crate#redis-cluster)).
///
/// Connections are multiplexed and re-established after Redis restarts (redis-rs). Each call is
/// bounded by a timeout; past it the call fails as [`ErrorKind::Unavailable`]. A settlement whose
/// answer was lost is sent again (a call that landed answers as it did); a reserve whose answer
/// was lost is given back in the background, so that its id may be reserved again, unless a
/// retry has been answered for its hold meanwhile (a replay): a hold two calls were told they
/// have stays until it is settled or its lease ends. Needs Redis 7.0 or later, with
/// `maxmemory-policy noeviction` (checked at connect time; see
/// [`RedisStoreBuilder::allow_eviction`]).
///
/// ```no_run
/// use tower_reserve::RedisStore;
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), tower_reserve::Error> {
/// let store = RedisStore::builder()
///     .prefix("shop")
///     .timeout(Duration::from_millis(500))
///     .connect("redis://127.0.0.1:6379/")
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
///
/// # Upgrading from the previous release
///
/// This release keeps budgets and hold records in a new layout under the same keys (a budget's
/// state in one packed field, hold records with a binary head and a version byte). It reads
/// what the previous release wrote as that release meant it: a budget's spent amount, what its
/// holds in flight hold, owned values and values in flight, settled records, tombstones, and
/// refunds already applied. Whatever an operation changes it writes in the new layout, the old
/// fields gone, in the same atomic call. A key in neither layout stops the operation with an
/// [`ErrorKind::Protocol`] error that changes nothing: it is never taken for empty.
///
/// The previous release cannot read the new layout (it would take a budget for unspent). So
/// whenever this release loads its library, it replaces the previous release's library on the
/// same Redis with one whose function refuses every call: from the moment the first instance
/// of this release connects, instances of the previous release fail closed (their calls are
/// errors) instead of granting a budget's capacity again. A rolling deploy is therefore safe,
/// with these costs:
///
/// - Requests on instances of the previous release fail from then until those instances are
///   replaced. A hold one of them reserved before is not settled by it: its capacity comes back
///   when its lease ends, and a commit it meant to make is not counted. To count every purchase
///   across the switch, stop sending requests to the previous release (and let its requests
///   finish) before the first instance of this release starts.
/// - Do not start an instance of the previous release after that moment (a rollback, a
///   restart): it loads its library again and would read budgets this release wrote as
///   unspent. Roll back only with every instance of this release stopped and the keys under the
///   store's prefix deleted.
/// - A layer with `fail_open(true)` treats these errors as an outage: on a fenced instance (or
///   on a key in no known layout) it lets requests that claim only budgets through unreserved.
///   Turn it off for the deploy where that matters.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    /// A connection outside the batches, for `advance_clock` (feature `test-clock`) alone.
    #[cfg_attr(not(feature = "test-clock"), allow(dead_code))]
    conn: Conn,
    keys: Keys,
    config: Config,
    counters: Arc<Counters>,
}

/// Where operations go: the one node's worker, or the worker of the node that serves each slot.
enum Engine {
    Node(Batcher),
    Cluster(Box<Router>),
}

#[derive(Debug, Clone)]
struct Config {
    retain_ms: u64,
    limits: Limits,
    allow_eviction: bool,
    clock: Clock,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix())
            .finish_non_exhaustive()
    }
}

/// Configures and connects a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    prefix: String,
    config: Config,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: "reserve".to_owned(),
            config: Config {
                retain_ms: DEFAULT_RETAIN.as_millis() as u64,
                limits: Limits::default(),
                allow_eviction: false,
                clock: Clock::default(),
            },
        }
    }
}

/// How many calls of its function a [`RedisStore`] has made and how many operations they carried: the
/// ratio is the batch size seen. See [`RedisStore::batch_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Calls of the store's function sent.
    pub calls: u64,
    /// Operations they carried.
    pub ops: u64,
}

impl RedisStoreBuilder {
    /// The prefix of every key this store writes (default `reserve`). Stores with different
    /// prefixes on one Redis do not see each other.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long settled records and tombstones are kept by default (default [`DEFAULT_RETAIN`]).
    pub fn retain(mut self, retain: Duration) -> Self {
        self.config.retain_ms = retain.as_millis().max(1) as u64;
        self
    }

    /// The time limit of one store call, connection included (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.limits.timeout = timeout;
        self
    }

    /// After every call that commits, waits (Redis `WAIT`) until `replicas` replicas
    /// have acknowledged it, or `timeout` has passed.
    ///
    /// Without it a commit is acknowledged by the primary alone: if the primary dies before it
    /// replicates, a promoted replica may not have it, and the spent amount it added is lost
    /// (the budget grants that much again). With it a commit costs a replication round trip
    /// more (one per batch, not per commit), and still only narrows the window: Redis
    /// replication stays asynchronous, and a `WAIT` that times out is logged, not undone (the
    /// primary has already applied the commit).
    pub fn wait_for_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.config.limits.wait_for = Some((replicas, timeout));
        self
    }

    /// Accepts a Redis whose `maxmemory-policy` may evict keys (default: refuse to connect).
    ///
    /// Under memory pressure such a Redis may evict the in-flight marker of a unique value (then
    /// two owners can take it) or a windowed budget's hash (then its spent amount is forgotten and
    /// granted again). Only `noeviction` keeps every guarantee of this crate; with it, Redis
    /// refuses writes when full, and the store answers [`ErrorKind::Unavailable`].
    pub fn allow_eviction(mut self, yes: bool) -> Self {
        self.config.allow_eviction = yes;
        self
    }

    /// The most operations one call carries (default 128); `1` turns batching off.
    pub fn max_batch(mut self, ops: usize) -> Self {
        self.config.limits.max_ops = ops.max(1);
        self
    }

    /// Gives the store a clock that the test moves with [`RedisStore::advance_clock`] (feature
    /// `test-clock`, for tests and simulation only). The store then loads a library of its own,
    /// which adds the clock's shift to the server's `TIME`; the store's own library has no way
    /// to be shifted.
    #[cfg(feature = "test-clock")]
    pub fn test_clock(mut self) -> Self {
        self.config.clock = crate::store::clock::Clock::test();
        self
    }

    fn call_args(&self) -> CallArgs {
        CallArgs {
            retain_ms: self.config.retain_ms,
            // Longer than the store tries one call again (`RedisStore::settle_record`), and at
            // most a day (a time limit too long to count in is no limit).
            answer_ms: self
                .config
                .limits
                .timeout
                .saturating_mul(SETTLE_TRIES + 1)
                .saturating_add(Duration::from_secs(1))
                .min(Duration::from_secs(86_400))
                .as_millis() as u64,
            clock: self.config.clock.clone(),
        }
    }

    fn check_prefix(&self) -> Result<(), Error> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(Error::invalid(
                "a key prefix must be non-empty, without braces",
            ));
        }
        Ok(())
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port/` each) and checks
    /// every primary, failing fast when one does not answer.
    ///
    /// A reservation whose claims fall on several slots is reserved one slot group at a time;
    /// see the [crate docs](crate#redis-cluster) for what a reader may observe in between.
    pub async fn connect_cluster<I, U>(self, urls: I) -> Result<RedisStore, Error>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        self.check_prefix()?;
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        if urls.is_empty() {
            return Err(Error::invalid("a cluster needs at least one seed node"));
        }
        let timeout = self.config.limits.timeout;
        let client = |retries: u32| {
            redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(retries)
                .build()
                .map_err(|e| {
                    Error::invalid(format!("redis cluster urls {urls:?}: {e}")).with_source(e)
                })
        };
        // Batches go over a connection of their own that follows no redirect: a batch that
        // redis-rs followed to an importing node under `ASKING` would find there every key of
        // the slot that has not moved yet as absent. A redirected batch has run nothing, and the
        // router sends its operations again once the slot has settled.
        let (client, batch_client) = (client(2)?, client(0)?);
        let counters = Arc::new(Counters::default());
        let router = with_timeout(timeout, async {
            let conn = Conn::Cluster(client.get_async_connection().await?);
            let batch_conn = Conn::Cluster(batch_client.get_async_connection().await?);
            let router = Router::connect(
                batch_conn,
                self.config.limits,
                counters.clone(),
                self.call_args(),
            )
            .await?;
            for node in router.nodes() {
                check_server(&conn, &node, self.config.allow_eviction).await?;
            }
            conn.load_library(&self.config.clock).await?;
            Ok((router, conn))
        })
        .await?;
        let (router, conn) = router;
        Ok(self.build(Engine::Cluster(Box::new(router)), conn, counters))
    }

    /// Connects to one Redis node and checks it, failing fast when it does not answer.
    pub async fn connect(self, url: &str) -> Result<RedisStore, Error> {
        self.check_prefix()?;
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid(format!("redis url {url:?}: {e}")).with_source(e))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.limits.timeout))
            .set_response_timeout(Some(self.config.limits.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let timeout = self.config.limits.timeout;
        let conn = with_timeout(timeout, async {
            let conn = Conn::Node(ConnectionManager::new_with_config(client, manager).await?);
            check_server(&conn, url, self.config.allow_eviction).await?;
            conn.load_library(&self.config.clock).await?;
            Ok(conn)
        })
        .await?;
        let counters = Arc::new(Counters::default());
        let batcher = Batcher::spawn(
            conn.clone(),
            self.config.limits,
            counters.clone(),
            self.call_args(),
        );
        Ok(self.build(Engine::Node(batcher), conn, counters))
    }

    fn build(self, engine: Engine, conn: Conn, counters: Arc<Counters>) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                engine,
                conn,
                keys: Keys::new(self.prefix),
                config: self.config,
                counters,
            }),
        }
    }
}

/// `call` within `limit`, else unavailable. A combinator on the timeout, not an `async fn`: a
/// level of `async fn` would keep a copy of `call`'s arguments in every call's future.
fn with_timeout<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, Error>>,
) -> impl Future<Output = Result<T, Error>> {
    futures_util::FutureExt::map(tokio::time::timeout(limit, call), move |answer| {
        answer.unwrap_or_else(|_| Err(timed_out(limit)))
    })
}

/// What a call that ran out of its time `limit` answers.
fn timed_out(limit: Duration) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("redis did not answer within {limit:?}"),
    )
}

impl RedisStore {
    /// A builder with the defaults.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to one Redis node with the defaults.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::builder().connect(url).await
    }

    /// Connects to a Redis Cluster with the defaults.
    pub async fn connect_cluster<I, U>(urls: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        Self::builder().connect_cluster(urls).await
    }

    /// How many calls this store (and its clones) has sent, and how many operations they
    /// carried.
    pub fn batch_stats(&self) -> BatchStats {
        BatchStats {
            calls: self.inner.counters.calls.load(Ordering::Relaxed),
            ops: self.inner.counters.ops.load(Ordering::Relaxed),
        }
    }

    /// Moves a test clock ahead (see [`RedisStoreBuilder::test_clock`]): the store's function
    /// sees `by` more on its clock, and every key of this store's prefix that expires has its
    /// expiry brought `by` nearer (those it passes go at once), so that leases, retentions and
    /// windows pass as they would have. On a store with the system's clock it changes nothing.
    /// Meant for a quiet moment between a test's steps: an operation that runs meanwhile may
    /// see the new clock with the old expiries.
    #[cfg(feature = "test-clock")]
    pub async fn advance_clock(&self, by: Duration) -> Result<(), Error> {
        if !self.inner.config.clock.is_test() {
            return Ok(());
        }
        self.inner.config.clock.advance(by);
        let mut shorten = redis::cmd("EVAL");
        shorten
            .arg(SHORTEN_EXPIRIES)
            .arg(0)
            .arg(format!("{}:*", self.keys().prefix()))
            .arg(by.as_millis() as u64);
        let conn = &self.inner.conn;
        match &self.inner.engine {
            Engine::Node(_) => conn.query::<Value>(&shorten).await?,
            Engine::Cluster(router) => {
                for node in router.nodes() {
                    conn.query_node::<Value>(&node, shorten.clone()).await?;
                }
                Value::Nil
            }
        };
        Ok(())
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn retain_ms(&self) -> u64 {
        self.inner.config.retain_ms
    }

    /// Sends one operation with the next call to its node, within the store's time limit.
    async fn call(&self, op: Op, commits: bool) -> Result<Bytes, Error> {
        match &self.inner.engine {
            // The node's worker keeps the time limit (see `batch`).
            Engine::Node(batcher) => batcher.call(op, commits).await,
            // Boxed: a Cluster's call (routing, redirections) is several times the size of a
            // node's, and every store call's future would otherwise carry its room. Its
            // redirections are under the time limit too, not only each node's call.
            Engine::Cluster(router) => {
                let limit = self.inner.config.limits.timeout;
                with_timeout(limit, Box::pin(router.call(op, commits))).await
            }
        }
    }

    /// Sends an operation that carries its call's nonce, again while its answer is lost: the
    /// same call is answered as it was, never run twice.
    async fn call_again_if_lost(&self, op: Op, commits: bool) -> Result<Bytes, Error> {
        let mut tries = 1;
        loop {
            match self.call(op.clone(), commits).await {
                Err(err) if err.is_unavailable() && tries < SETTLE_TRIES => {
                    tokio::time::sleep(Duration::from_millis(50 * tries as u64)).await;
                    tries += 1;
                }
                answer => return answer,
            }
        }
    }

    /// Gives back, in a task of its own, whatever reserve calls whose answers were lost may have
    /// held under `records` (each call's nonce), and leaves tombstones that refuse those calls
    /// should they still arrive: the id may be reserved again at once. Tried a few times, then
    /// left to the leases.
    fn abandon(&self, id: &HoldId, records: Vec<String>, nonce: Nonce) {
        let (store, id) = (self.clone(), id.clone());
        let give_back = async move {
            let mut left = records;
            for attempt in 0..ABANDON_TRIES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                left = store.forget_all(&id, left, &nonce, false).await;
                if left.is_empty() {
                    return;
                }
            }
            tracing::warn!(hold = %id, records = ?left, "could not give back a reserve whose answer was lost; its lease will");
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(give_back);
        }
    }

    /// Forgets what the reserve call `nonce` of hold `id` held under each of `records`; answers
    /// the records that could not be reached. `again_if_lost`: each forget is sent again while
    /// its answer is lost, as a settlement is (it carries the nonce: one that landed is not
    /// undone).
    ///
    /// The hold's own record goes first, and decides: when it is no longer that call's alone (a
    /// retry was answered for the hold, as a replay), it is left alone, and so are its slot
    /// groups, which hold for it. While the record cannot be reached, neither can that be told,
    /// so the groups wait with it (their leases return them at worst). Then the groups go, at
    /// once.
    async fn forget_all(
        &self,
        id: &HoldId,
        records: Vec<String>,
        nonce: &Nonce,
        again_if_lost: bool,
    ) -> Vec<String> {
        let forget = |record: String| {
            let op = ops::forget(record, nonce);
            async move {
                if again_if_lost {
                    self.call_again_if_lost(op, false).await
                } else {
                    self.call(op, false).await
                }
            }
        };
        let (own, groups): (Vec<String>, Vec<String>) = records
            .into_iter()
            .partition(|record| !self.keys().is_group(record));
        for record in &own {
            match forget(record.clone()).await {
                Err(err) if err.is_unavailable() => return own.into_iter().chain(groups).collect(),
                Ok(answer) if ops::forgot(&answer, id).unwrap_or(false) => {
                    return Vec::new();
                }
                _ => {}
            }
        }
        let answers = futures_util::future::join_all(groups.iter().cloned().map(forget)).await;
        groups
            .into_iter()
            .zip(answers)
            .filter(|(_, answer)| answer.as_ref().is_err_and(Error::is_unavailable))
            .map(|(record, _)| record)
            .collect()
    }

    /// Settles one record, trying again (the same call, with its nonce) while its answer is lost:
    /// a call that landed is answered as it was, even when it forgot the record.
    async fn settle_record(
        &self,
        record: &str,
        id: &HoldId,
        settlement: &Settlement,
        args: ops::SettleArgs,
    ) -> Result<ops::SettleAnswer, Error> {
        let op = ops::settle(self.keys(), record.to_owned(), settlement, args);
        let answer = self.call_again_if_lost(op, settlement.is_commit()).await?;
        ops::settled(&answer, id)
    }

    /// The plan of a reservation on a Cluster whose claims do not all share its id's slot.
    fn across_slots(&self, r: &Reservation) -> Option<cluster::Plan> {
        let Engine::Cluster(_) = self.inner.engine else {
            return None;
        };
        let plan = cluster::plan(self, r);
        (!plan.groups.is_empty()).then_some(plan)
    }
}

/// How many times the store sends a settlement (or another call that carries its nonce) whose
/// answer was lost.
const SETTLE_TRIES: u32 = 3;

/// How many times the store tries to give back a reserve whose answer was lost.
const ABANDON_TRIES: u32 = 5;

/// Brings every expiry of the keys matching ARGV[1] on this node ARGV[2] ms nearer; those it
/// passes go at once. A key in the last millisecond of its life answers PTTL 0 (-1: none, -2:
/// gone), and Redis still serves it until that millisecond is over: the jump passes it too.
#[cfg(feature = "test-clock")]
const SHORTEN_EXPIRIES: &str = r#"#!lua flags=allow-cross-slot-keys
local cursor, by = '0', tonumber(ARGV[2])
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    local ttl = redis.call('PTTL', key)
    if ttl >= 0 then
      if ttl <= by then redis.call('DEL', key) else redis.call('PEXPIRE', key, ttl - by) end
    end
  end
until cursor == '0'
return 0
"#;

impl Store for RedisStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        if let Some(plan) = self.across_slots(reservation) {
            // Boxed, as every path a Cluster takes across slots: a rare path, whose state would
            // otherwise make every call's future larger.
            return Box::pin(cluster::reserve(self, reservation, plan)).await;
        }
        let all: Vec<usize> = (0..reservation.claims().len()).collect();
        let nonce: Nonce = rand::random();
        let op = ops::reserve(
            self.keys(),
            reservation,
            &ReserveArgs {
                record: self.keys().record(reservation.id()),
                mode: Mode::Home,
                groups: &[],
                claims: &all,
                lease_ms: reservation.lease().as_millis() as u64,
                nonce: &nonce,
            },
        );
        let answer = match self.call(op, false).await {
            Ok(answer) => answer,
            Err(err) => {
                if err.is_unavailable() {
                    self.abandon(
                        reservation.id(),
                        vec![self.keys().record(reservation.id())],
                        nonce,
                    );
                }
                return Err(err);
            }
        };
        ops::reserved(&answer, reservation, &all)
    }

    async fn check(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        if let Some(plan) = self.across_slots(reservation) {
            return Box::pin(cluster::check(self, reservation, plan)).await;
        }
        let all: Vec<usize> = (0..reservation.claims().len()).collect();
        let op = ops::check(
            self.keys(),
            reservation,
            self.keys().record(reservation.id()),
            &all,
        );
        let answer = self.call(op, false).await?;
        ops::reserved(&answer, reservation, &all)
    }

    async fn settle(&self, id: &HoldId, settlement: &Settlement) -> Result<Settled, Error> {
        settlement.validate()?;
        let keep_ms = settlement
            .retain_for(Duration::from_millis(self.retain_ms()))
            .map_or(0, |d| d.as_millis().max(1) as u64);
        let record = self.keys().record(id);
        let mut args = ops::SettleArgs {
            keep_ms,
            strict: true,
            prepared: ops::Prepared::No,
            nonce: rand::random(),
        };
        let mut home = self.settle_record(&record, id, settlement, args).await?;
        if home.prepare {
            // A home with groups commits only once every group is sure to outlive the commit;
            // if one has ended, the commit expires (and the groups are released).
            args.prepared = if Box::pin(cluster::prepare_groups(self, id, &home.groups)).await? {
                ops::Prepared::Yes
            } else {
                ops::Prepared::GroupEnded
            };
            home = self.settle_record(&record, id, settlement, args).await?;
        }
        if home.groups.is_empty() {
            return home.result;
        }
        let result = Box::pin(cluster::settle_groups(self, id, settlement, home)).await?;
        if keep_ms == 0 {
            // Every group followed: the home, kept for them, goes as the settlement asked.
            args.prepared = ops::Prepared::GroupsFollowed;
            args.nonce = rand::random();
            self.settle_record(&record, id, settlement, args).await?;
        }
        Ok(result)
    }

    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        crate::reservation::check_lease(lease)?;
        let op = ops::extend(self.keys().record(id), lease.as_millis() as u64, false);
        let answer = self.call(op, false).await?;
        let (until, groups) = ops::extended(&answer, id)?;
        if !groups.is_empty() {
            cluster::extend_groups(self, id, lease, &groups).await?;
        }
        Ok(until)
    }

    async fn refund(&self, refund: &Refund) -> Result<Settled, Error> {
        refund.validate()?;
        let answer = self.call(ops::refund(self.keys(), refund), false).await?;
        ops::refunded(&answer, refund.id())
    }

    async fn budget(&self, budget: &Budget) -> Result<BudgetStatus, Error> {
        budget.validate()?;
        let answer = self.call(ops::budget(self.keys(), budget), false).await?;
        ops::budget_status(&answer, budget)
    }

    async fn set_spent(&self, budget: &Budget, spent: u64) -> Result<(), Error> {
        check_set_spent(budget, spent)?;
        let nonce: Nonce = rand::random();
        let answer = self
            .call_again_if_lost(ops::set_spent(self.keys(), budget, spent, &nonce), false)
            .await?;
        ops::ok(&answer, &HoldId::random())
    }

    // Reads and removals go through the same batches as everything else: a read sent after a
    // commit sees it.
    async fn owner(&self, value: &Unique) -> Result<Option<String>, Error> {
        value.validate()?;
        let answer = self.call(ops::owner(self.keys(), value), false).await?;
        ops::owned_by(&answer)
    }

    async fn remove(&self, value: &Unique) -> Result<bool, Error> {
        value.validate()?;
        let nonce: Nonce = rand::random();
        let answer = self
            .call_again_if_lost(ops::remove(self.keys(), value, &nonce), false)
            .await?;
        ops::removed(&answer)
    }
}
