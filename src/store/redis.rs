//! The Redis store: one Lua script call per reservation and per settlement.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, FromRedisValue, Script, ScriptInvocation, Value};

use super::{DEFAULT_RETAIN, MAX_EXPIRED_PER_CALL, Store, check_set_spent};
use crate::reservation::{Denial, DenialReason, Grant};
use crate::{
    Budget, BudgetStatus, Claim, Error, ErrorKind, HoldId, Reservation, Reserved, Settled, Unique,
};

/// The scripts, each the shared prelude followed by its own body; built once per process so
/// their SHA1 is computed once. `Script` sends EVALSHA and loads the script on NOSCRIPT (after a
/// restart, a failover or `SCRIPT FLUSH`), so the cache on the server needs no care.
struct Scripts {
    reserve: Script,
    commit: Script,
    release: Script,
    extend: Script,
    budget: Script,
    set_spent: Script,
    manifest: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/common.lua"),
            "\n",
            include_str!(concat!("lua/", $file))
        ))
    };
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: script!("reserve.lua"),
    commit: script!("commit.lua"),
    release: script!("release.lua"),
    extend: script!("extend.lua"),
    budget: script!("budget.lua"),
    set_spent: script!("set_spent.lua"),
    manifest: script!("manifest.lua"),
});

/// A [`Store`] on Redis, shared by every process that uses the same Redis and key prefix.
///
/// Every reservation is one `EVALSHA` of a Lua script that checks all claims and holds them
/// atomically; commit, release and extend are one call each. Connections are multiplexed and
/// re-established after Redis restarts (redis-rs's `ConnectionManager`). Each call is bounded
/// by a timeout; past it the call fails as [`ErrorKind::Unavailable`] and whatever it may have
/// held ends with its lease.
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
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    config: Arc<Config>,
}

/// One node through a reconnecting multiplexed connection, or a Cluster through redis-rs's
/// cluster client (which follows MOVED/ASK and reloads its slot map after a failover).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Node(c) => invocation.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// `WAIT` on the primary that holds `key`.
    async fn wait(&self, key: &str, replicas: usize, timeout: Duration) -> redis::RedisResult<i64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        match self {
            Conn::Node(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let reply = c.clone().route_command(cmd, route).await?;
                Ok(redis::from_redis_value(reply)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Config {
    prefix: String,
    retain_ms: u64,
    timeout: Duration,
    wait_for: Option<(usize, Duration)>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

/// Configures and connects a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    config: Config,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                prefix: "reserve".to_owned(),
                retain_ms: DEFAULT_RETAIN.as_millis() as u64,
                timeout: Duration::from_secs(2),
                wait_for: None,
            },
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key this store writes (default `reserve`). Stores with different
    /// prefixes on one Redis do not see each other.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// How long settled records and tombstones are kept (default [`DEFAULT_RETAIN`]).
    pub fn retain(mut self, retain: Duration) -> Self {
        self.config.retain_ms = retain.as_millis().max(1) as u64;
        self
    }

    /// The time limit of one store call, connection included (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// After every commit, waits (Redis `WAIT`) until `replicas` replicas have acknowledged it,
    /// or `timeout` has passed.
    ///
    /// Without it a commit is acknowledged by the primary alone: if the primary dies before it
    /// replicates, a promoted replica may not have it, and the spent amount it added is lost
    /// (the budget grants that much again). With it a commit costs a replication round trip
    /// more, and still only narrows the window: Redis replication stays asynchronous, and a
    /// `WAIT` that times out is logged, not undone (the primary has already applied the commit).
    pub fn wait_for_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.config.wait_for = Some((replicas, timeout));
        self
    }

    fn check_prefix(&self) -> Result<(), Error> {
        let prefix = &self.config.prefix;
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(Error::invalid(
                "a key prefix must be non-empty, without braces",
            ));
        }
        Ok(())
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port/` each) and checks
    /// that it answers, failing fast when it does not.
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
        let timeout = self.config.timeout;
        let client = redis::cluster::ClusterClient::builder(urls.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()
            .map_err(|e| {
                Error::invalid(format!("redis cluster urls {urls:?}: {e}")).with_source(e)
            })?;
        let conn =
            with_timeout(timeout, async { Ok(client.get_async_connection().await?) }).await?;
        self.ready(Conn::Cluster(conn)).await
    }

    /// Connects to one Redis node and checks that it answers, failing fast when it does not.
    pub async fn connect(self, url: &str) -> Result<RedisStore, Error> {
        self.check_prefix()?;
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid(format!("redis url {url:?}: {e}")).with_source(e))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let timeout = self.config.timeout;
        let conn = with_timeout(timeout, async {
            Ok(ConnectionManager::new_with_config(client, manager).await?)
        })
        .await?;
        self.ready(Conn::Node(conn)).await
    }

    /// Checks that the store answers before handing it out, so that a misconfigured service
    /// fails at start-up rather than on its first request.
    async fn ready(self, conn: Conn) -> Result<RedisStore, Error> {
        with_timeout(self.config.timeout, async {
            Ok(conn.query::<String>(&redis::cmd("PING")).await?)
        })
        .await?;
        Ok(RedisStore {
            conn,
            config: Arc::new(self.config),
        })
    }
}

async fn with_timeout<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("redis did not answer within {limit:?}"),
        )),
    }
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

    /// The hold record of a single-node reservation; on a Cluster, the manifest of its groups.
    fn record_key(&self, id: &HoldId) -> String {
        format!("{}:h:{{{}}}", self.config.prefix, id)
    }

    /// The hold record of one slot group, in the slot of the group's hash tag.
    fn group_record_key(&self, tag: &str, id: &HoldId) -> String {
        format!("{}:h:{{{}}}:{}", self.config.prefix, tag, id)
    }

    fn budget_key(&self, budget: &Budget) -> String {
        format!("{}:b:{{{}}}", self.config.prefix, budget.key())
    }

    fn unique_key(&self, value: &Unique) -> String {
        format!("{}:u:{{{}}}", self.config.prefix, unique_tag(value))
    }

    async fn invoke(&self, invocation: ScriptInvocation<'_>) -> Result<Vec<Value>, Error> {
        with_timeout(self.config.timeout, async move {
            Ok(self.conn.invoke(&invocation).await?)
        })
        .await
    }

    /// Reserves the claims at `indices` under one record: all of them on one node, or one slot
    /// group on a Cluster. Denial indices and remaining amounts are mapped back to the
    /// reservation's own order.
    async fn reserve_group(
        &self,
        reservation: &Reservation,
        record: String,
        indices: &[usize],
    ) -> Result<Reserved, Error> {
        let id = reservation.id();
        let mut invocation = SCRIPTS.reserve.prepare_invoke();
        invocation
            .key(record)
            .arg(id.as_str())
            .arg(reservation.lease().as_millis() as u64)
            .arg(self.config.retain_ms)
            .arg(&reservation.fingerprint()[..])
            .arg(MAX_EXPIRED_PER_CALL);
        for &i in indices {
            match &reservation.claims()[i] {
                Claim::Spend { budget, amount } => {
                    invocation
                        .key(self.budget_key(budget))
                        .arg("b")
                        .arg(*amount)
                        .arg(budget.limit())
                        .arg(budget.window().spec().as_ref());
                }
                claim @ (Claim::Own { value, owner } | Claim::ReleaseOnCommit { value, owner }) => {
                    let kind = if matches!(claim, Claim::Own { .. }) {
                        "u"
                    } else {
                        "r"
                    };
                    invocation
                        .key(self.unique_key(value))
                        .arg(kind)
                        .arg(owner.as_str())
                        .arg("")
                        .arg("");
                }
            }
        }
        let reply = self.invoke(invocation).await?;
        match word(&reply, 0)? {
            "G" => {
                if reply.len() != 3 + indices.len() {
                    return Err(protocol("claim count"));
                }
                let mut remaining = vec![None; reservation.claims().len()];
                for (at, &i) in indices.iter().enumerate() {
                    remaining[i] = u64::try_from(int(&reply, 3 + at)?).ok();
                }
                Ok(Reserved::Granted(Grant {
                    id: id.clone(),
                    expires_at_ms: int(&reply, 1)? as u64,
                    remaining,
                    replayed: int(&reply, 2)? == 1,
                }))
            }
            "D" => {
                let claim = *usize::try_from(int(&reply, 1)? - 1)
                    .ok()
                    .and_then(|at| indices.get(at))
                    .ok_or_else(|| protocol("denied claim index"))?;
                let reason = match word(&reply, 2)? {
                    "budget" => {
                        let Claim::Spend { amount, .. } = &reservation.claims()[claim] else {
                            return Err(protocol("denied claim kind"));
                        };
                        DenialReason::OverBudget {
                            requested: *amount,
                            remaining: int(&reply, 3)? as u64,
                        }
                    }
                    "taken" => DenialReason::Taken,
                    "not_owner" => DenialReason::NotOwner,
                    other => return Err(protocol(other)),
                };
                Ok(Reserved::Denied(Denial { claim, reason }))
            }
            _ => Err(refusal(&reply, id)),
        }
    }

    /// Runs commit or release (optionally `forget`) on one hold record.
    async fn settle_record(
        &self,
        script: &Script,
        record: String,
        id: &HoldId,
        forget: bool,
    ) -> Result<Settled, Error> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(record)
            .arg(id.as_str())
            .arg(self.config.retain_ms);
        if forget {
            invocation.arg("forget");
        }
        let reply = self.invoke(invocation).await?;
        match word(&reply, 0)? {
            "OK" => match word(&reply, 1)? {
                "applied" => Ok(Settled::Applied),
                "replayed" => Ok(Settled::Replayed),
                "tombstoned" => Ok(Settled::Tombstoned),
                other => Err(protocol(other)),
            },
            _ => Err(refusal(&reply, id)),
        }
    }

    async fn extend_record(
        &self,
        record: String,
        id: &HoldId,
        lease: Duration,
    ) -> Result<u64, Error> {
        let mut invocation = SCRIPTS.extend.prepare_invoke();
        invocation
            .key(record)
            .arg(id.as_str())
            .arg(lease.as_millis() as u64)
            .arg(self.config.retain_ms);
        let reply = self.invoke(invocation).await?;
        match word(&reply, 0)? {
            "OK" => Ok(int(&reply, 1)? as u64),
            _ => Err(refusal(&reply, id)),
        }
    }

    async fn manifest<A: AsRef<[u8]>>(&self, id: &HoldId, args: &[A]) -> Result<Vec<Value>, Error> {
        let mut invocation = SCRIPTS.manifest.prepare_invoke();
        invocation.key(self.record_key(id));
        for arg in args {
            invocation.arg(arg.as_ref());
        }
        self.invoke(invocation).await
    }

    async fn wait_for_replicas(&self, record: &str) {
        let Some((replicas, timeout)) = self.config.wait_for else {
            return;
        };
        let acked = with_timeout(timeout + self.config.timeout, async {
            Ok(self.conn.wait(record, replicas, timeout).await?)
        })
        .await;
        match acked {
            Ok(n) if n as usize >= replicas => {}
            Ok(n) => tracing::warn!(
                record,
                acked = n,
                wanted = replicas,
                "commit not yet on enough replicas"
            ),
            Err(err) => tracing::warn!(record, error = %err, "WAIT for replicas failed"),
        }
    }

    /// The slot groups of a reservation on a Cluster: the claims that share a slot, each with
    /// its record key, in the order their first claim appears.
    fn groups(&self, reservation: &Reservation) -> Vec<(String, Vec<usize>)> {
        let mut groups: Vec<(Slot, String, Vec<usize>)> = Vec::new();
        for (i, claim) in reservation.claims().iter().enumerate() {
            let tag = match claim {
                Claim::Spend { budget, .. } => budget.key().to_owned(),
                Claim::Own { value, .. } | Claim::ReleaseOnCommit { value, .. } => {
                    unique_tag(value)
                }
            };
            let slot = Slot::for_key(tag.as_bytes());
            match groups.iter_mut().find(|(s, _, _)| *s == slot) {
                Some((_, _, indices)) => indices.push(i),
                None => groups.push((slot, self.group_record_key(&tag, reservation.id()), vec![i])),
            }
        }
        groups
            .into_iter()
            .map(|(_, record, indices)| (record, indices))
            .collect()
    }

    async fn reserve_cluster(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        let id = reservation.id();
        let groups = self.groups(reservation);
        let lease = (reservation.lease().as_millis() as u64).to_string();
        let retain = self.config.retain_ms.to_string();
        let mut args: Vec<&[u8]> = vec![
            b"open",
            &reservation.fingerprint()[..],
            lease.as_bytes(),
            retain.as_bytes(),
        ];
        args.extend(groups.iter().map(|(record, _)| record.as_bytes()));
        let opened = self.manifest(id, &args).await?;
        let mut expires_at_ms = match word(&opened, 0)? {
            "new" => int(&opened, 1)? as u64,
            _ => {
                let state = Manifest::parse(&opened)?;
                if state.phase != "T" && !state.same_claims {
                    return Err(Error::refused(ErrorKind::Conflict, id));
                }
                match state.phase {
                    "H" if state.expired => return Err(Error::refused(ErrorKind::Expired, id)),
                    // A retry of a live reservation: every group answers its hold again.
                    "H" => state.expires_at_ms,
                    "C" => return Err(Error::refused(ErrorKind::Committed, id)),
                    "X" => return Err(Error::refused(ErrorKind::Expired, id)),
                    _ => return Err(Error::refused(ErrorKind::Released, id)),
                }
            }
        };
        let mut remaining = vec![None; reservation.claims().len()];
        let mut replayed = true;
        let mut held: Vec<&String> = Vec::new();
        for (record, indices) in &groups {
            let answer = self
                .reserve_group(reservation, record.clone(), indices)
                .await;
            let failed = match answer {
                Ok(Reserved::Granted(grant)) => {
                    for &i in indices {
                        remaining[i] = grant.remaining[i];
                    }
                    replayed &= grant.replayed;
                    expires_at_ms = expires_at_ms.min(grant.expires_at_ms);
                    held.push(record);
                    continue;
                }
                other => other,
            };
            // All or nothing: give back the groups already held, and leave no trace of a
            // denied reservation so that it may be retried.
            for record in held {
                let _ = self
                    .settle_record(&SCRIPTS.release, record.clone(), id, true)
                    .await;
            }
            if matches!(failed, Ok(Reserved::Denied(_))) {
                let _ = self.manifest(id, &["forget"]).await;
            }
            return failed;
        }
        Ok(Reserved::Granted(Grant {
            id: id.clone(),
            expires_at_ms,
            remaining,
            replayed,
        }))
    }

    /// Commit or release on a Cluster: fan out to every group, then record the outcome.
    async fn settle_cluster(&self, id: &HoldId, commit: bool) -> Result<Settled, Error> {
        let reply = self.manifest(id, &["get"]).await?;
        let retain = self.config.retain_ms.to_string();
        if word(&reply, 0)? == "none" {
            if commit {
                return Err(Error::refused(ErrorKind::UnknownHold, id));
            }
            self.manifest(id, &["mark", "R", &retain]).await?;
            return Ok(Settled::Tombstoned);
        }
        let state = Manifest::parse(&reply)?;
        match (state.phase, commit) {
            ("C", true) => return Ok(Settled::Replayed),
            ("C", false) => return Err(Error::refused(ErrorKind::Committed, id)),
            ("R" | "T", true) => return Err(Error::refused(ErrorKind::Released, id)),
            ("X", true) => return Err(Error::refused(ErrorKind::Expired, id)),
            ("R" | "T" | "X", false) => return Ok(Settled::Replayed),
            _ => {}
        }
        let commit_now = commit && !state.expired;
        let script = if commit_now {
            &SCRIPTS.commit
        } else {
            &SCRIPTS.release
        };
        let mut first_error = None;
        for record in &state.groups {
            match self.settle_record(script, record.clone(), id, false).await {
                Ok(_) if commit_now => self.wait_for_replicas(record).await,
                Ok(_) => {}
                Err(err) if err.is_unavailable() => return Err(err),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let (phase, answer) = if commit_now {
            match first_error {
                None => ("C", Ok(Settled::Applied)),
                Some(err) => ("X", Err(err)),
            }
        } else if commit {
            // The lease ran out: the groups were released above, and the commit is refused.
            ("X", Err(Error::refused(ErrorKind::Expired, id)))
        } else {
            ("R", Ok(Settled::Applied))
        };
        self.manifest(id, &["mark", phase, &retain]).await?;
        answer
    }
}

/// A manifest as `manifest.lua` describes it.
struct Manifest<'a> {
    phase: &'a str,
    same_claims: bool,
    expires_at_ms: u64,
    expired: bool,
    groups: Vec<String>,
}

impl<'a> Manifest<'a> {
    fn parse(reply: &'a [Value]) -> Result<Self, Error> {
        Ok(Self {
            phase: word(reply, 1)?,
            same_claims: int(reply, 2)? == 1,
            expires_at_ms: int(reply, 3)? as u64,
            expired: int(reply, 4)? == 1,
            groups: (5..reply.len())
                .map(|at| word(reply, at).map(str::to_owned))
                .collect::<Result<_, _>>()?,
        })
    }
}

fn unique_tag(value: &Unique) -> String {
    format!("{}:{}", value.namespace(), value.digest_hex())
}

fn protocol(what: &str) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("unexpected reply from a tower-reserve script: {what}"),
    )
}

fn word(reply: &[Value], at: usize) -> Result<&str, Error> {
    match reply.get(at) {
        Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).map_err(|_| protocol("utf-8")),
        Some(Value::SimpleString(s)) => Ok(s),
        other => Err(protocol(&format!("{other:?}"))),
    }
}

fn int(reply: &[Value], at: usize) -> Result<i64, Error> {
    match reply.get(at) {
        Some(Value::Int(i)) => Ok(*i),
        other => Err(protocol(&format!("{other:?}"))),
    }
}

/// Turns an `{'E', why}` reply into its typed error.
fn refusal(reply: &[Value], id: &HoldId) -> Error {
    let kind = match word(reply, 1) {
        Ok("conflict") => ErrorKind::Conflict,
        Ok("unknown") => ErrorKind::UnknownHold,
        Ok("expired") => ErrorKind::Expired,
        Ok("committed") => ErrorKind::Committed,
        Ok("released") => ErrorKind::Released,
        Ok(other) => return protocol(other),
        Err(e) => return e,
    };
    Error::refused(kind, id)
}

impl Store for RedisStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        match self.conn {
            Conn::Node(_) => {
                let all: Vec<usize> = (0..reservation.claims().len()).collect();
                self.reserve_group(reservation, self.record_key(reservation.id()), &all)
                    .await
            }
            Conn::Cluster(_) => self.reserve_cluster(reservation).await,
        }
    }

    async fn commit(&self, id: &HoldId) -> Result<Settled, Error> {
        match self.conn {
            Conn::Node(_) => {
                let record = self.record_key(id);
                let settled = self
                    .settle_record(&SCRIPTS.commit, record.clone(), id, false)
                    .await?;
                self.wait_for_replicas(&record).await;
                Ok(settled)
            }
            Conn::Cluster(_) => self.settle_cluster(id, true).await,
        }
    }

    async fn release(&self, id: &HoldId) -> Result<Settled, Error> {
        match self.conn {
            Conn::Node(_) => {
                self.settle_record(&SCRIPTS.release, self.record_key(id), id, false)
                    .await
            }
            Conn::Cluster(_) => self.settle_cluster(id, false).await,
        }
    }

    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        crate::reservation::check_lease(lease)?;
        if let Conn::Node(_) = self.conn {
            return self.extend_record(self.record_key(id), id, lease).await;
        }
        let reply = self.manifest(id, &["get"]).await?;
        if word(&reply, 0)? == "none" {
            return Err(Error::refused(ErrorKind::UnknownHold, id));
        }
        let state = Manifest::parse(&reply)?;
        match state.phase {
            "C" => return Err(Error::refused(ErrorKind::Committed, id)),
            "R" | "T" => return Err(Error::refused(ErrorKind::Released, id)),
            "X" => return Err(Error::refused(ErrorKind::Expired, id)),
            _ if state.expired => return Err(Error::refused(ErrorKind::Expired, id)),
            _ => {}
        }
        let mut until = u64::MAX;
        for record in &state.groups {
            until = until.min(self.extend_record(record.clone(), id, lease).await?);
        }
        let millis = (lease.as_millis() as u64).to_string();
        let retain = self.config.retain_ms.to_string();
        let reply = self.manifest(id, &["extend", &millis, &retain]).await?;
        Ok(until.min(int(&reply, 1).map_or(until, |e| e as u64)))
    }

    async fn budget(&self, budget: &Budget) -> Result<BudgetStatus, Error> {
        budget.validate()?;
        let mut invocation = SCRIPTS.budget.prepare_invoke();
        invocation
            .key(self.budget_key(budget))
            .arg(budget.window().spec().as_ref())
            .arg(MAX_EXPIRED_PER_CALL);
        let reply = self.invoke(invocation).await?;
        let ends = int(&reply, 2)?;
        Ok(BudgetStatus::new(
            budget.limit(),
            int(&reply, 0)? as u64,
            int(&reply, 1)? as u64,
            u64::try_from(ends).ok(),
        ))
    }

    async fn set_spent(&self, budget: &Budget, spent: u64) -> Result<(), Error> {
        check_set_spent(budget, spent)?;
        let mut invocation = SCRIPTS.set_spent.prepare_invoke();
        invocation
            .key(self.budget_key(budget))
            .arg(spent)
            .arg(budget.window().spec().as_ref());
        self.invoke(invocation).await.map(drop)
    }

    async fn owner(&self, value: &Unique) -> Result<Option<String>, Error> {
        value.validate()?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.unique_key(value));
        with_timeout(self.config.timeout, async {
            Ok(self.conn.query(&cmd).await?)
        })
        .await
    }

    async fn remove(&self, value: &Unique) -> Result<bool, Error> {
        value.validate()?;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.unique_key(value));
        with_timeout(self.config.timeout, async {
            Ok(self.conn.query::<i64>(&cmd).await? == 1)
        })
        .await
    }
}
