//! The connection to Redis (one node, or a Cluster), the script, and the checks made once at
//! connect time.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Value};

use super::protocol::protocol;
use crate::store::clock::Clock;
use crate::{Error, ErrorKind};

/// The store's library of Redis Functions: the shared prelude, the operations, and the batch
/// function that runs them (`src/store/lua/`). A Redis Function, not a script: Redis runs the
/// library's definitions once, when it is loaded, where a script would define them all again on
/// every call.
///
/// The library's name carries a digest of its code, so that two versions of this crate on one
/// Redis (a rolling deploy) each call their own. It is loaded at connect time and again when a
/// call finds it missing (after a restart without persistence, a failover to a replica that
/// never had it, `FUNCTION FLUSH`); on a Cluster, `FUNCTION LOAD` goes to every primary.
///
/// The previous release kept budgets and hold records in another layout under the same keys.
/// This library reads that layout (and rewrites what it changes in its own), but the previous
/// release cannot read this one: it would take every budget this release wrote for empty. So
/// whenever this library is loaded, the previous release's library is replaced by a fence of
/// the same name, whose function refuses every call with an error: an instance of the previous
/// release still running fails closed instead of granting a budget's capacity again.
pub(crate) struct Library {
    /// The library's name, which is also the name of its one function.
    pub(crate) name: String,
    code: String,
    /// The fence that replaces the previous release's library of the same kind.
    fence: String,
}

/// The version (digest of its Lua sources) of the previous release's library, whose layout
/// differs from this one's; `tests/redis_upgrade.rs` computes it from a copy of those sources.
const PREVIOUS_VERSION: &str = "bfc7ce49d6fc";

const SOURCES: &str = concat!(
    include_str!("../lua/common.lua"),
    "\n",
    include_str!("../lua/hold.lua"),
    "\n",
    include_str!("../lua/budget.lua"),
    "\n",
    include_str!("../lua/batch.lua"),
);

impl Library {
    fn build(suffix: &str, sources: &str) -> Self {
        use sha2::Digest;
        let version = crate::claim::hex(&sha2::Sha256::digest(SOURCES.as_bytes())[..6]);
        let name = format!("tower_reserve_{version}{suffix}");
        let code = format!("#!lua name={name}\nlocal FUNCTION_NAME = '{name}'\n{sources}");
        let previous = format!("tower_reserve_{PREVIOUS_VERSION}{suffix}");
        let fence = format!(
            "#!lua name={previous}\n\
             redis.register_function {{ function_name = '{previous}', \
             flags = {{ 'allow-cross-slot-keys' }}, callback = function() \
             return redis.error_reply('UPGRADED tower-reserve: this Redis holds the layout of a \
             newer release, which this one cannot read; upgrade this instance') end }}"
        );
        Library { name, code, fence }
    }

    /// The library a store with `clock` calls.
    fn of(clock: &Clock) -> &'static Library {
        #[cfg(feature = "test-clock")]
        if clock.is_test() {
            return &TEST_LIBRARY;
        }
        let _ = clock;
        &LIBRARY
    }
}

pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(|| Library::build("", SOURCES));

/// The library of a store with a test clock: the same, shifted by what each call carries.
#[cfg(feature = "test-clock")]
static TEST_LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    const OFF: &str = "local TEST_CLOCK = false";
    assert!(SOURCES.contains(OFF), "common.lua declares TEST_CLOCK");
    Library::build("_test", &SOURCES.replace(OFF, "local TEST_CLOCK = true"))
});

/// What every call of the store's function carries besides its operations.
#[derive(Debug, Clone)]
pub(crate) struct CallArgs {
    /// The store's retention of settled records.
    pub(crate) retain_ms: u64,
    /// How long a forgotten hold (and a call that is not idempotent by itself) still answers
    /// the same call sent again: longer than the store retries a call whose answer was lost.
    pub(crate) answer_ms: u64,
    /// The store's clock.
    pub(crate) clock: Clock,
}

/// One node through a reconnecting multiplexed connection, or a Cluster through redis-rs's
/// cluster client (which reloads its slot map after a failover; the connection that carries
/// batches follows no redirect, see [`Conn::run_batch`]).
#[derive(Clone)]
pub(crate) enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs one batch (a MessagePack array of operations), routed by `key` on a Cluster; answers
    /// the function's MessagePack answer, or `None` when the call certainly ran nothing on a
    /// Cluster (a node turned it away with `MOVED`, `ASK`, `TRYAGAIN` or `CLUSTERDOWN`, or no
    /// connection to its node was up), for the router to send its operations again.
    pub(crate) async fn run_batch(
        &self,
        key: &str,
        payload: &[u8],
        args: &CallArgs,
    ) -> Result<Option<Bytes>, Error> {
        let library = Library::of(&args.clock);
        // Sized once for its arguments (the payload is most of it): built up from empty, the
        // command's buffers would be copied into larger ones several times on every call.
        let mut call = redis::Cmd::with_capacity(8, payload.len() + library.name.len() + 64);
        call.arg("FCALL")
            .arg(&library.name)
            .arg(1)
            .arg(key)
            .arg(payload)
            .arg(args.retain_ms)
            .arg(args.answer_ms);
        if args.clock.is_test() {
            call.arg(args.clock.shift_ms());
        }
        let reply = match self.query::<Value>(&call).await {
            Err(err) if is_missing(&err) => {
                // Boxed: a rare path (a server that lost the library), which would otherwise
                // make every batch's future larger.
                Box::pin(self.load_library(&args.clock)).await?;
                self.query::<Value>(&call).await
            }
            reply => reply,
        };
        match reply {
            Ok(Value::BulkString(bytes)) => Ok(Some(Bytes::from(bytes))),
            Ok(other) => Err(protocol(&format!("a batch answered {other:?}"))),
            Err(err) if is_redirect(&err) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Loads the library of a store with `clock` (on every primary of a Cluster).
    pub(crate) async fn load_library(&self, clock: &Clock) -> Result<(), Error> {
        let library = Library::of(clock);
        for code in [&library.code, &library.fence] {
            let mut load = redis::cmd("FUNCTION");
            load.arg("LOAD").arg("REPLACE").arg(code);
            self.query::<Value>(&load).await?;
        }
        Ok(())
    }

    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// A command to the primary that serves `key`.
    async fn query_at<T: FromRedisValue>(&self, key: &str, cmd: Cmd) -> redis::RedisResult<T> {
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

    /// A command to the node at `host:port` (a Cluster node redis-rs knows).
    pub(crate) async fn query_node<T: FromRedisValue>(
        &self,
        address: &str,
        cmd: Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Node(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => {
                let (host, port) = address.rsplit_once(':').unwrap_or((address, "6379"));
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port: port.parse().unwrap_or(6379),
                });
                let reply = c.clone().route_command(cmd, route).await?;
                Ok(redis::from_redis_value(reply)?)
            }
        }
    }

    /// Waits (Redis `WAIT`, on the connection that wrote) until `replicas` replicas of the node
    /// that serves `key` have acknowledged its writes, or `timeout` has passed. A wait that falls
    /// short is logged, not an error: the primary has applied the writes and cannot take them
    /// back.
    pub(crate) async fn wait(&self, key: &str, replicas: usize, timeout: Duration) {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        let acked = tokio::time::timeout(timeout * 2, self.query_at::<i64>(key, cmd)).await;
        match acked {
            Ok(Ok(n)) if n as usize >= replicas => {}
            Ok(Ok(n)) => tracing::warn!(
                key,
                acked = n,
                wanted = replicas,
                "commit not yet on enough replicas"
            ),
            Ok(Err(err)) => tracing::warn!(key, error = %err, "WAIT for replicas failed"),
            Err(_) => tracing::warn!(key, "WAIT for replicas did not answer"),
        }
    }
}

/// Whether a call on a Cluster was certainly not run: its node turned it away (the slot is served
/// elsewhere, is moving, or the Cluster is down), or redis-rs had no connection to send it on
/// (one is being made again after a node stopped answering).
fn is_redirect(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
        ) | ErrorKind::ClusterConnectionNotFound
    )
}

/// Whether a call failed because the library is not loaded on that node.
fn is_missing(err: &redis::RedisError) -> bool {
    err.to_string().contains("Function not found")
}

/// What the store needs of a Redis server: version 7.0 or later (functions, `SET NX GET`),
/// and an eviction policy that never evicts (an evicted in-flight marker or window hash lets a
/// value be owned twice or a budget granted again). Checked on every primary at connect time.
pub(crate) async fn check_server(
    conn: &Conn,
    address: &str,
    allow_eviction: bool,
) -> Result<(), Error> {
    let info: String = conn
        .query_node(address, redis::cmd("INFO").arg("server").clone())
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("0")
        .trim()
        .to_owned();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 7 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("Redis at {address} is version {version}; tower-reserve needs 7.0 or later"),
        ));
    }
    let policy: Result<Vec<String>, _> = conn
        .query_node(
            address,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .clone(),
        )
        .await;
    match policy {
        Ok(pair) => {
            let policy = pair.get(1).map_or("", String::as_str);
            if policy != "noeviction" {
                if !allow_eviction {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "Redis at {address} has maxmemory-policy {policy}: it may evict a hold in flight, \
                             and a value could then be owned twice or a budget granted above its limit. \
                             Set maxmemory-policy noeviction, or accept it with RedisStoreBuilder::allow_eviction"
                        ),
                    ));
                }
                tracing::warn!(
                    address,
                    policy,
                    "Redis may evict keys of holds in flight (accepted by allow_eviction)"
                );
            }
        }
        Err(err) => tracing::warn!(
            address,
            error = %err,
            "could not read maxmemory-policy (CONFIG may be disabled); make sure it is noeviction"
        ),
    }
    Ok(())
}
