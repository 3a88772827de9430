//! The Redis store: one Lua script call per reservation and per settlement.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation, Value};

use super::{DEFAULT_RETAIN, MAX_EXPIRED_PER_CALL, Store, check_lease, check_set_spent};
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
    conn: ConnectionManager,
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    prefix: String,
    retain_ms: u64,
    timeout: Duration,
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

    /// Connects to one Redis node and checks that it answers, failing fast when it does not.
    pub async fn connect(self, url: &str) -> Result<RedisStore, Error> {
        let prefix = &self.config.prefix;
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(Error::invalid(
                "a key prefix must be non-empty, without braces",
            ));
        }
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid(format!("redis url {url:?}: {e}")).with_source(e))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let timeout = self.config.timeout;
        let mut conn = with_timeout(timeout, async {
            Ok(ConnectionManager::new_with_config(client, manager).await?)
        })
        .await?;
        with_timeout(timeout, async {
            Ok(redis::cmd("PING").query_async::<String>(&mut conn).await?)
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

    fn record_key(&self, id: &HoldId) -> String {
        format!("{}:h:{{{}}}", self.config.prefix, id)
    }

    fn budget_key(&self, budget: &Budget) -> String {
        format!("{}:b:{{{}}}", self.config.prefix, budget.key())
    }

    fn unique_key(&self, value: &Unique) -> String {
        format!(
            "{}:u:{{{}:{}}}",
            self.config.prefix,
            value.namespace(),
            value.digest_hex()
        )
    }

    async fn invoke(&self, invocation: ScriptInvocation<'_>) -> Result<Vec<Value>, Error> {
        let mut conn = self.conn.clone();
        with_timeout(self.config.timeout, async move {
            Ok(invocation.invoke_async(&mut conn).await?)
        })
        .await
    }

    async fn settle(&self, script: &Script, id: &HoldId) -> Result<Settled, Error> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.record_key(id))
            .arg(id.as_str())
            .arg(self.config.retain_ms);
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
    let (kind, what) = match word(reply, 1) {
        Ok("conflict") => (ErrorKind::Conflict, "was reserved with other claims"),
        Ok("unknown") => (ErrorKind::UnknownHold, "is not known"),
        Ok("expired") => (ErrorKind::Expired, "has expired"),
        Ok("committed") => (ErrorKind::Committed, "is already committed"),
        Ok("released") => (ErrorKind::Released, "is already released"),
        Ok(other) => return protocol(other),
        Err(e) => return e,
    };
    Error::new(kind, format!("hold {id} {what}"))
}

impl Store for RedisStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        let id = reservation.id();
        let mut invocation = SCRIPTS.reserve.prepare_invoke();
        invocation
            .key(self.record_key(id))
            .arg(id.as_str())
            .arg(reservation.lease().as_millis() as u64)
            .arg(self.config.retain_ms)
            .arg(reservation.fingerprint())
            .arg(MAX_EXPIRED_PER_CALL);
        for claim in reservation.claims() {
            match claim {
                Claim::Spend { budget, amount } => {
                    invocation
                        .key(self.budget_key(budget))
                        .arg("b")
                        .arg(*amount)
                        .arg(budget.limit())
                        .arg(budget.window().spec().as_ref());
                }
                Claim::Own { value, owner } => {
                    invocation
                        .key(self.unique_key(value))
                        .arg("u")
                        .arg(owner.as_str())
                        .arg("")
                        .arg("");
                }
                Claim::ReleaseOnCommit { value, owner } => {
                    invocation
                        .key(self.unique_key(value))
                        .arg("r")
                        .arg(owner.as_str())
                        .arg("")
                        .arg("");
                }
            }
        }
        let reply = self.invoke(invocation).await?;
        match word(&reply, 0)? {
            "G" => {
                let remaining = (3..reply.len())
                    .map(|at| int(&reply, at).map(|left| u64::try_from(left).ok()))
                    .collect::<Result<Vec<_>, _>>()?;
                if remaining.len() != reservation.claims().len() {
                    return Err(protocol("claim count"));
                }
                Ok(Reserved::Granted(Grant {
                    id: id.clone(),
                    expires_at_ms: int(&reply, 1)? as u64,
                    remaining,
                    replayed: int(&reply, 2)? == 1,
                }))
            }
            "D" => {
                let claim = int(&reply, 1)? as usize - 1;
                let reason = match word(&reply, 2)? {
                    "budget" => {
                        let Some(Claim::Spend { amount, .. }) = reservation.claims().get(claim)
                        else {
                            return Err(protocol("denied claim index"));
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

    async fn commit(&self, id: &HoldId) -> Result<Settled, Error> {
        self.settle(&SCRIPTS.commit, id).await
    }

    async fn release(&self, id: &HoldId) -> Result<Settled, Error> {
        self.settle(&SCRIPTS.release, id).await
    }

    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        check_lease(lease)?;
        let mut invocation = SCRIPTS.extend.prepare_invoke();
        invocation
            .key(self.record_key(id))
            .arg(id.as_str())
            .arg(lease.as_millis() as u64)
            .arg(self.config.retain_ms);
        let reply = self.invoke(invocation).await?;
        match word(&reply, 0)? {
            "OK" => Ok(int(&reply, 1)? as u64),
            _ => Err(refusal(&reply, id)),
        }
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
        let mut conn = self.conn.clone();
        let key = self.unique_key(value);
        with_timeout(self.config.timeout, async move {
            Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
        })
        .await
    }

    async fn remove(&self, value: &Unique) -> Result<bool, Error> {
        value.validate()?;
        let mut conn = self.conn.clone();
        let key = self.unique_key(value);
        with_timeout(self.config.timeout, async move {
            let removed: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
            Ok(removed == 1)
        })
        .await
    }
}
