//! What the layer costs in-process: one trivial handler called bare and through `ReserveLayer`.
//!
//! - `instant_*`: a store that answers at once (no I/O, no lock): the layer's own cost
//!   (body read, extraction, reservation building, hold bookkeeping, settling);
//! - `memory_*`: the embedded `MemoryStore`;
//! - `redis_*`: `RedisStore` on a loopback `redis-server` this bench starts (skipped, with a
//!   note, when `redis-server` is not installed).
//!
//! Besides criterion's own output, writes a Markdown table (ns per request, ratio to bare,
//! heap allocations per request) to `$BENCH_OUT` (default `target/bench-overhead.md` in the
//! workspace).
//!
//! ```text
//! cargo bench -p tower-reserve-benches --bench overhead
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
use tower::{Service, ServiceExt, service_fn};
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
            instant,
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
            memory,
            from_json,
            ok,
            json_request,
        ),
    ];
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

    write_report(&cases, &allocs, redis_server.is_some());
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

fn write_report(cases: &[Case], all_allocs: &[f64], with_redis: bool) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| case | what | ns/request (median) | layer's cost (ns) | ratio to bare | allocations/request (bare) |"
    );
    let _ = writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: |");
    for (case, allocs) in cases.iter().zip(all_allocs) {
        let ns = median_ns(case.name);
        let bare_ns = median_ns(case.bare);
        let bare_allocs = cases
            .iter()
            .position(|c| c.name == case.bare)
            .map_or(0.0, |i| all_allocs[i]);
        let fmt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.0}"));
        let cost = ns.zip(bare_ns).map(|(n, b)| n - b);
        let ratio = ns
            .zip(bare_ns)
            .map_or("n/a".to_owned(), |(n, b)| format!("{:.1}x", n / b));
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {:.1} ({:.1}) |",
            case.name,
            case.what,
            fmt(ns),
            if case.name == case.bare {
                "-".to_owned()
            } else {
                fmt(cost)
            },
            ratio,
            allocs,
            bare_allocs
        );
    }
    if !with_redis {
        md.push_str("\n`redis-server` was not found: the Redis cases were skipped.\n");
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
