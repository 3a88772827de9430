//! End to end: the compiled `metered_api` example as a child process, over real HTTP, on the
//! embedded store, one `redis-server` and a Redis Cluster. The contract is the example's module
//! docs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::example::{Example, client};
use support::redis_server::{RedisCluster, RedisServer};

/// The `free` plan's monthly credits, and the price of a `resize` unit.
const FREE: u64 = 1_000;
const RESIZE: u64 = 2;

/// A fresh key of `plan`.
fn key(plan: &str) -> String {
    format!("{plan}_{}", uuid::Uuid::new_v4().simple())
}

async fn job(api: &Example, client: &Client, key: &str, body: Value) -> Response {
    client
        .post(api.url("/jobs"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("send a job")
}

async fn usage(api: &Example, client: &Client, key: &str) -> Value {
    let r = client
        .get(api.url("/usage"))
        .header("x-api-key", key)
        .send()
        .await
        .expect("read the usage");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.expect("a usage body")
}

/// The usage once nothing is held any more (bounded: 5 s).
async fn settled_usage(api: &Example, client: &Client, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let u = usage(api, client, key).await;
        if u["held"] == 0 || Instant::now() > deadline {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts an RFC 9457 problem with this status, and answers it.
async fn problem(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.expect("a problem body");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// Howard Hinnant's `days_from_civil`: (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Unix seconds of an RFC 3339 UTC time at midnight, `YYYY-MM-DDT00:00:00Z`.
fn midnight_secs(text: &str) -> u64 {
    let date = text.strip_suffix("T00:00:00Z").expect("a midnight in UTC");
    let parts: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    (days_from_civil(parts[0], parts[1], parts[2]) * 86_400) as u64
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// The contract, on whichever store the example runs on

async fn contract(api: &Example) {
    concurrent_jobs_spend_exactly_what_they_used(api).await;
    a_job_that_used_nothing_spends_nothing(api).await;
    a_job_that_used_more_than_it_reserved_is_refused(api).await;
    ratelimit_headers_tell_what_is_left(api).await;
    keys_and_bodies_are_checked(api).await;
}

/// Hundreds of jobs at once on one key: what is spent is the sum of what the granted jobs used,
/// never above the limit, even while they run; nothing stays held.
async fn concurrent_jobs_spend_exactly_what_they_used(api: &Example) {
    const JOBS: usize = 300;
    const MAX_UNITS: u64 = 20;
    let client = client();
    let key = key("free");
    // Reads the usage while the jobs run: spent and held together never pass the limit.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, key, url) = (client.clone(), key.clone(), api.url("/usage"));
        let done = done.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            for _ in 0..5_000 {
                let u: Value = client
                    .get(&url)
                    .header("x-api-key", &key)
                    .send()
                    .await
                    .expect("read the usage")
                    .json()
                    .await
                    .expect("a usage body");
                let (spent, held) = (u["spent"].as_u64().unwrap(), u["held"].as_u64().unwrap());
                assert!(spent + held <= FREE, "above the limit: {u}");
                assert_eq!(u["remaining"], FREE - spent - held, "{u}");
                reads += 1;
                if done.load(Ordering::Acquire) {
                    break;
                }
            }
            reads
        })
    };
    let tasks: Vec<_> = (0..JOBS)
        .map(|i| {
            let units = i as u64 % (MAX_UNITS + 1);
            let request = client
                .post(api.url("/jobs"))
                .header("x-api-key", &key)
                .json(&json!({ "task": "resize", "max_units": MAX_UNITS, "units": units }))
                .send();
            tokio::spawn(async move {
                let r = request.await.expect("send a job");
                let status = r.status();
                (
                    units,
                    status,
                    r.json::<Value>().await.unwrap_or(Value::Null),
                )
            })
        })
        .collect();
    let mut spent = 0;
    let mut granted = 0;
    for task in tasks {
        match task.await.expect("a job task") {
            (units, StatusCode::OK, body) => {
                assert_eq!(body["units"], units, "{body}");
                assert_eq!(body["cost"], units * RESIZE, "{body}");
                assert_eq!(body["max_cost"], MAX_UNITS * RESIZE, "{body}");
                spent += units * RESIZE;
                granted += 1;
            }
            (_, StatusCode::FORBIDDEN, body) => {
                assert_eq!(body["requested"], MAX_UNITS * RESIZE, "{body}");
                assert!(
                    body["remaining"].as_u64().unwrap() < MAX_UNITS * RESIZE,
                    "{body}"
                );
            }
            (_, status, body) => panic!("unexpected {status}: {body}"),
        }
    }
    done.store(true, Ordering::Release);
    assert!(
        granted >= (FREE / (MAX_UNITS * RESIZE)) as usize,
        "{granted} granted"
    );
    assert!(granted < JOBS, "some jobs must have found the credits gone");
    assert!(spent <= FREE);
    let u = settled_usage(api, &client, &key).await;
    assert_eq!(
        (u["limit"].as_u64(), u["spent"].as_u64(), u["held"].as_u64()),
        (Some(FREE), Some(spent), Some(0)),
        "{u}"
    );
    assert_eq!(u["remaining"], FREE - spent);
    assert!(watcher.await.expect("the usage watcher") > 0);
}

async fn a_job_that_used_nothing_spends_nothing(api: &Example) {
    let client = client();
    let key = key("free");
    let r = job(
        api,
        &client,
        &key,
        json!({"task": "embed", "max_units": 100, "units": 7}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = job(
        api,
        &client,
        &key,
        json!({"task": "transcode", "max_units": 50, "units": 0}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["cost"].as_u64(), body["max_cost"].as_u64()),
        (Some(0), Some(500))
    );
    let u = settled_usage(api, &client, &key).await;
    assert_eq!(
        (u["spent"].as_u64(), u["held"].as_u64()),
        (Some(7), Some(0)),
        "{u}"
    );
}

async fn a_job_that_used_more_than_it_reserved_is_refused(api: &Example) {
    let client = client();
    let key = key("free");
    let r = job(
        api,
        &client,
        &key,
        json!({"task": "resize", "max_units": 10, "units": 10}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = job(
        api,
        &client,
        &key,
        json!({"task": "resize", "max_units": 10, "units": 11}),
    )
    .await;
    let body = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["title"], "Job exceeded its reservation");
    // Nothing of it kept: neither the 22 it used nor the 20 it held.
    let u = settled_usage(api, &client, &key).await;
    assert_eq!(
        (u["spent"].as_u64(), u["held"].as_u64()),
        (Some(20), Some(0)),
        "{u}"
    );
}

async fn ratelimit_headers_tell_what_is_left(api: &Example) {
    let client = client();
    let key = key("pro");
    let mut names = Vec::new();
    for (units, left) in [(30, 100_000 - 60), (5, 100_000 - 70)] {
        let r = job(
            api,
            &client,
            &key,
            json!({"task": "resize", "max_units": 40, "units": units}),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_owned();
        let state = r.headers()["ratelimit"].to_str().unwrap().to_owned();
        // `"/jobs";q=100000;qu="units";pk=:<digest>:`: named after the route; a calendar month
        // has no fixed `w`.
        let items: Vec<&str> = policy.split(';').collect();
        assert_eq!(items.len(), 4, "{policy}");
        let name = items[0];
        assert_eq!(name, "\"/jobs\"", "{policy}");
        assert!(
            !policy.contains(&key) && !state.contains(&key),
            "the key itself never leaves: {policy} {state}"
        );
        assert_eq!(items[1], "q=100000");
        assert_eq!(items[2], "qu=\"units\"");
        let pk = items[3].strip_prefix("pk=").expect("a partition key");
        // `"/jobs";r=<left>;t=<seconds until the month ends>;pk=:<digest>:`.
        let fields: Vec<&str> = state.split(';').collect();
        assert_eq!(fields.len(), 4, "{state}");
        assert_eq!(fields[0], name);
        assert_eq!(fields[1], format!("r={left}"));
        assert_eq!(fields[3], format!("pk={pk}"));
        let t: u64 = fields[2].strip_prefix("t=").unwrap().parse().unwrap();
        let resets = usage(api, &client, &key).await["resets_at"]
            .as_str()
            .map(midnight_secs)
            .expect("a month ends");
        let expected = resets - now_secs();
        assert!(
            t.abs_diff(expected) <= 2,
            "t={t}, the month ends in {expected} s"
        );
        assert!(t <= 31 * 86_400);
        names.push(pk.to_owned());
    }
    assert_eq!(names[0], names[1], "one key, one partition");
    let u = settled_usage(api, &client, &key).await;
    assert_eq!(u["spent"], 70);
    assert_eq!(u["remaining"], 100_000 - 70);
    // A job refused over budget spends nothing, and its RateLimit headers say what is left.
    let r = job(
        api,
        &client,
        &key,
        json!({"task": "transcode", "max_units": 10_000, "units": 1}),
    )
    .await;
    let state = r.headers()["ratelimit"].to_str().unwrap();
    assert!(
        state.starts_with("\"/jobs\";r=99930;t=") && state.ends_with(&format!("pk={}", names[0])),
        "{state}"
    );
    let body = problem(r, StatusCode::FORBIDDEN).await;
    assert_eq!(
        (body["requested"].as_u64(), body["remaining"].as_u64()),
        (Some(100_000), Some(99_930))
    );
}

async fn keys_and_bodies_are_checked(api: &Example) {
    let client = client();
    let key = key("free");
    let good = json!({"task": "resize", "max_units": 1, "units": 1});
    // No key, or not a key of a plan: 401, on both endpoints.
    let r = client
        .post(api.url("/jobs"))
        .json(&good)
        .send()
        .await
        .unwrap();
    let body = problem(r, StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["title"], "Unauthorized");
    for bad in ["gold_ann", "free_", "free_a b", "nokey"] {
        problem(
            job(api, &client, bad, good.clone()).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    let r = client.get(api.url("/usage")).send().await.unwrap();
    problem(r, StatusCode::UNAUTHORIZED).await;
    let r = client
        .get(api.url("/usage"))
        .header("x-api-key", "gold_ann")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNAUTHORIZED).await;
    // Bodies: 415 not JSON, 400 malformed, 422 wrong shape or values.
    let r = client
        .post(api.url("/jobs"))
        .header("x-api-key", &key)
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = client
        .post(api.url("/jobs"))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body("{\"task\": ")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    for bad in [
        json!({"task": "fly", "max_units": 1, "units": 1}),
        json!({"task": "resize", "max_units": 0, "units": 0}),
        json!({"task": "resize", "max_units": 1_000_001, "units": 1}),
        json!({"task": "resize", "max_units": "5", "units": 1}),
        json!({"task": "resize", "units": 1}),
    ] {
        let r = job(api, &client, &key, bad.clone()).await;
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    // A body above 64 KiB: 413.
    let r = client
        .post(api.url("/jobs"))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(format!("{{\"pad\": \"{}\"}}", "x".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    // None of it spent anything; a fresh key's usage is its whole month.
    let u = usage(api, &client, &key).await;
    assert_eq!(
        (&u["limit"], &u["spent"], &u["held"], &u["remaining"]),
        (&json!(FREE), &json!(0), &json!(0), &json!(FREE)),
        "{u}"
    );
    let resets = midnight_secs(u["resets_at"].as_str().unwrap());
    assert!(resets > now_secs() && resets - now_secs() <= 31 * 86_400);
    // Another method on a known path, and an unknown path.
    let r = client
        .get(api.url("/jobs"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = client.get(api.url("/nothing")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------------
// One run per store

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_embedded_store() {
    let api = Example::start("metered_api", "METERED_ADDR", &[]);
    assert!(
        api.before.iter().any(|l| l.contains("embedded")),
        "{:?}",
        api.before
    );
    contract(&api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_one_redis_node() {
    let redis = RedisServer::start();
    let api = Example::start(
        "metered_api",
        "METERED_ADDR",
        &[("REDIS_URL", &redis.url())],
    );
    assert!(
        api.before.iter().any(|l| l.contains("store: Redis at")),
        "{:?}",
        api.before
    );
    contract(&api).await;
    // The key never reaches Redis: budgets are named by a digest.
    let keys = redis.cli(&["--scan"]);
    assert!(
        !keys.is_empty() && !keys.contains("free_") && !keys.contains("pro_"),
        "{keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.urls().join(",");
    let api = Example::start(
        "metered_api",
        "METERED_ADDR",
        &[("REDIS_CLUSTER_URLS", &seeds)],
    );
    assert!(
        api.before.iter().any(|l| l.contains("Redis Cluster")),
        "{:?}",
        api.before
    );
    contract(&api).await;
}
