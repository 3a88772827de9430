//! An upgrade from the previous release on one Redis: what that release's library wrote (its
//! functions, copied in `tests/fixtures/previous_lua/`, loaded into a real `redis-server` and
//! called as it called them) is read by this release as it was meant: spent amounts, owned
//! values, holds in flight, applied refunds and tombstones. A key in no layout this release
//! reads is an error that changes nothing, and once this release has connected, the previous
//! release's function refuses every call.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use support::redis_server::RedisServer;
use support::{denied, fresh, granted, kind, spend, status};
use tower_reserve::{
    Budget, Claim, DenialReason, ErrorKind, HoldId, RedisStore, Refund, Reservation, Settled,
    Store, Unique, Window,
};

const LONG: Duration = Duration::from_secs(60);
const RETAIN_MS: u64 = 600_000;

/// The previous release's library, named as that release named it.
fn previous_library() -> (String, String) {
    use sha2::Digest;
    let sources = ["common", "hold", "budget", "batch"]
        .map(|f| {
            std::fs::read_to_string(format!(
                "{}/tests/fixtures/previous_lua/{f}.lua",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("a fixture")
        })
        .join("\n");
    let digest = sha2::Sha256::digest(sources.as_bytes());
    let version: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("tower_reserve_{version}");
    let code = format!("#!lua name={name}\nlocal FUNCTION_NAME = '{name}'\n{sources}");
    (name, code)
}

/// A claim as the previous release sent it.
enum Old<'a> {
    Spend(&'a Budget, u64),
    Own(&'a str, &'a str),
}

/// The previous release, calling its own function on `prefix`'s keys.
struct Previous {
    conn: MultiplexedConnection,
    name: String,
    prefix: String,
}

fn str(w: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(w, s).unwrap();
}

/// Bytes as a MessagePack string: Redis's `cmsgpack` reads no `bin` type.
fn bytes(w: &mut Vec<u8>, b: &[u8]) {
    rmp::encode::write_str_len(w, b.len() as u32).unwrap();
    w.extend_from_slice(b);
}

fn uint(w: &mut Vec<u8>, n: u64) {
    rmp::encode::write_uint(w, n).unwrap();
}

fn array(w: &mut Vec<u8>, n: u32) {
    rmp::encode::write_array_len(w, n).unwrap();
}

impl Previous {
    async fn load(redis: &RedisServer, prefix: &str) -> Self {
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let (name, code) = previous_library();
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(code)
            .query_async(&mut conn)
            .await
            .unwrap();
        Previous {
            conn,
            name,
            prefix: prefix.to_owned(),
        }
    }

    fn record(&self, id: &HoldId) -> String {
        format!("{}:h:{{{id}}}", self.prefix)
    }

    fn budget(&self, b: &Budget) -> String {
        format!("{}:b:{{{}}}", self.prefix, b.key())
    }

    /// One operation through the previous release's function; its answer, as MessagePack.
    async fn call(&mut self, key: &str, op: Vec<u8>) -> redis::RedisResult<Vec<u8>> {
        let mut ops = Vec::new();
        array(&mut ops, 1);
        ops.extend(op);
        redis::cmd("FCALL")
            .arg(&self.name)
            .arg(1)
            .arg(key)
            .arg(ops)
            .arg(RETAIN_MS)
            .arg(4_000)
            .query_async(&mut self.conn)
            .await
    }

    /// Reserves `claims` under `id` (op 1 as the previous release wrote it); answers whether it
    /// was granted.
    async fn reserve(&mut self, id: &HoldId, claims: &[Old<'_>]) -> bool {
        let record = self.record(id);
        let mut op = Vec::new();
        array(&mut op, 8);
        uint(&mut op, 1);
        str(&mut op, &record);
        str(&mut op, id.as_str());
        uint(&mut op, LONG.as_millis() as u64);
        str(
            &mut op,
            &format!("{:016x}{:016x}", 7, rand::random::<u64>()),
        );
        str(&mut op, "hH");
        let mut body = Vec::new();
        array(&mut body, 3);
        for (to, with_limit) in [(&mut op, true), (&mut body, false)] {
            array(to, claims.len() as u32);
            for c in claims {
                match c {
                    Old::Spend(b, amount) => {
                        array(to, if with_limit { 5 } else { 4 });
                        str(to, "b");
                        str(to, &self.budget(b));
                        uint(to, *amount);
                        if with_limit {
                            uint(to, b.limit());
                        }
                        str(to, &spec(b));
                    }
                    Old::Own(key, owner) => {
                        array(to, 3);
                        str(to, "u");
                        str(to, key);
                        str(to, owner);
                    }
                }
            }
        }
        array(&mut body, 0);
        array(&mut body, 0);
        bytes(&mut op, &body);
        let answer = self.call(&record, op).await.unwrap();
        // [[ 'G', ... ]]: an array of one, whose first word is G.
        answer[2..4] == [0xa1, b'G']
    }

    /// Settles `id` (op 2): commits or releases, keeping the record `keep_ms` (0: forgets it).
    async fn settle(&mut self, id: &HoldId, commit: bool, keep_ms: u64) {
        let record = self.record(id);
        let mut op = Vec::new();
        array(&mut op, 8);
        uint(&mut op, 2);
        str(&mut op, &record);
        str(&mut op, id.as_str());
        str(&mut op, if commit { "c10" } else { "r10" });
        uint(&mut op, keep_ms);
        str(&mut op, "");
        array(&mut op, 0);
        str(&mut op, &format!("{:016x}", rand::random::<u64>()));
        let answer = self.call(&record, op).await.unwrap();
        assert_eq!(&answer[2..5], &[0xa2, b'O', b'K'], "settled: {answer:?}");
    }

    /// Applies `r` (op 8), as the previous release did.
    async fn refund(&mut self, r: &Refund, id: &HoldId, budget: &Budget) {
        let key = format!("{}:f:{{{}}}#{id}", self.prefix, budget.key());
        let mut op = Vec::new();
        array(&mut op, 8);
        uint(&mut op, 8);
        str(&mut op, &key);
        str(&mut op, &self.budget(budget));
        str(&mut op, &spec(budget));
        uint(&mut op, 0);
        uint(&mut op, r.amount());
        bytes(&mut op, &refund_fingerprint(budget, r.amount()));
        uint(&mut op, RETAIN_MS);
        let answer = self.call(&self.budget(budget), op).await.unwrap();
        assert_eq!(&answer[2..5], &[0xa2, b'O', b'K'], "refunded: {answer:?}");
    }
}

/// A refund's fingerprint, as both releases compute it (`Refund`'s own).
fn refund_fingerprint(budget: &Budget, amount: u64) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        budget.key().as_bytes(),
        spec(budget).as_bytes(),
        &amount.to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize()[..8].to_vec()
}

fn spec(b: &Budget) -> String {
    match b.window() {
        Window::Lifetime => "0".into(),
        Window::Every(d) => format!("s{}", d.as_secs()),
        other => panic!("not used here: {other:?}"),
    }
}

async fn connect(redis: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(prefix)
        .connect(&redis.url())
        .await
        .unwrap()
}

fn value_key(prefix: &str, ns: &str, v: &Unique) -> String {
    format!("{prefix}:u:{{{ns}:{}}}", v.digest_hex())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_previous_release_spent_counts_after_the_upgrade() {
    let redis = RedisServer::start();
    let prefix = fresh("up");
    let mut old = Previous::load(&redis, &prefix).await;
    let lifetime = Budget::new(fresh("lifetime"), 1_000);
    let hourly = Budget::new(fresh("hourly"), 1_000).per(Window::Every(Duration::from_secs(3_600)));
    for b in [&lifetime, &hourly] {
        let id = HoldId::new(fresh("old")).unwrap();
        assert!(old.reserve(&id, &[Old::Spend(b, 700)]).await);
        old.settle(&id, true, 0).await;
    }
    // A refund the previous release applied.
    let refund_id = HoldId::new(fresh("refund")).unwrap();
    let refund = Refund::new(refund_id.clone(), lifetime.clone(), 100);
    old.refund(&refund, &refund_id, &lifetime).await;

    let store = connect(&redis, &prefix).await;
    assert_eq!(status(&store, &lifetime).await.spent, 600);
    assert_eq!(status(&store, &hourly).await.spent, 700);
    // Applied before: not again.
    assert_eq!(store.refund(&refund).await.unwrap(), Settled::Replayed);
    denied(&store, &spend(&lifetime, 401, LONG)).await;
    denied(&store, &spend(&hourly, 301, LONG)).await;
    for (b, left) in [(&lifetime, 400), (&hourly, 300)] {
        let g = granted(&store, &spend(b, left, LONG)).await;
        store.commit(&g.id).await.unwrap();
        let s = status(&store, b).await;
        assert_eq!((s.spent, s.remaining), (1_000, 0));
    }
    // Rewritten in this release's layout, the previous one's fields gone.
    let fields = redis.cli(&["hkeys", &old.budget(&lifetime)]);
    assert_eq!(fields.trim(), "s", "{fields}");

    // The previous release's function now refuses every call: it would read this layout as
    // nothing spent.
    let mut op = Vec::new();
    array(&mut op, 3);
    uint(&mut op, 6);
    str(&mut op, &old.budget(&lifetime));
    str(&mut op, "0");
    let err = old.call(&old.budget(&lifetime), op).await.unwrap_err();
    assert!(err.to_string().contains("UPGRADED"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_values_and_tombstones_of_the_previous_release_are_settled_as_they_were() {
    let redis = RedisServer::start();
    let prefix = fresh("up");
    let mut old = Previous::load(&redis, &prefix).await;
    let ns = fresh("accounts");
    let owned = Unique::email(ns.clone(), "owned@example.com");
    let in_flight = Unique::email(ns.clone(), "new@example.com");
    let owned_key = value_key(&prefix, &ns, &owned);
    let in_flight_key = value_key(&prefix, &ns, &in_flight);
    let budget = Budget::new(fresh("lifetime"), 1_000);

    // Owned, committed by the previous release.
    let id = HoldId::new(fresh("old")).unwrap();
    assert!(old.reserve(&id, &[Old::Own(&owned_key, "acct-1")]).await);
    old.settle(&id, true, 0).await;
    // In flight: one to commit (a spend and a value), one to release.
    let to_commit = HoldId::new(fresh("old")).unwrap();
    let claims = [Old::Spend(&budget, 500), Old::Own(&in_flight_key, "acct-2")];
    assert!(old.reserve(&to_commit, &claims).await);
    let to_release = HoldId::new(fresh("old")).unwrap();
    assert!(old.reserve(&to_release, &[Old::Spend(&budget, 300)]).await);
    // Released before it was reserved: a tombstone.
    let tombstoned = HoldId::new(fresh("old")).unwrap();
    old.settle(&tombstoned, false, 0).await;

    let store = connect(&redis, &prefix).await;
    let own = |v: &Unique, owner: &str| {
        Reservation::builder()
            .lease(LONG)
            .claim(Claim::own(v.clone(), owner))
            .build()
            .unwrap()
    };
    assert_eq!(
        store.owner(&owned).await.unwrap().as_deref(),
        Some("acct-1")
    );
    assert_eq!(
        denied(&store, &own(&owned, "acct-9")).await.reason,
        DenialReason::Taken
    );
    // The holds in flight still hold: 800 of 1,000, and the value.
    let s = status(&store, &budget).await;
    assert_eq!((s.spent, s.held), (0, 800));
    denied(&store, &spend(&budget, 201, LONG)).await;
    assert_eq!(
        denied(&store, &own(&in_flight, "acct-9")).await.reason,
        DenialReason::Taken
    );
    // Extended: moved to a later bucket, still held once.
    store
        .extend(&to_release, LONG + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status(&store, &budget).await.held, 800);
    assert_eq!(store.commit(&to_commit).await.unwrap(), Settled::Applied);
    assert_eq!(store.release(&to_release).await.unwrap(), Settled::Applied);
    let s = status(&store, &budget).await;
    assert_eq!((s.spent, s.held), (500, 0));
    assert_eq!(
        store.owner(&in_flight).await.unwrap().as_deref(),
        Some("acct-2")
    );
    assert_eq!(
        redis.cli(&["exists", &format!("{in_flight_key}:p")]).trim(),
        "0"
    );
    // Settled again, as the previous release kept them: the same answers.
    assert_eq!(store.commit(&to_commit).await.unwrap(), Settled::Replayed);
    assert_eq!(kind(store.commit(&to_release).await), ErrorKind::Released);
    // The tombstone still refuses the late reserve.
    let late = Reservation::builder()
        .id(tombstoned)
        .lease(LONG)
        .claim(Claim::spend(budget.clone(), 1))
        .build()
        .unwrap();
    assert_eq!(kind(store.reserve(&late).await), ErrorKind::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_no_known_layout_is_an_error_that_changes_nothing() {
    let redis = RedisServer::start();
    let prefix = fresh("up");
    let store = connect(&redis, &prefix).await;
    let budget = Budget::new(fresh("lifetime"), 1_000);
    let bkey = format!("{prefix}:b:{{{}}}", budget.key());
    let id = HoldId::new(fresh("hold")).unwrap();
    let record = format!("{prefix}:h:{{{id}}}");
    let cases: [(&str, &[&str]); 4] = [
        (&bkey, &["hset", &bkey, "s", "short"]),
        (&bkey, &["hset", &bkey, "spent", "a lot"]),
        (&record, &["set", &record, "H\u{1}short"]),
        (&record, &["set", &record, "Hnot a record of any release"]),
    ];
    for (key, write) in cases {
        redis.cli(&["del", key]);
        redis.cli(write);
        let before = redis.cli(&["dump", key]);
        let reserve = Reservation::builder()
            .id(id.clone())
            .lease(LONG)
            .claim(Claim::spend(budget.clone(), 1))
            .build()
            .unwrap();
        assert_eq!(
            kind(store.reserve(&reserve).await),
            ErrorKind::Protocol,
            "{write:?}"
        );
        if key == record {
            assert_eq!(kind(store.commit(&id).await), ErrorKind::Protocol);
            assert_eq!(kind(store.release(&id).await), ErrorKind::Protocol);
        } else {
            assert_eq!(kind(store.budget(&budget).await), ErrorKind::Protocol);
        }
        assert_eq!(redis.cli(&["dump", key]), before, "{write:?}");
    }
}
