//! What the layer costs in-process: one trivial handler called bare and through `ReserveLayer`.
//!
//! - `instant_*`: a store that answers at once (no I/O, no lock): the layer's own cost
//!   (body read, extraction, reservation building, hold bookkeeping, settling);
//! - `memory_*`: the embedded `MemoryStore`;
//! - `redis_*`: `RedisStore` on a loopback `redis-server` this bench starts (skipped, with a
//!   note, when `redis-server` is not installed);
//! - `route_*`: one axum route answering `"ok"`, bare, behind tower_governor (an in-memory GCRA
//!   rate limiter keyed by a header: the peer that users already run in front of a route), and
//!   behind `ReserveLayer` on the instant store and on `MemoryStore`, one spend claim from a
//!   header, committed on `200`.
//!   `route_memory_commit_metrics` is the last with the layer's metrics kept by a Prometheus
//!   recorder (the others record into none, as an app without one).
//!
//! Besides criterion's own output, every case is also timed in interleaved rounds (each round
//! runs every case in turn), by the CPU time of the bench's thread, so that a ratio compares
//! cases measured side by side even on a busy machine. Writes a Markdown table (ns per
//! request, ratio to bare, heap allocations per request) and the targets to `$BENCH_OUT`
//! (default `target/bench-overhead.md` in the workspace), and with `$BENCH_FACTS` set, the store's
//! and the layer's own CPU per request there, for `scripts/bench`'s breakdown of a purchase.
//!
//! ```text
//! cargo bench -p tower-reserve-benches --bench overhead
//! BENCH_PROFILE=route_memory_commit perf record -g target/release/deps/overhead-<hash> --bench
//! ```

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusBuilder;
use tower::{Service, ServiceExt, service_fn};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_reserve::{
    Budget, BudgetStatus, Claim, Denial, Error, Extracted, Grant, HoldId, MemoryStore, RedisStore,
    Refund, Reservation, ReserveLayer, Reserved, Settled, Settlement, Store, Unique, extract,
};

// ---------------------------------------------------------------------------------------------
// Counting allocator: heap allocations per request, bare and through the layer.

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no effect
// on the memory handed out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// The instant store: grants (or denies) at once, so what is measured is the layer alone.

#[derive(Clone)]
struct InstantStore {
    deny: bool,
    grant: Grant,
    denial: Denial,
}

impl InstantStore {
    /// `Grant` and `Denial` are `#[non_exhaustive]`: take one of each from a `MemoryStore` and
    /// hand out copies with the caller's id.
    async fn new(deny: bool) -> Self {
        let memory = MemoryStore::new();
        let reserve = |budget: Budget, amount: u64| {
            Reservation::builder()
                .claim(Claim::spend(budget, amount))
                .build()
                .unwrap()
        };
        let Ok(Reserved::Granted(grant)) = memory
            .reserve(&reserve(Budget::new("instant", 1_000_000), 100))
            .await
        else {
            panic!("the template grant")
        };
        let Ok(Reserved::Denied(denial)) = memory
            .reserve(&reserve(Budget::new("instant", 1_000_000), 2_000_000))
            .await
        else {
            panic!("the template denial")
        };
        Self {
            deny,
            grant,
            denial,
        }
    }
}

impl Store for InstantStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        if self.deny {
            return Ok(Reserved::Denied(self.denial.clone()));
        }
        let mut grant = self.grant.clone();
        grant.id = reservation.id().clone();
        Ok(Reserved::Granted(grant))
    }
    async fn check(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        self.reserve(reservation).await
    }
    async fn settle(&self, _id: &HoldId, _settlement: &Settlement) -> Result<Settled, Error> {
        Ok(Settled::Applied)
    }
    async fn refund(&self, _refund: &Refund) -> Result<Settled, Error> {
        unimplemented!("not used by the layer")
    }
    async fn extend(&self, _id: &HoldId, _lease: Duration) -> Result<u64, Error> {
        Ok(self.grant.expires_at_ms)
    }
    async fn budget(&self, _budget: &Budget) -> Result<BudgetStatus, Error> {
        unimplemented!("not used by the layer")
    }
    async fn set_spent(&self, _budget: &Budget, _spent: u64) -> Result<(), Error> {
        unimplemented!("not used by the layer")
    }
    async fn owner(&self, _value: &Unique) -> Result<Option<String>, Error> {
        unimplemented!("not used by the layer")
    }
    async fn remove(&self, _value: &Unique) -> Result<bool, Error> {
        unimplemented!("not used by the layer")
    }
}

// ---------------------------------------------------------------------------------------------
// Handler, requests, extractors.

type Req = Request<Full<Bytes>>;

/// The trivial handler: answers `status` with a two-byte body, whatever the request's body (a
/// bare request's, or the layer's `RequestBody`).
fn handler<B: Send + 'static>(
    status: StatusCode,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Request<B>| async move {
        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
        *response.status_mut() = status;
        Ok::<_, Infallible>(response)
    })
}

const LIMIT: u64 = tower_reserve::MAX_AMOUNT;

fn header_request() -> Req {
    Request::post("/purchases")
        .header("x-customer", "c-42")
        .header("x-amount", "100")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn json_request() -> Req {
    Request::post("/purchases")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"customer":"c-42","amount_cents":100}"#,
        )))
        .unwrap()
}

async fn from_header(req: Request<Bytes>) -> Extracted {
    let customer = extract::header(&req, "x-customer")?.to_owned();
    let amount: u64 = extract::header(&req, "x-amount")?.parse().unwrap_or(0);
    Extracted::Ok((
        req,
        vec![Claim::spend(Budget::new(customer, LIMIT), amount)],
    ))
}

async fn from_json(req: Request<Bytes>) -> Extracted {
    #[derive(serde::Deserialize)]
    struct Purchase {
        customer: String,
        amount_cents: u64,
    }
    let body: Purchase = extract::json(&req)?;
    Extracted::Ok((
        req,
        vec![Claim::spend(
            Budget::new(body.customer, LIMIT),
            body.amount_cents,
        )],
    ))
}

// ---------------------------------------------------------------------------------------------
// The cases.

type Call = Box<dyn Fn() -> futures_util::future::BoxFuture<'static, StatusCode>>;

/// One case: a name, what it measures, and a call that runs one request to its end.
struct Case {
    name: &'static str,
    what: &'static str,
    bare: &'static str,
    call: Call,
}

fn bare_case(name: &'static str, make: fn() -> Req) -> Case {
    let svc = handler(StatusCode::OK);
    Case {
        name,
        what: "no layer",
        bare: name,
        call: Box::new(move || {
            let svc = svc.clone();
            Box::pin(async move { svc.oneshot(make()).await.unwrap().status() })
        }),
    }
}

fn layered_case<St: Store, E: tower_reserve::ExtractClaims>(
    name: &'static str,
    what: &'static str,
    bare: &'static str,
    store: St,
    extract: E,
    status: StatusCode,
    make: fn() -> Req,
) -> Case {
    let svc = ReserveLayer::new(store, extract).layer_on(handler(status));
    Case {
        name,
        what,
        bare,
        call: Box::new(move || {
            let svc = svc.clone();
            Box::pin(async move { svc.oneshot(make()).await.unwrap().status() })
        }),
    }
}

/// `ReserveLayer::layer` under a shorter name, so the cases read as one line each.
trait LayerOn<S> {
    type Service;
    fn layer_on(&self, inner: S) -> Self::Service;
}

impl<S, L: tower::Layer<S>> LayerOn<S> for L {
    type Service = L::Service;
    fn layer_on(&self, inner: S) -> L::Service {
        self.layer(inner)
    }
}

/// tower_governor's key: the `x-customer` header, as the reserve cases read their budget's key.
#[derive(Clone)]
struct CustomerKey;

impl KeyExtractor for CustomerKey {
    type Key = String;

    fn extract<T>(&self, req: &Request<T>) -> Result<String, tower_governor::GovernorError> {
        req.headers()
            .get("x-customer")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// The axum route of the `route_*` cases: `POST /purchases` answering `"ok"`.
fn route() -> axum::routing::MethodRouter {
    axum::routing::post(|| async { "ok" })
}

/// One `route_*` case: the router's one route, as `axum::serve` runs it (its handlers turned
/// into services once, by `with_state`, not at every request).
fn route_case(name: &'static str, what: &'static str, router: axum::Router) -> Case {
    let router: axum::Router = router.with_state(());
    Case {
        name,
        what,
        bare: "route_bare",
        call: Box::new(move || {
            let router = router.clone();
            Box::pin(async move { router.oneshot(header_request()).await.unwrap().status() })
        }),
    }
}

/// The route behind `ReserveLayer` on `store`, claims from a header.
fn reserve_route<St: Store>(store: St) -> axum::Router {
    axum::Router::new().route(
        "/purchases",
        route().route_layer(ReserveLayer::new(store, from_header)),
    )
}

fn route_cases(instant: InstantStore, memory: MemoryStore) -> Vec<Case> {
    // A quota no request here reaches: what is measured is the check, never a refusal.
    let governor = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(CustomerKey)
        .finish()
        .expect("a valid governor configuration");
    vec![
        route_case(
            "route_bare",
            "no layer",
            axum::Router::new().route("/purchases", route()),
        ),
        route_case(
            "route_governor",
            "tower_governor keyed by a header (the peer)",
            axum::Router::new().route(
                "/purchases",
                route().route_layer(GovernorLayer::new(governor)),
            ),
        ),
        route_case(
            "route_instant_commit",
            "instant store, claims from a header, 2xx: grant + commit",
            reserve_route(instant),
        ),
        route_case(
            "route_memory_commit",
            "MemoryStore, claims from a header, grant + commit",
            reserve_route(memory.clone()),
        ),
        recorded_route_case(
            "route_memory_commit_metrics",
            "the same, its metrics kept by a Prometheus recorder",
            reserve_route(memory),
        ),
    ]
}

/// A `route_*` case whose metrics go to a Prometheus recorder (metrics-exporter-prometheus, its
/// defaults), set for this case alone: the other cases record nothing, as an app without a
/// recorder. No upkeep runs here, so what is timed is the recording itself, the same whether the
/// histogram is later kept as a summary or in buckets.
fn recorded_route_case(name: &'static str, what: &'static str, router: axum::Router) -> Case {
    let router: axum::Router = router.with_state(());
    let recorder: &'static metrics_exporter_prometheus::PrometheusRecorder =
        Box::leak(Box::new(PrometheusBuilder::new().build_recorder()));
    Case {
        name,
        what,
        bare: "route_bare",
        call: Box::new(move || {
            let mut call = Box::pin(router.clone().oneshot(header_request()));
            Box::pin(async move {
                // The recorder is this thread's for each poll, so none other sees it.
                let response = std::future::poll_fn(|cx| {
                    metrics::with_local_recorder(recorder, || call.as_mut().poll(cx))
                })
                .await;
                response.unwrap().status()
            })
        }),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let instant = rt.block_on(InstantStore::new(false));
    let instant_deny = rt.block_on(InstantStore::new(true));
    let memory = MemoryStore::new().retain(Duration::from_secs(1));

    let redis_server = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
        .then(redis_server::RedisServer::start);
    let redis = redis_server.as_ref().map(|server| {
        rt.block_on(
            RedisStore::builder()
                .prefix("overhead")
                .retain(Duration::from_secs(1))
                .connect(&server.url()),
        )
        .expect("connect to the bench's redis-server")
    });

    let ok = StatusCode::OK;
    let declined = StatusCode::PAYMENT_REQUIRED;
    let mut cases = vec![
        bare_case("bare_header", header_request),
        bare_case("bare_json", json_request),
        layered_case(
            "instant_header_commit",
            "instant store, claims from a header, 2xx: grant + commit",
            "bare_header",
            instant.clone(),
            from_header,
            ok,
            header_request,
        ),
        layered_case(
            "instant_header_release",
            "instant store, claims from a header, 402: grant + release",
            "bare_header",
            instant.clone(),
            from_header,
            declined,
            header_request,
        ),
        layered_case(
            "instant_header_deny",
            "instant store, claims from a header, denied (403, handler not run)",
            "bare_header",
            instant_deny,
            from_header,
            ok,
            header_request,
        ),
        layered_case(
            "instant_json_commit",
            "instant store, claims from a JSON body, 2xx: grant + commit",
            "bare_json",
            instant.clone(),
            from_json,
            ok,
            json_request,
        ),
        layered_case(
            "memory_header_commit",
            "MemoryStore, claims from a header, grant + commit",
            "bare_header",
            memory.clone(),
            from_header,
            ok,
            header_request,
        ),
        layered_case(
            "memory_header_release",
            "MemoryStore, claims from a header, grant + release",
            "bare_header",
            memory.clone(),
            from_header,
            declined,
            header_request,
        ),
        layered_case(
            "memory_json_commit",
            "MemoryStore, claims from a JSON body, grant + commit",
            "bare_json",
            memory.clone(),
            from_json,
            ok,
            json_request,
        ),
    ];
    cases.extend(route_cases(instant, memory));
    if let Some(redis) = redis {
        cases.push(layered_case(
            "redis_header_commit",
            "RedisStore (loopback), claims from a header, grant + commit",
            "bare_header",
            redis.clone(),
            from_header,
            ok,
            header_request,
        ));
        cases.push(layered_case(
            "redis_header_release",
            "RedisStore (loopback), claims from a header, grant + release",
            "bare_header",
            redis,
            from_header,
            declined,
            header_request,
        ));
    }

    // `BENCH_PROFILE=<case>`: only that case, in a loop for 10 s (`BENCH_PROFILE_SECONDS`), for a
    // profiler to watch (`perf record -g`, callgrind): where its time goes, without the other
    // cases in the picture. It prints how many requests it made, to divide a count by.
    if let Ok(name) = std::env::var("BENCH_PROFILE") {
        let case = cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"));
        let seconds = std::env::var("BENCH_PROFILE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let requests = rt.block_on(async {
            let until = std::time::Instant::now() + Duration::from_secs(seconds);
            let mut requests = 0u64;
            while std::time::Instant::now() < until {
                for _ in 0..1_000 {
                    (case.call)().await;
                }
                requests += 1_000;
            }
            requests
        });
        println!("requests={requests}");
        return;
    }

    // Sanity: every case answers what it should before it is timed.
    for case in &cases {
        let status = rt.block_on((case.call)());
        let expected = match case.name {
            n if n.ends_with("deny") => StatusCode::FORBIDDEN,
            n if n.ends_with("release") => declined,
            _ => ok,
        };
        assert_eq!(status, expected, "{}", case.name);
    }

    let mut criterion = Criterion::default()
        .output_directory(&criterion_home())
        .configure_from_args()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    {
        let mut group = criterion.benchmark_group("overhead");
        for case in &cases {
            group.bench_function(case.name, |b| {
                b.to_async(&rt).iter(|| (case.call)());
            });
        }
        group.finish();
    }
    criterion.final_summary();

    let cpu = Rounds::measure(&rt, &cases);

    // Heap allocations per request, outside criterion (steady state: after a warm-up).
    let allocs: Vec<f64> = cases
        .iter()
        .map(|case| {
            rt.block_on(async {
                for _ in 0..200 {
                    (case.call)().await;
                }
                let n = 2_000;
                let before = ALLOCS.load(Ordering::Relaxed);
                for _ in 0..n {
                    (case.call)().await;
                }
                (ALLOCS.load(Ordering::Relaxed) - before) as f64 / n as f64
            })
        })
        .collect();

    write_report(&cases, &cpu, &allocs, redis_server.is_some());
}

/// Rounds of the interleaved timing, and requests per case in each.
const ROUNDS: usize = 15;
const ROUND_REQUESTS: usize = 10_000;

/// The CPU time this thread has used, in nanoseconds: what a request costs, whatever else the
/// machine runs meanwhile (wall time on a shared machine counts the others' turns too).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write into.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One round's CPU ns per request, by case index.
type Round<'a> = &'a dyn Fn(usize) -> f64;

/// CPU ns per request of each case in each round ([`ROUNDS`] rounds, each running every case
/// in turn; the Redis cases, whose cost is mostly Redis's, are left out).
struct Rounds(Vec<Vec<f64>>);

impl Rounds {
    fn measure(rt: &tokio::runtime::Runtime, cases: &[Case]) -> Self {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        rt.block_on(async {
            for _ in 0..ROUNDS {
                for (i, case) in cases.iter().enumerate() {
                    if case.name.starts_with("redis") {
                        continue;
                    }
                    let start = thread_cpu_ns();
                    for _ in 0..ROUND_REQUESTS {
                        (case.call)().await;
                    }
                    let ns = (thread_cpu_ns() - start) as f64 / ROUND_REQUESTS as f64;
                    samples[i].push(ns);
                }
            }
        });
        Self(samples)
    }

    /// The median over the rounds of `f` of one round's figures (indexed like the cases):
    /// a ratio taken within each round, then the median, so that a busy moment of the machine
    /// slows both sides of a ratio alike.
    fn median_of(&self, f: impl Fn(Round<'_>) -> f64) -> Option<f64> {
        let rounds = self.0.iter().map(Vec::len).max()?;
        let mut values: Vec<f64> = (0..rounds)
            .map(|r| f(&|case: usize| self.0[case].get(r).copied().unwrap_or(f64::NAN)))
            .filter(|v| v.is_finite())
            .collect();
        values.sort_by(f64::total_cmp);
        (!values.is_empty()).then(|| values[values.len() / 2])
    }

    fn median(&self, case: usize) -> Option<f64> {
        self.median_of(|ns| ns(case))
    }
}

/// The workspace's target directory (a bench runs in its package's directory, not the
/// workspace's).
fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    )
}

/// Where criterion keeps its results: `$CRITERION_HOME`, or `criterion` in the target directory.
fn criterion_home() -> std::path::PathBuf {
    std::env::var_os("CRITERION_HOME")
        .map_or_else(|| target_dir().join("criterion"), std::path::PathBuf::from)
}

/// Criterion's median estimate of one case, in nanoseconds.
fn median_ns(name: &str) -> Option<f64> {
    let file = criterion_home().join(format!("overhead/{name}/new/estimates.json"));
    let text = std::fs::read_to_string(file).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.pointer("/median/point_estimate")?.as_f64()
}

fn write_report(cases: &[Case], cpu: &Rounds, all_allocs: &[f64], with_redis: bool) {
    let index = |name: &str| cases.iter().position(|c| c.name == name);
    let cpu_of = |name: &str| index(name).and_then(|i| cpu.median(i));
    let allocs_of = |name: &str| index(name).map_or(0.0, |i| all_allocs[i]);
    let fmt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.0}"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| case | what | ns/request (criterion median) | CPU ns/request (interleaved median) | layer's cost (CPU ns) | ratio to bare (CPU) | allocations/request (bare) |"
    );
    let _ = writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, case) in cases.iter().enumerate() {
        let ns = cpu.median(i);
        let bare_ns = cpu_of(case.bare);
        let cost = ns.zip(bare_ns).map(|(n, b)| n - b);
        let ratio = ns
            .zip(bare_ns)
            .map_or("n/a".to_owned(), |(n, b)| format!("{:.2}x", n / b));
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {:.1} ({:.1}) |",
            case.name,
            case.what,
            fmt(median_ns(case.name)),
            fmt(ns),
            if case.name == case.bare {
                "-".to_owned()
            } else {
                fmt(cost)
            },
            ratio,
            all_allocs[i],
            allocs_of(case.bare)
        );
    }
    if !with_redis {
        md.push_str("\n`redis-server` was not found: the Redis cases were skipped.\n");
    }

    // The targets, each a ratio of cases of this run, taken within each round.
    let added = |name: &str, bare: &str| cpu_of(name).zip(cpu_of(bare)).map(|(n, b)| n - b);
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let _ = writeln!(md, "\n| target | measured in this run | |");
    let _ = writeln!(md, "| --- | --- | --- |");
    if let (Some(reserve), Some(governor), Some(bare), Some(memory), Some(peer)) = (
        added("route_memory_commit", "route_bare"),
        added("route_governor", "route_bare"),
        index("route_bare"),
        index("route_memory_commit"),
        index("route_governor"),
    ) {
        let times = cpu
            .median_of(|ns| (ns(memory) - ns(bare)) / (ns(peer) - ns(bare)))
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| `ReserveLayer` + `MemoryStore` (one claim, commit) adds ≤ 3 × what tower_governor adds on the same axum route | {reserve:.0} ns against {governor:.0} ns (medians); per round, **{times:.2} ×** (median) | {} |",
            verdict(times <= 3.0)
        );
    }
    for (name, bare) in [
        ("memory_header_commit", "bare_header"),
        ("route_memory_commit", "route_bare"),
    ] {
        let layer = allocs_of(name) - allocs_of(bare);
        let _ = writeln!(
            md,
            "| ≤ 12 allocations per request on the commit path (`{name}` less `{bare}`) | **{layer:.1}** ({:.1} against {:.1}) | {} |",
            allocs_of(name),
            allocs_of(bare),
            verdict(layer <= 12.0)
        );
    }
    for (name, bare) in [
        ("instant_header_commit", "bare_header"),
        ("route_instant_commit", "route_bare"),
    ] {
        if let (Some(n), Some(b), Some(i), Some(j)) =
            (cpu_of(name), cpu_of(bare), index(name), index(bare))
        {
            let ratio = cpu.median_of(|ns| ns(i) / ns(j)).unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| the instant-store row ≤ 1.5 × the bare row (`{name}` / `{bare}`) | {n:.0} ns against {b:.0} ns (medians); per round, **{ratio:.2} ×** (median) | {} |",
                verdict(ratio <= 1.5)
            );
        }
    }
    // `key=value` lines for scripts/bench: the store's and the layer's own shares of a purchase.
    if let Ok(facts) = std::env::var("BENCH_FACTS") {
        let mut text = String::new();
        for (key, name, bare) in [
            ("store_ns", "route_memory_commit", "route_instant_commit"),
            ("layer_ns", "route_instant_commit", "route_bare"),
            ("governor_ns", "route_governor", "route_bare"),
        ] {
            if let Some(ns) = added(name, bare) {
                let _ = writeln!(text, "{key}={ns:.0}");
            }
        }
        std::fs::write(&facts, text).expect("write the overhead facts");
    }
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| {
        target_dir()
            .join("bench-overhead.md")
            .to_string_lossy()
            .into_owned()
    });
    std::fs::write(&out, &md).expect("write the overhead report");
    println!("\n{md}\n(written to {out})");
}
