//! A metered API: every API key has a monthly budget of credits. A job reserves the most it may
//! cost before it runs, measures what it used, and commits only that; the rest goes back in the
//! same step. Hundreds of jobs at once on one key never spend a credit above the limit.
//!
//! ```text
//! cargo run --release -p metered_api
//! curl -i -X POST localhost:3003/jobs -H 'x-api-key: free_ann' \
//!      -H 'content-type: application/json' -d '{"task": "resize", "max_units": 50, "units": 37}'
//! curl -s localhost:3003/usage -H 'x-api-key: free_ann'
//! ```
//!
//! # Environment
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `METERED_ADDR` | address to listen on | `127.0.0.1:3003` |
//! | `REDIS_URL` | one Redis node | unset: the embedded in-memory store |
//! | `REDIS_CLUSTER_URLS` | comma-separated Redis Cluster seed nodes | unset |
//!
//! The first line on standard output names the store; Redis keys carry the prefix `metered`. A
//! Redis that cannot be reached at start (or both Redis variables set) stops the API with a
//! message on standard error and status 1. Once it accepts connections it prints
//! `listening on http://<addr>`.
//!
//! # API keys and prices
//!
//! An API key is `<plan>_<name>`, the name 1 to 64 letters, digits, `-` or `_` (a stand-in for a
//! table of issued keys). Its plan sets its monthly credits:
//!
//! | plan | credits a month (UTC calendar month) |
//! | --- | --- |
//! | `free` | 1 000 |
//! | `pro` | 100 000 |
//!
//! A job runs a task, priced per unit: `resize` 2 credits, `embed` 1, `transcode` 10.
//!
//! # Endpoints
//!
//! Every request carries its key in `x-api-key`. Every error is `application/problem+json`
//! (RFC 9457).
//!
//! `POST /jobs` with `{"task": "resize", "max_units": 50, "units": 37}` (`content-type:
//! application/json`, at most 64 KiB): reserves `max_units` × price (the most the job may cost),
//! runs the job, and commits what it used, `units` × price. (`units` stands in for what a real
//! job measures as it runs: how many it used is known only at its end.)
//!
//! | what happens | status |
//! | --- | --- |
//! | the job ran | `200` `{"job_id", "task", "units", "cost", "max_cost"}`; `cost` spent, the rest of `max_cost` back |
//! | it used nothing (`units` 0) | `200` with `cost` 0; nothing spent |
//! | it used more than it reserved (`units` > `max_units`) | `422` *Job exceeded its reservation*; nothing spent |
//! | the key has less than `max_cost` left | `403` with `requested` and `remaining`; the job does not run |
//! | no `x-api-key`, or not a key of a plan | `401` |
//! | the body is not JSON (by its `content-type`) | `415` |
//! | malformed JSON | `400` |
//! | a member missing or of the wrong type, an unknown `task`, `max_units` not 1 to 1 000 000 | `422` |
//! | a body above 64 KiB | `413` |
//! | the store unavailable | `503` with `Retry-After` |
//!
//! A `200` carries the IETF draft's remaining-budget headers for the key's credits, after this
//! job's commit: `RateLimit-Policy: "/jobs";q=<monthly credits>;qu="units";pk=:<k>:` and
//! `RateLimit: "/jobs";r=<credits left>;t=<seconds until the month ends>;pk=:<k>:`, where `<k>`
//! is a digest of the budget's key (the API key itself never appears in a header or a Redis
//! key). A `403` over budget carries the same two, with what is left.
//!
//! `GET /usage`: `200` `{"limit", "spent", "held", "remaining", "resets_at"}` for the key's
//! current month (`held` by jobs running now; `resets_at` RFC 3339, UTC), read through the same
//! [`BudgetOf`] the jobs reserve by; `401` as above, `503` when the store is unavailable.
//!
//! Anything else: `404` (`405` for another method on a known path).

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get_service, post};
use bytes::Bytes;
use http::Request;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tower_reserve::{
    Budget, BudgetOf, Hold, MemoryStore, RedisStore, Rejection, ReserveLayer, Store, Window,
    extract, usage,
};

/// Monthly credits by plan.
const PLANS: &[(&str, u64)] = &[("free", 1_000), ("pro", 100_000)];
/// Credits per unit, by task.
const PRICES: &[(&str, u64)] = &[("resize", 2), ("embed", 1), ("transcode", 10)];
/// The most units one job may reserve.
const MAX_UNITS: u64 = 1_000_000;

/// A job, as the client sends it.
#[derive(Debug, Deserialize)]
struct Job {
    task: String,
    max_units: u64,
    units: u64,
}

impl Job {
    /// Credits per unit of the job's task; `422` for a task that is not priced.
    fn price(&self) -> Result<u64, Rejection> {
        PRICES
            .iter()
            .find(|(task, _)| *task == self.task)
            .map(|(_, price)| *price)
            .ok_or_else(|| {
                Rejection::unprocessable("unknown task: use resize, embed or transcode")
                    .with("task", self.task.clone())
            })
    }

    /// The most the job may cost: what is reserved before it runs.
    fn max_cost(&self) -> Result<u64, Rejection> {
        if !(1..=MAX_UNITS).contains(&self.max_units) {
            return Err(Rejection::unprocessable(format!(
                "max_units must be 1 to {MAX_UNITS}"
            )));
        }
        Ok(self.max_units * self.price()?)
    }
}

/// A key's monthly credits: the one place their key, limit and window are decided, for the jobs
/// and the usage read alike.
fn credits() -> BudgetOf {
    BudgetOf::new(|req: &Request<Bytes>| {
        let unauthorized = |r: Rejection| r.with_status(StatusCode::UNAUTHORIZED);
        let key = extract::header(req, "x-api-key").map_err(unauthorized)?;
        let limit = plan_of(key).ok_or_else(|| {
            unauthorized(Rejection::bad_request("the API key is not a key of a plan"))
        })?;
        // The budget is named by a digest: the key itself stays out of Redis and of headers.
        let digest = Sha256::digest(key.as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Budget::new(format!("credits:{name}"), limit).per(Window::Month))
    })
}

/// The monthly credits of `key`'s plan, if it is a key of one.
fn plan_of(key: &str) -> Option<u64> {
    let (plan, name) = key.split_once('_')?;
    let name_ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    PLANS
        .iter()
        .find(|(p, _)| *p == plan)
        .filter(|_| name_ok)
        .map(|(_, credits)| *credits)
}

/// A job that ran, as the client sees it.
#[derive(Debug, Serialize)]
struct Done {
    job_id: String,
    task: String,
    units: u64,
    cost: u64,
    max_cost: u64,
}

/// `POST /jobs`: runs the job under its hold, then reports what it used.
async fn run_job(hold: Hold, Json(job): Json<Job>) -> Result<Response, Rejection> {
    let price = job.price()?;
    // The work itself; a real job measures what it used as it goes.
    tokio::task::yield_now().await;
    let cost = job.units * price;
    let (budget, max_cost) = hold
        .budgets()
        .next()
        .expect("the jobs route spends credits");
    if hold.set_actual(budget, cost).is_err() {
        // Above what was reserved: refused, and the error response releases the hold.
        return Err(Rejection::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Job exceeded its reservation",
            format!(
                "the job used {} units, more than its max_units ({}); nothing was charged",
                job.units, job.max_units
            ),
        ));
    }
    let done = Done {
        job_id: hold.id().to_string(),
        task: job.task,
        units: job.units,
        cost,
        max_cost,
    };
    Ok((StatusCode::OK, Json(done)).into_response())
}

fn app<St: Store>(store: St) -> Router {
    let jobs = ReserveLayer::new(
        store.clone(),
        credits().spend(|req: &Request<Bytes>| extract::json::<Job>(req)?.max_cost()),
    )
    .remaining_headers(true);
    Router::new()
        .route("/jobs", post(run_job).route_layer(jobs))
        .route("/usage", get_service(usage(store, credits())))
}

// ---------------------------------------------------------------------------------------------
// Start-up

fn fail(message: &str) -> ! {
    eprintln!("metered_api: {message}");
    std::process::exit(1);
}

async fn serve(router: Router, addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
    let local: SocketAddr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("cannot read the listening address: {e}")));
    println!("listening on http://{local}");
    axum::serve(listener, router)
        .await
        .unwrap_or_else(|e| fail(&format!("server error: {e}")));
}

/// The URL with any password or user name masked, for logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[tokio::main]
async fn main() {
    let addr = std::env::var("METERED_ADDR").unwrap_or_else(|_| "127.0.0.1:3003".to_owned());
    let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    match (var("REDIS_URL"), var("REDIS_CLUSTER_URLS")) {
        (Some(_), Some(_)) => {
            fail("set REDIS_URL (one node) or REDIS_CLUSTER_URLS (a Cluster), not both")
        }
        (None, Some(urls)) => {
            let seeds: Vec<String> = urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            let shown: Vec<String> = seeds.iter().map(|u| redact(u)).collect();
            println!("store: Redis Cluster via {}", shown.join(","));
            let store = RedisStore::builder()
                .prefix("metered")
                .connect_cluster(&seeds)
                .await
                .unwrap_or_else(|e| {
                    fail(&format!(
                        "cannot reach the Redis Cluster at {}: {e}",
                        shown.join(",")
                    ))
                });
            serve(app(store), &addr).await;
        }
        (Some(url), None) => {
            let shown = redact(&url);
            println!("store: Redis at {shown}");
            let store = RedisStore::builder()
                .prefix("metered")
                .connect(&url)
                .await
                .unwrap_or_else(|e| fail(&format!("cannot reach Redis at {shown}: {e}")));
            serve(app(store), &addr).await;
        }
        (None, None) => {
            println!("store: embedded in-memory store, for this process only");
            serve(app(MemoryStore::new()), &addr).await;
        }
    }
}
