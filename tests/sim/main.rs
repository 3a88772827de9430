//! A seeded simulator in the spirit of TigerBeetle's VOPR, FoundationDB's simulation testing and
//! Jepsen: random, colliding operations on every store, the store's clock moved across every
//! boundary (lease ends, the 100 ms buckets, retentions, window ends), faults caused for real on
//! Redis (`CLIENT KILL`, `CLIENT PAUSE` past the client's time limit, `SIGSTOP` of a node past a
//! lease, `FUNCTION FLUSH`, a restart, a slot moved key by key), and after every step a reference
//! model that says what every answer, budget and owner must be.
//!
//! - `cargo test --all-features --test sim`: a bounded run on the embedded store, one node and a
//!   3-primary Cluster, every fault included, on the same seeds every time (`SIM_RANDOM=1` draws
//!   fresh ones). Its pauses and stops last twice the client's time limit or more, so that what
//!   they catch always times out; a long run also draws lengths around the limit.
//! - `SIM_SEED=<seed> cargo test --all-features --test sim -- sim_redis`: replays one seed (each
//!   failure prints its own command).
//! - `SIM_SECONDS=3600`: runs seeds until the time is up (each of the three tests; pick one with
//!   its name). `SIM_STEPS` sets the steps per seed, `SIM_FAULTS=0` turns faults off,
//!   `SIM_KEEP_GOING=1` runs on past failures and lists every failing seed at the end, and
//!   `SIM_WITHOUT=window-refunds,faults:stop` leaves parts out, to look past a known failure.
//!
//! `sim_layer_memory` and `sim_layer_redis` do the same through the layer (`layer.rs`): keyed
//! requests, their replays and what they charge.
//!
//! `sim_scenarios_*` replay the histories it found, shrunk and written out (`scenarios.rs`), on
//! each store: the same steps every time, so that what they caught stays caught.
//!
//! A failure prints its seed, the history up to it, then the shortest history the shrinker found
//! that still fails (operations removed while the failure stays), and the command that replays
//! the seed.

mod env;
mod generate;
mod layer;
mod model;
mod run;
mod scenarios;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tower_reserve::{MemoryStore, RedisStore};

use env::Env;
use generate::{Gen, Kind, Op};
use model::Model;
use run::{Failure, Sim, Universe, shape};
use support::Advance;
use support::redis_server::{RedisCluster, RedisServer};

struct Config {
    seeds: Vec<u64>,
    until: Option<Instant>,
    cases: usize,
    steps: usize,
    faults: bool,
    keep_going: bool,
    shrink_for: Duration,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The bounded run (`scripts/test`, CI) draws its seeds from here, the same every time, so that
/// it passes or fails by the code alone, never by the draw; a long run (`SIM_SECONDS`) or
/// `SIM_RANDOM=1` draws fresh ones.
const BOUNDED_SEEDS: u64 = 0x5eed_0000;

impl Config {
    fn bounded(&self) -> bool {
        self.until.is_none() && env_u64("SIM_RANDOM") != Some(1)
    }
}

fn config(cases: usize, steps: usize) -> Config {
    let seeds = env_u64("SIM_SEED").into_iter().collect();
    Config {
        seeds,
        until: env_u64("SIM_SECONDS").map(|s| Instant::now() + Duration::from_secs(s)),
        cases: env_u64("SIM_CASES").map_or(cases, |c| c as usize),
        steps: env_u64("SIM_STEPS").map_or(steps, |s| s as usize),
        faults: env_u64("SIM_FAULTS") != Some(0),
        keep_going: env_u64("SIM_KEEP_GOING") == Some(1),
        shrink_for: Duration::from_secs(env_u64("SIM_SHRINK_SECONDS").unwrap_or(20)),
    }
}

/// The seeds to run, each drawn when the one before has run: those `SIM_SEED` names; else, until
/// `SIM_SECONDS` is up (one at least), fresh ones; else `cases` of them, the bounded run's own
/// (fresh ones with `SIM_RANDOM=1`).
fn seeds(cfg: &Config) -> impl Iterator<Item = u64> + use<> {
    let fixed = cfg.seeds.clone();
    let (bounded, until, cases) = (cfg.bounded(), cfg.until, cfg.cases);
    let mut n = 0;
    std::iter::from_fn(move || {
        n += 1;
        if !fixed.is_empty() {
            return fixed.get(n - 1).copied();
        }
        let more = match until {
            Some(until) => n == 1 || Instant::now() < until,
            None => n <= cases,
        };
        if !more {
            return None;
        }
        Some(if bounded {
            BOUNDED_SEEDS + n as u64
        } else {
            rand::rng().random()
        })
    })
}

/// The settings that shape generation, to replay a seed as it ran (a seed of a long run with
/// `SIM_RANDOM=1`, which draws the long run's fault lengths).
fn replay_env() -> String {
    let mut env: String = ["SIM_STEPS", "SIM_FAULTS", "SIM_WITHOUT"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} ")))
        .collect();
    if !generate::bounded() {
        env.push_str("SIM_RANDOM=1 ");
    }
    env
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The store a case runs against, fresh (its own keys), with the case's retention.
async fn run_with(
    env: &mut Env,
    kind: Kind,
    retain_ms: u64,
    faults: bool,
    plan: Plan<'_>,
) -> Outcome {
    let retain = Duration::from_millis(retain_ms);
    // Under faults, a client time limit shorter than a `CLIENT PAUSE`: calls time out and their
    // writes land afterwards.
    let timeout = Duration::from_millis(if faults { 600 } else { 5_000 });
    match kind {
        Kind::Memory => {
            let store = MemoryStore::with_test_clock().retain(retain);
            drive(store, env, retain_ms, plan).await
        }
        Kind::Node => {
            let url = match env {
                Env::Node(s) => s.url(),
                _ => unreachable!(),
            };
            let store = RedisStore::builder()
                .test_clock()
                .prefix(support::fresh("sim"))
                .retain(retain)
                .timeout(timeout)
                .connect(&url)
                .await
                .expect("connect to redis");
            drive(store, env, retain_ms, plan).await
        }
        Kind::Cluster => {
            let urls = match env {
                Env::Cluster(c) => c.urls(),
                _ => unreachable!(),
            };
            let store = RedisStore::builder()
                .test_clock()
                .prefix(support::fresh("sim"))
                .retain(retain)
                .timeout(timeout)
                .connect_cluster(urls)
                .await
                .expect("connect to the cluster");
            drive(store, env, retain_ms, plan).await
        }
    }
}

/// Generate from a seed, or replay a recorded history.
enum Plan<'a> {
    Generate {
        rng: Box<StdRng>,
        steps: usize,
        faults: bool,
        kind: Kind,
    },
    Replay(&'a [Op]),
}

struct Outcome {
    ops: Vec<Op>,
    history: Vec<String>,
    failure: Option<Failure>,
}

async fn drive<S: Advance>(store: S, env: &mut Env, retain_ms: u64, plan: Plan<'_>) -> Outcome {
    let mut shape = shape(retain_ms, matches!(env, Env::Cluster(_)));
    let u = Universe::new(&mut shape);
    let mut sim = Sim {
        store,
        env,
        worlds: vec![Model::new(shape.clone())],
        u,
        shift: 0,
        history: Vec::new(),
        record: true,
    };
    let mut ops = Vec::new();
    let census = !matches!(sim.env, Env::Memory);
    let failure = match plan {
        Plan::Generate {
            rng,
            steps,
            faults,
            kind,
        } => {
            let mut g = Gen::new(*rng, shape.holds, faults, kind);
            let mut failure = None;
            for i in 0..steps {
                let op = g.step(sim.model(), sim.now());
                ops.push(op.clone());
                if let Err(f) = sim.step(&op, i).await {
                    failure = Some(f);
                    break;
                }
            }
            failure
        }
        Plan::Replay(list) => {
            let mut failure = None;
            for (i, op) in list.iter().enumerate() {
                ops.push(op.clone());
                if let Err(f) = sim.step(op, i).await {
                    failure = Some(f);
                    break;
                }
            }
            failure
        }
    };
    let failure = match failure {
        None if census => sim.census(ops.len()).await.err(),
        f => f,
    };
    Outcome {
        ops,
        history: sim.history,
        failure,
    }
}

/// Removes operations (chunks, then one by one; a group's or fault's operations one by one)
/// while the history still fails, within a time budget. Answers the shortest failing history
/// and its transcript.
fn first_line(what: &str) -> &str {
    what.lines().next().unwrap_or("")
}

#[allow(clippy::too_many_arguments)]
async fn shrink(
    env: &mut Env,
    kind: Kind,
    retain_ms: u64,
    faults: bool,
    ops: Vec<Op>,
    original: &Failure,
    budget: Duration,
) -> Option<(Vec<Op>, Vec<String>, Failure)> {
    let deadline = Instant::now() + budget;
    let mut best: Option<(Vec<Op>, Vec<String>, Failure)>;
    let mut cur = ops;
    // A shorter history counts only if it fails the same way: at the same operation (or the
    // same audit read), so that shrinking never trades the failure for another one.
    let fails = async |env: &mut Env, cand: &[Op]| {
        let out = run_with(env, kind, retain_ms, faults, Plan::Replay(cand)).await;
        out.failure
            .filter(|f| first_line(&f.what) == first_line(&original.what))
            .map(|f| (out.ops, out.history, f))
    };
    // The recorded history must fail again first.
    match fails(env, &cur).await {
        Some(found) => {
            cur = found.0.clone();
            best = Some(found);
        }
        None => return None,
    }
    let mut chunk = cur.len().div_ceil(2);
    while chunk >= 1 && Instant::now() < deadline {
        let mut i = 0;
        let mut removed = false;
        while i < cur.len() && Instant::now() < deadline {
            let mut cand = cur[..i].to_vec();
            cand.extend_from_slice(&cur[(i + chunk).min(cur.len())..]);
            if let Some(found) = fails(env, &cand).await {
                cur = found.0.clone();
                best = Some(found);
                removed = true;
            } else {
                i += chunk;
            }
        }
        if !removed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2).min(chunk - 1).max(1);
        }
    }
    // Then the operations inside groups and faults, one at a time.
    let mut i = 0;
    while i < cur.len() && Instant::now() < deadline {
        let inner = match &cur[i] {
            Op::Together(ops) | Op::Fault(_, ops) => ops.clone(),
            _ => {
                i += 1;
                continue;
            }
        };
        let mut j = 0;
        let mut inner = inner;
        while j < inner.len() && Instant::now() < deadline {
            let mut fewer = inner.clone();
            fewer.remove(j);
            let mut cand = cur.clone();
            cand[i] = match &cur[i] {
                Op::Together(_) => Op::Together(fewer.clone()),
                Op::Fault(f, _) => Op::Fault(*f, fewer.clone()),
                _ => unreachable!(),
            };
            if let Some(found) = fails(env, &cand).await {
                cur = found.0.clone();
                best = Some(found);
                inner = fewer;
            } else {
                j += 1;
            }
        }
        i += 1;
    }
    best
}

fn simulate(name: &str, kind: Kind, cases: usize, steps: usize) {
    let cfg = config(cases, steps);
    let rt = runtime();
    let mut env = match kind {
        Kind::Memory => Env::Memory,
        Kind::Node => Env::Node(RedisServer::start()),
        Kind::Cluster => Env::Cluster(RedisCluster::start(3, 0)),
    };
    let faults = cfg.faults && kind != Kind::Memory;
    let started = Instant::now();
    let mut failed: Vec<(u64, String)> = Vec::new();
    let mut n = 0usize;
    let mut last_history = Vec::new();
    for seed in seeds(&cfg) {
        n += 1;
        eprintln!("{name}: seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let retain_ms = [1_500, 3_000, 5_000][rng.random_range(0..3)];
        let plan = Plan::Generate {
            rng: Box::new(rng),
            steps: cfg.steps,
            faults,
            kind,
        };
        let out = rt.block_on(run_with(&mut env, kind, retain_ms, faults, plan));
        last_history = out.history.clone();
        let Some(failure) = out.failure else { continue };
        let replay = format!(
            "{}SIM_SEED={seed} cargo test --all-features --test sim -- {name}",
            replay_env()
        );
        let mut report = format!(
            "\n=== {name}: seed {seed} fails at step {} (store retention {retain_ms} ms)\n{}\n--- history:\n{}\n",
            failure.step,
            failure.what,
            out.history.join("\n")
        );
        if cfg.shrink_for > Duration::ZERO {
            let shrunk = rt.block_on(shrink(
                &mut env,
                kind,
                retain_ms,
                faults,
                out.ops.clone(),
                &failure,
                cfg.shrink_for,
            ));
            match shrunk {
                Some((ops, history, f)) => {
                    report.push_str(&format!(
                        "--- shortest failing history found ({} steps of {}): fails at step {}\n{}\n{}\n",
                        ops.len(),
                        out.ops.len(),
                        f.step,
                        f.what,
                        history.join("\n")
                    ));
                }
                None => report.push_str(
                    "--- the recorded history passed when replayed (a timing-dependent failure)\n",
                ),
            }
        }
        report.push_str(&format!("--- replay: {replay}\n"));
        eprintln!("{report}");
        let first_line = failure.what.lines().next().unwrap_or("").to_owned();
        failed.push((seed, first_line));
        if !cfg.keep_going {
            break;
        }
    }
    if std::env::var("SIM_PRINT").is_ok() {
        eprintln!("{}", last_history.join("\n"));
    }
    eprintln!(
        "{name}: {n} seeds in {:.1} s, {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|(seed, what)| format!("  seed {seed}: {what}"))
            .collect();
        panic!(
            "{name}: the store disagrees with the model:\n{}\nreplay one with {}SIM_SEED=<seed> cargo test --all-features --test sim -- {name}",
            list.join("\n"),
            replay_env()
        );
    }
}

#[test]
fn sim_memory() {
    simulate("sim_memory", Kind::Memory, 40, 150);
}

#[test]
fn sim_redis() {
    simulate("sim_redis", Kind::Node, 10, 120);
}

#[test]
fn sim_cluster() {
    simulate("sim_cluster", Kind::Cluster, 6, 100);
}

/// Seeds through the layer, on one store; each case a fresh service and keys.
fn simulate_layer(name: &str, node: bool, cases: usize, steps: usize) {
    let cfg = config(cases, steps);
    let rt = runtime();
    let server = node.then(RedisServer::start);
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in seeds(&cfg) {
        eprintln!("{name}: seed {seed}");
        let retain = Duration::from_millis(layer::RETAIN_MS);
        let result = rt.block_on(async {
            match &server {
                None => {
                    let store = MemoryStore::with_test_clock().retain(retain);
                    layer::case(store, seed, cfg.steps, None).await
                }
                Some(server) => {
                    let store = RedisStore::builder()
                        .test_clock()
                        .prefix(support::fresh("sim"))
                        .retain(retain)
                        .timeout(Duration::from_millis(layer::STORE_TIMEOUT_MS))
                        .connect(&server.url())
                        .await
                        .expect("connect to redis");
                    let pause = cfg.faults.then(|| server.port());
                    layer::case(store, seed, cfg.steps, pause).await
                }
            }
        });
        if let Err(what) = result {
            eprintln!(
                "\n=== {name}: seed {seed} fails (store retention {} ms)\n{what}\n--- replay: {}SIM_SEED={seed} cargo test --all-features --test sim -- {name}\n",
                layer::RETAIN_MS,
                replay_env()
            );
            failed.push(format!(
                "  seed {seed}: {}",
                what.lines().next().unwrap_or("")
            ));
            if !cfg.keep_going {
                break;
            }
        }
    }
    eprintln!(
        "{name}: {} failed in {:.1} s",
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{name}: the layer broke a promise:\n{}\nreplay one with SIM_SEED=<seed> cargo test --all-features --test sim -- {name}",
        failed.join("\n")
    );
}

#[test]
fn sim_layer_memory() {
    simulate_layer("sim_layer_memory", false, 20, 60);
}

#[test]
fn sim_layer_redis() {
    simulate_layer("sim_layer_redis", true, 6, 60);
}

/// The written histories of `scenarios.rs`, each on a fresh universe of one store.
fn replay_scenarios(name: &str, kind: Kind) {
    let rt = runtime();
    let mut env = match kind {
        Kind::Memory => Env::Memory,
        Kind::Node => Env::Node(RedisServer::start()),
        Kind::Cluster => Env::Cluster(RedisCluster::start(3, 0)),
    };
    let mut failed = Vec::new();
    for (title, ops) in scenarios::all() {
        let out = rt.block_on(run_with(&mut env, kind, 3_000, false, Plan::Replay(&ops)));
        if let Some(f) = out.failure {
            failed.push(format!(
                "--- {title}: step {}: {}\n{}",
                f.step,
                f.what,
                out.history.join("\n")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} written histories fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn sim_scenarios_memory() {
    replay_scenarios("sim_scenarios_memory", Kind::Memory);
}

#[test]
fn sim_scenarios_redis() {
    replay_scenarios("sim_scenarios_redis", Kind::Node);
}

#[test]
fn sim_scenarios_cluster() {
    replay_scenarios("sim_scenarios_cluster", Kind::Cluster);
}
