//! The reservation load command: how close `RedisStore` gets to Redis itself, what a request
//! costs Redis (commands, memory), and how the crate compares with the two ways people write a
//! budget check by hand. Everything runs in one process, in one run, against one loopback
//! `redis-server` that this command starts, so the ratios it prints are measured side by side.
//!
//! ```text
//! cargo bench -p tower-reserve-benches --bench reserve_load
//! ```
//!
//! Environment (all optional):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `BENCH_CONCURRENCY` | concurrencies compared with `redis-benchmark` | `1,8,32` |
//! | `BENCH_SWEEP` | concurrencies of the hand-written comparison (and the plot) | `1,2,4,8,16,32,64` |
//! | `BENCH_OPS` | requests per run, at most | `20000` |
//! | `BENCH_SECS` | seconds per run, at most | `3` |
//! | `BENCH_OUT` | the Markdown report | `target/bench-load.md` |
//! | `BENCH_SVG` | the plot of throughput against concurrency | `benches/throughput.svg` |

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tower_reserve::{Budget, Claim, MAX_AMOUNT, RedisStore, Reservation, Reserved, Store, Unique};

/// The script exactly as `RedisStore` sends it.
const RESERVE_LUA: &str = concat!(
    "#!lua flags=allow-cross-slot-keys\n",
    include_str!("../../src/store/lua/common.lua"),
    "\n",
    include_str!("../../src/store/lua/hold.lua"),
    "\n",
    include_str!("../../src/store/lua/budget.lua"),
    "\n",
    include_str!("../../src/store/lua/batch.lua"),
);

const AMOUNT: u64 = 100;
const LEASE_MS: u64 = 30_000;
const MANY: u64 = 10_000;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One run's outcome.
#[derive(Default, Clone)]
struct Run {
    ops: u64,
    granted: u64,
    secs: f64,
    /// Latency of each request, in microseconds, sorted.
    lat_us: Vec<u64>,
    /// Cents spent above the limits, summed over the budgets.
    over_cents: u64,
    /// Optimistic transactions retried (WATCH/MULTI/EXEC only).
    retries: u64,
    /// Requests that gave up after too many retries.
    gave_up: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i] as f64 / 1000.0
    }
}

/// Which budget request `i` of a run spends against.
#[derive(Clone, Copy, PartialEq)]
enum Spread {
    Hot,
    Many,
}

impl Spread {
    fn key(self, tag: &str) -> String {
        match self {
            Spread::Hot => format!("{tag}-hot"),
            Spread::Many => format!("{tag}-{}", rand::random_range(0..MANY)),
        }
    }
    fn keys(self, tag: &str) -> Vec<String> {
        match self {
            Spread::Hot => vec![format!("{tag}-hot")],
            Spread::Many => (0..MANY).map(|i| format!("{tag}-{i}")).collect(),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Spread::Hot => "1 hot budget",
            Spread::Many => "10,000 budgets",
        }
    }
}

/// Runs `op` from `conc` tasks until `max_ops` requests or `max_time` have passed. `op` answers
/// whether the request was granted, and how many retries it took.
async fn drive<F, Fut>(conc: usize, max_ops: u64, max_time: Duration, op: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (bool, u64, bool)> + Send,
{
    let op = Arc::new(op);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conc {
        let op = op.clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            while issued.fetch_add(1, Ordering::Relaxed) < max_ops && start.elapsed() < max_time {
                let began = Instant::now();
                let (granted, retries, gave_up) = op(t).await;
                run.lat_us.push(began.elapsed().as_micros() as u64);
                run.ops += 1;
                run.granted += granted as u64;
                run.retries += retries;
                run.gave_up += gave_up as u64;
            }
            run
        }));
    }
    let mut total = Run::default();
    for task in tasks {
        let run = task.await.expect("a load task");
        total.ops += run.ops;
        total.granted += run.granted;
        total.retries += run.retries;
        total.gave_up += run.gave_up;
        total.lat_us.extend(run.lat_us);
    }
    total.secs = start.elapsed().as_secs_f64();
    total.lat_us.sort_unstable();
    total
}

/// The crate: reserve, then commit what was granted (or only reserve, leaving the hold in flight).
#[allow(clippy::too_many_arguments)]
async fn run_crate(
    store: &RedisStore,
    tag: &str,
    spread: Spread,
    limit: u64,
    commit: bool,
    conc: usize,
    max_ops: u64,
    max_time: Duration,
) -> Run {
    let store2 = store.clone();
    let tag2 = tag.to_owned();
    let mut run = drive(conc, max_ops, max_time, move |_| {
        let store = store2.clone();
        let key = spread.key(&tag2);
        async move {
            let reservation = Reservation::builder()
                .lease(Duration::from_millis(LEASE_MS))
                .claim(Claim::spend(Budget::new(key, limit), AMOUNT))
                .build()
                .expect("a valid reservation");
            match store.reserve(&reservation).await {
                Ok(Reserved::Granted(_)) => {
                    if commit {
                        store.commit(reservation.id()).await.expect("commit");
                    }
                    (true, 0, false)
                }
                Ok(Reserved::Denied(_)) => (false, 0, false),
                Err(err) => panic!("reserve: {err}"),
            }
        }
    })
    .await;
    if commit && limit < MAX_AMOUNT {
        let statuses = futures_util::future::join_all(
            spread
                .keys(tag)
                .into_iter()
                .map(|k| async move { store.budget(&Budget::new(k, limit)).await }),
        )
        .await;
        run.over_cents = statuses
            .into_iter()
            .map(|s| s.expect("budget").spent.saturating_sub(limit))
            .sum();
    }
    run
}

/// The two hand-written ways.
#[derive(Clone, Copy, PartialEq)]
enum Hand {
    /// `GET` the total; if there is room, `INCRBY`.
    CheckThenAct,
    /// `WATCH`, `GET`, then `MULTI`/`INCRBY`/`EXEC`; retried when the key changed.
    Optimistic,
}

const MAX_RETRIES: u64 = 100;

#[allow(clippy::too_many_arguments)]
async fn run_hand(
    client: &redis::Client,
    way: Hand,
    tag: &str,
    spread: Spread,
    limit: u64,
    conc: usize,
    max_ops: u64,
    max_time: Duration,
) -> Run {
    // One connection per task, as a pool would give: WATCH belongs to a connection.
    let mut conns = Vec::new();
    for _ in 0..conc {
        conns.push(tokio::sync::Mutex::new(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("a connection"),
        ));
    }
    let conns = Arc::new(conns);
    let tag2 = tag.to_owned();
    let mut run = drive(conc, max_ops, max_time, move |t| {
        let conns = conns.clone();
        let key = format!("hand:{}", spread.key(&tag2));
        async move {
            let mut conn = conns[t].lock().await;
            hand_once(&mut conn, way, &key, limit).await
        }
    })
    .await;
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = spread
        .keys(tag)
        .into_iter()
        .map(|k| format!("hand:{k}"))
        .collect();
    for chunk in keys.chunks(1000) {
        let totals: Vec<Option<u64>> = conn.mget(chunk).await.expect("MGET");
        run.over_cents += totals
            .into_iter()
            .map(|t| t.unwrap_or(0).saturating_sub(limit))
            .sum::<u64>();
    }
    run
}

async fn hand_once(
    conn: &mut MultiplexedConnection,
    way: Hand,
    key: &str,
    limit: u64,
) -> (bool, u64, bool) {
    match way {
        Hand::CheckThenAct => {
            let total: Option<u64> = conn.get(key).await.expect("GET");
            if total.unwrap_or(0) + AMOUNT > limit {
                return (false, 0, false);
            }
            let _: u64 = conn.incr(key, AMOUNT).await.expect("INCRBY");
            (true, 0, false)
        }
        Hand::Optimistic => {
            let mut retries = 0;
            loop {
                let () = redis::cmd("WATCH")
                    .arg(key)
                    .query_async(conn)
                    .await
                    .expect("WATCH");
                let total: Option<u64> = conn.get(key).await.expect("GET");
                if total.unwrap_or(0) + AMOUNT > limit {
                    let () = redis::cmd("UNWATCH")
                        .query_async(conn)
                        .await
                        .expect("UNWATCH");
                    return (false, retries, false);
                }
                let done: Option<(u64,)> = redis::pipe()
                    .atomic()
                    .incr(key, AMOUNT)
                    .query_async(conn)
                    .await
                    .expect("MULTI/EXEC");
                if done.is_some() {
                    return (true, retries, false);
                }
                retries += 1;
                if retries >= MAX_RETRIES {
                    return (false, retries, true);
                }
            }
        }
    }
}

/// `redis-benchmark` with the very same script by EVALSHA, reserve only, random hold ids.
fn redis_benchmark(port: u16, sha: &str, spread: Spread, conc: usize, ops: u64) -> Option<Run> {
    let budget_key = match spread {
        Spread::Hot => "rb:b:{rb-hot}".to_owned(),
        Spread::Many => "rb:b:{rb-__rand_int__}".to_owned(),
    };
    let lease = LEASE_MS.to_string();
    let limit = MAX_AMOUNT.to_string();
    let amount = AMOUNT.to_string();
    let port = port.to_string();
    let conc_s = conc.to_string();
    let ops_s = ops.to_string();
    let keyspace = MANY.to_string();
    let args = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-c",
        &conc_s,
        "-n",
        &ops_s,
        "-r",
        &keyspace,
        "--csv",
        "EVALSHA",
        sha,
        "2",
        // Two placeholders: 10^8 distinct hold ids, each drawn independently.
        "rb:h:{__rand_int____rand_int__}",
        &budget_key,
        "__rand_int____rand_int__",
        &lease,
        "600000",
        "fp",
        "256",
        "b",
        &amount,
        &limit,
        "0",
    ];
    let out = Command::new("redis-benchmark").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with("\"EVALSHA"))?;
    let fields: Vec<f64> = line
        .split("\",\"")
        .skip(1)
        .filter_map(|f| f.trim_matches('"').parse().ok())
        .collect();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let rps = *fields.first()?;
    let (p50, p99) = (*fields.get(3)?, *fields.get(5)?);
    Some(Run {
        ops,
        granted: ops,
        secs: ops as f64 / rps,
        // Two synthetic points that give back the percentiles it printed.
        lat_us: vec![(p50 * 1000.0) as u64, (p99 * 1000.0) as u64],
        ..Run::default()
    })
}

fn rb_pct(run: &Run, p: f64) -> f64 {
    // For redis-benchmark runs `lat_us` holds just [p50, p99].
    if p < 0.9 {
        run.lat_us[0] as f64 / 1000.0
    } else {
        run.lat_us[1] as f64 / 1000.0
    }
}

async fn flushall(conn: &mut MultiplexedConnection) {
    let () = redis::cmd("FLUSHALL")
        .query_async(conn)
        .await
        .expect("FLUSHALL");
}

async fn info(conn: &mut MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .expect("INFO")
}

fn info_field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Commands per call from `INFO commandstats`, less the ones this command sends to look.
async fn command_counts(conn: &mut MultiplexedConnection) -> Vec<(String, u64)> {
    let text = info(conn, "commandstats").await;
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            (!matches!(name, "info" | "config" | "config|resetstat"))
                .then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// How a counted request goes.
#[derive(Clone, Copy)]
enum Path {
    Commit,
    Release,
    Denied,
}

/// `INFO commandstats` over `n` requests of one path, each spending `AMOUNT` on `key`.
async fn count_commands(
    store: &RedisStore,
    admin: &mut MultiplexedConnection,
    key: &str,
    limit: u64,
    path: Path,
    n: u64,
) -> Vec<(String, u64)> {
    reset_stats(admin).await;
    for _ in 0..n {
        let r = Reservation::builder()
            .claim(Claim::spend(Budget::new(key, limit), AMOUNT))
            .build()
            .unwrap();
        let answer = store.reserve(&r).await;
        match path {
            Path::Denied => assert!(matches!(answer, Ok(Reserved::Denied(_)))),
            Path::Commit | Path::Release => {
                assert!(matches!(answer, Ok(Reserved::Granted(_))));
                if matches!(path, Path::Commit) {
                    store.commit(r.id()).await.unwrap();
                } else {
                    store.release(r.id()).await.unwrap();
                }
            }
        }
    }
    command_counts(admin).await
}

async fn reset_stats(conn: &mut MultiplexedConnection) {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .expect("CONFIG RESETSTAT");
}

/// Commands the client sent (script calls), per request: every other command counted ran
/// inside a script (Redis 7 counts those too).
fn client_calls(counts: &[(String, u64)], per: u64) -> f64 {
    let sent: u64 = counts
        .iter()
        .filter(|(n, _)| n.starts_with("eval") || n.starts_with("script") || n.starts_with("fcall"))
        .map(|(_, c)| c)
        .sum();
    sent as f64 / per as f64
}

fn describe(counts: &[(String, u64)], per: u64) -> (f64, String) {
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    let parts: Vec<String> = counts
        .iter()
        .map(|(n, c)| format!("{} {:.2}", n.to_uppercase(), *c as f64 / per as f64))
        .collect();
    (total as f64 / per as f64, parts.join(", "))
}

async fn used_memory(conn: &mut MultiplexedConnection) -> u64 {
    info_field(&info(conn, "memory").await, "used_memory")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run_all());
}

async fn run_all() {
    let headline = env_list("BENCH_CONCURRENCY", "1,8,32");
    let sweep = env_list("BENCH_SWEEP", "1,2,4,8,16,32,64");
    let max_ops = env_num("BENCH_OPS", 20_000);
    let max_time = Duration::from_secs(env_num("BENCH_SECS", 3));
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench-load.md".into());
    let svg = std::env::var("BENCH_SVG").unwrap_or_else(|_| "benches/throughput.svg".into());

    let server = redis_server::RedisServer::start();
    let port = server.port();
    let url = server.url();
    let store = RedisStore::builder()
        .prefix("bench")
        .connect(&url)
        .await
        .expect("connect RedisStore");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let server_info = info(&mut admin, "server").await;
    let version = server_info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Redis {version} on loopback, started by the command; {max_ops} requests or {} s per run, whichever ends first; {AMOUNT} cents per request; lease {} s.\n",
        max_time.as_secs(),
        LEASE_MS / 1000
    );

    // ---- 1. The crate against redis-benchmark, same script, same concurrency.
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(RESERVE_LUA)
        .query_async(&mut admin)
        .await
        .expect("SCRIPT LOAD");
    let have_rb = Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok();
    let _ = writeln!(
        md,
        "### RedisStore against redis-benchmark (same Lua script, EVALSHA)\n"
    );
    let _ = writeln!(
        md,
        "`reserve` is the crate's `RedisStore::reserve` alone (the hold stays in flight), the same work `redis-benchmark` does with the reserve script by EVALSHA; `reserve+commit` adds the commit script call. The ratio is crate `reserve` / `redis-benchmark`, both measured here, one after the other.\n"
    );
    let _ = writeln!(
        md,
        "| budgets | concurrency | crate reserve/s | p50 ms | p99 ms | crate reserve+commit/s | p50 ms | p99 ms | redis-benchmark EVALSHA/s | p50 ms | p99 ms | ratio crate/redis-benchmark |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut headline_ratio = Vec::new();
    for spread in [Spread::Hot, Spread::Many] {
        for &conc in &headline {
            flushall(&mut admin).await;
            let reserve = run_crate(
                &store, "r", spread, MAX_AMOUNT, false, conc, max_ops, max_time,
            )
            .await;
            flushall(&mut admin).await;
            let both = run_crate(
                &store, "rc", spread, MAX_AMOUNT, true, conc, max_ops, max_time,
            )
            .await;
            flushall(&mut admin).await;
            let rb_ops = ((reserve.rate() * 1.5) as u64)
                .clamp(5_000, 200_000)
                .min(max_ops * 2);
            let rb = if have_rb {
                redis_benchmark(port, &sha, spread, conc, rb_ops)
            } else {
                None
            };
            let (rb_rate, rb50, rb99, ratio) = match &rb {
                Some(rb) => {
                    let ratio = reserve.rate() / rb.rate();
                    headline_ratio.push((spread.name(), conc, ratio));
                    (
                        format!("{:.0}", rb.rate()),
                        format!("{:.2}", rb_pct(rb, 0.5)),
                        format!("{:.2}", rb_pct(rb, 0.99)),
                        format!("**{ratio:.2}**"),
                    )
                }
                None => ("n/a".into(), "".into(), "".into(), "n/a".into()),
            };
            let _ = writeln!(
                md,
                "| {} | {conc} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {rb_rate} | {rb50} | {rb99} | {ratio} |",
                spread.name(),
                reserve.rate(),
                reserve.pct(0.5),
                reserve.pct(0.99),
                both.rate(),
                both.pct(0.5),
                both.pct(0.99),
            );
            eprintln!("crate vs redis-benchmark: {} c={conc} done", spread.name());
        }
    }

    // ---- 2. Commands per request.
    flushall(&mut admin).await;
    let n = 1_000u64;
    // Load the scripts once (a first call may cost a SCRIPT LOAD), then count.
    let warm = Reservation::builder()
        .claim(Claim::spend(Budget::new("cmd-warm", 1_000), AMOUNT))
        .build()
        .unwrap();
    store.reserve(&warm).await.unwrap();
    store.commit(warm.id()).await.unwrap();
    store
        .release(&tower_reserve::HoldId::random())
        .await
        .unwrap();
    let granted = count_commands(&store, &mut admin, "cmd-ok", MAX_AMOUNT, Path::Commit, n).await;
    let released =
        count_commands(&store, &mut admin, "cmd-ok2", MAX_AMOUNT, Path::Release, n).await;
    let denied = count_commands(&store, &mut admin, "cmd-full", 50, Path::Denied, n).await;
    let _ = writeln!(
        md,
        "\n### Redis commands per request (`INFO commandstats`, {n} requests each)\n"
    );
    let _ = writeln!(
        md,
        "| path | commands sent/request (round trips) | all commands/request, scripts' own included | which |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | --- |");
    for (name, counts) in [
        ("granted, committed (reserve + commit)", &granted),
        ("granted, released (reserve + release)", &released),
        ("denied (reserve only)", &denied),
    ] {
        let (per, which) = describe(counts, n);
        let sent = client_calls(counts, n);
        let _ = writeln!(md, "| {name} | {sent:.2} | {per:.2} | {which} |");
    }

    // ---- 3. Memory per hold in flight and per owned value.
    let holds = 100_000u64;
    flushall(&mut admin).await;
    let before = used_memory(&mut admin).await;
    let _ = run_crate(
        &store,
        "mem",
        Spread::Hot,
        MAX_AMOUNT,
        false,
        32,
        holds,
        Duration::from_secs(300),
    )
    .await;
    let after = used_memory(&mut admin).await;
    let keys_holds: u64 = redis::cmd("DBSIZE").query_async(&mut admin).await.unwrap();
    let per_hold = (after.saturating_sub(before)) as f64 / holds as f64;

    flushall(&mut admin).await;
    let owned_store = RedisStore::builder()
        .prefix("bench")
        .retain(Duration::from_millis(1))
        .connect(&url)
        .await
        .unwrap();
    let before = used_memory(&mut admin).await;
    let next = Arc::new(AtomicU64::new(0));
    let owned_store2 = owned_store.clone();
    let _ = drive(32, holds, Duration::from_secs(300), move |_| {
        let store = owned_store2.clone();
        let i = next.fetch_add(1, Ordering::Relaxed);
        async move {
            let r = Reservation::builder()
                .claim(Claim::own(
                    Unique::email("accounts", &format!("user{i}@example.com")),
                    format!("acct-{i}"),
                ))
                .build()
                .unwrap();
            assert!(matches!(store.reserve(&r).await, Ok(Reserved::Granted(_))));
            store.commit(r.id()).await.unwrap();
            (true, 0, false)
        }
    })
    .await;
    // The settled records expire 1 ms after the commit: let Redis remove them (SCAN deletes the
    // expired keys it meets), so what is left is what an owned value costs for good.
    let settle_by = Instant::now() + Duration::from_secs(20);
    let mut keys_owned: u64;
    loop {
        let mut cursor = 0u64;
        loop {
            let (next, _keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut admin)
                .await
                .unwrap();
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys_owned = redis::cmd("DBSIZE").query_async(&mut admin).await.unwrap();
        if keys_owned <= holds || Instant::now() > settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = used_memory(&mut admin).await;
    let per_value = (after.saturating_sub(before)) as f64 / holds as f64;
    let _ = writeln!(
        md,
        "\n### Redis memory (`INFO memory` `used_memory`, before and after {holds})\n"
    );
    let _ = writeln!(md, "| what | bytes each | keys each | target |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    let _ = writeln!(
        md,
        "| hold in flight (one spend claim, one budget) | {per_hold:.0} | {:.2} | < 200 |",
        keys_holds as f64 / holds as f64
    );
    let _ = writeln!(
        md,
        "| owned unique value (e-mail, committed, settled record expired) | {per_value:.0} | {:.2} | < 150 |",
        keys_owned as f64 / holds as f64
    );

    // ---- 4. The hand-written ways against the crate, same budgets, same load.
    // Each budget's limit is half of what its requests ask for on average, so half should be
    // refused; whatever is spent above the limit is the race.
    let _ = writeln!(
        md,
        "\n### The crate against check-then-act and WATCH/MULTI/EXEC\n"
    );
    let _ = writeln!(
        md,
        "Every request asks {AMOUNT} cents. One hot budget: its limit is half of what the run's requests ask ({} cents). 10,000 budgets: each limit is {AMOUNT} cents (one request), requests spread at random. The crate reserves then commits; check-then-act does `GET` then `INCRBY`; optimistic does `WATCH`, `GET`, `MULTI`/`INCRBY`/`EXEC`, retried up to {MAX_RETRIES} times. Each hand-written task has its own connection (as from a pool); the crate shares its one multiplexed connection.\n",
        max_ops / 2 * AMOUNT
    );
    let _ = writeln!(
        md,
        "| budgets | way | concurrency | requests/s | p50 ms | p99 ms | granted | cents over the limit | retries | gave up |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut plot: Vec<(&str, Vec<(usize, f64)>)> = vec![
        ("tower-reserve (RedisStore)", Vec::new()),
        ("check-then-act (GET, INCRBY)", Vec::new()),
        ("optimistic (WATCH/MULTI/EXEC)", Vec::new()),
    ];
    let mut over = Vec::new();
    for spread in [Spread::Hot, Spread::Many] {
        let concs: Vec<usize> = if spread == Spread::Hot {
            sweep.clone()
        } else {
            vec![*headline.last().unwrap_or(&32)]
        };
        for &conc in &concs {
            for (k, way) in ["crate", "check-then-act", "optimistic"].iter().enumerate() {
                flushall(&mut admin).await;
                let limit = match spread {
                    Spread::Hot => max_ops / 2 * AMOUNT,
                    Spread::Many => AMOUNT,
                };
                let run = match k {
                    0 => {
                        run_crate(&store, "cmp", spread, limit, true, conc, max_ops, max_time).await
                    }
                    1 => {
                        run_hand(
                            &client,
                            Hand::CheckThenAct,
                            "cmp",
                            spread,
                            limit,
                            conc,
                            max_ops,
                            max_time,
                        )
                        .await
                    }
                    _ => {
                        run_hand(
                            &client,
                            Hand::Optimistic,
                            "cmp",
                            spread,
                            limit,
                            conc,
                            max_ops,
                            max_time,
                        )
                        .await
                    }
                };
                if spread == Spread::Hot {
                    plot[k].1.push((conc, run.rate()));
                }
                over.push((spread.name(), *way, conc, run.over_cents, run.rate()));
                let _ = writeln!(
                    md,
                    "| {} | {way} | {conc} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
                    spread.name(),
                    run.rate(),
                    run.pct(0.5),
                    run.pct(0.99),
                    run.granted,
                    run.over_cents,
                    run.retries,
                    run.gave_up
                );
                eprintln!("compare: {} {way} c={conc} done", spread.name());
            }
        }
    }

    // Summary lines for the top of BENCHMARKS.md.
    let mut summary = String::new();
    for (spread, conc, ratio) in &headline_ratio {
        let _ = writeln!(
            summary,
            "- crate `reserve` / `redis-benchmark` EVALSHA, {spread}, {conc} concurrent: **{ratio:.2}** (target 0.7)"
        );
    }
    let (g, _) = describe(&granted, n);
    let (d, _) = describe(&denied, n);
    let _ = writeln!(
        summary,
        "- Redis commands sent per granted request (reserve + commit): **{:.2}** script calls ({g:.2} counting the commands the scripts run); per denied request: **{:.2}** ({d:.2})",
        client_calls(&granted, n),
        client_calls(&denied, n)
    );
    let _ = writeln!(
        summary,
        "- Redis memory per hold in flight: **{per_hold:.0} B** (target < 200); per owned unique value: **{per_value:.0} B** (target < 150)"
    );
    let worst = |way: &str| {
        over.iter()
            .filter(|o| o.1 == way)
            .map(|o| o.3)
            .max()
            .unwrap_or(0)
    };
    let _ = writeln!(
        summary,
        "- cents granted above the limit, worst run: crate **{}**, check-then-act **{}**, WATCH/MULTI/EXEC **{}**",
        worst("crate"),
        worst("check-then-act"),
        worst("optimistic")
    );

    let report = format!("{summary}\n{md}");
    std::fs::write(&out, &report).expect("write the load report");
    println!("{report}\n(written to {out})");

    draw(&svg, &plot).expect("draw the plot");
    println!("(plot written to {svg})");
}

fn draw(
    path: &str,
    series: &[(&str, Vec<(usize, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let max_c = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .max()
        .unwrap_or(64)
        .max(2) as f64;
    let max_y = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Budget reservations on one hot budget (Redis, loopback)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..max_c).log_scale(), 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("concurrent tasks (log scale)")
        .y_desc("requests per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
    ];
    for ((name, points), color) in series.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(c, r)| (c as f64, r)),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&(c, r)| Circle::new((c as f64, r), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
