//! End to end: the compiled `shop` example as a child process, over real HTTP, on a real
//! `redis-server` (and once on the embedded store). The contract is the module docs of
//! `src/main.rs`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::example::example_binary;
use support::redis_server::RedisServer;
use support::shop::{Shop, client};

/// A customer id of its own for each case.
fn customer(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Asserts the response is an RFC 9457 problem with this status, and answers its body.
async fn problem(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        content_type.starts_with("application/problem+json"),
        "{status}: content-type {content_type:?}"
    );
    let body: Value = r.json().await.expect("a problem body");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "{status}: no {member} in {body}");
    }
    assert_eq!(body["status"], status.as_u16(), "{body}");
    body
}

/// Runs `n` copies of a request at once and answers their statuses.
async fn concurrently<F, Fut>(n: usize, f: F) -> Vec<(StatusCode, Value)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let fut = f(i);
            tokio::spawn(async move {
                let r = fut.await;
                let status = r.status();
                let body = r.json::<Value>().await.unwrap_or(Value::Null);
                (status, body)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("a request task"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Budgets

async fn three_hundred_buyers(shop: &Shop) {
    let client = client();
    let who = customer("crowd");
    let shop_url = shop.url(&format!("/customers/{who}/purchases"));
    let results = concurrently(300, |_| {
        sent(
            client
                .post(&shop_url)
                .json(&json!({ "product_ids": [20] }))
                .send(),
        )
    })
    .await;
    let created: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    let refused: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::FORBIDDEN)
        .collect();
    assert_eq!(created.len(), 25, "exactly $500 / $20 purchases succeed");
    assert_eq!(refused.len(), 275, "every other one is over budget");
    for (_, body) in &created {
        assert_eq!(body["amount_cents"], 2000);
        assert_eq!(body["customer_id"], who.as_str());
        assert!(body["purchase_id"].is_string());
        assert!(body["remaining_cents"].as_u64().unwrap() <= 48_000);
    }
    let mut remaining: Vec<u64> = created
        .iter()
        .map(|(_, b)| b["remaining_cents"].as_u64().unwrap())
        .collect();
    remaining.sort_unstable();
    let expected: Vec<u64> = (0..25).map(|i| i * 2000).collect();
    assert_eq!(remaining, expected, "each success saw its own remainder");
    for (_, body) in &refused {
        assert_eq!(body["status"], 403);
        assert_eq!(body["requested_cents"], 2000);
        assert!(body["remaining_cents"].as_u64().unwrap() < 2000);
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(
        b,
        json!({"limit_cents": 50000, "spent_cents": 50000, "held_cents": 0, "remaining_cents": 0})
    );
}

/// Awaits a sent request, panicking when it could not be sent.
async fn sent<F>(request: F) -> Response
where
    F: std::future::Future<Output = reqwest::Result<Response>>,
{
    request.await.expect("send a request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_300_concurrent_purchases_make_exactly_25() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    assert!(
        shop.first_line.to_lowercase().contains("redis"),
        "first log line names the store: {:?}",
        shop.first_line
    );
    three_hundred_buyers(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_300_concurrent_purchases_make_exactly_25() {
    let shop = Shop::start(&[]).await;
    assert!(
        shop.first_line.to_lowercase().contains("in-memory"),
        "first log line names the store: {:?}",
        shop.first_line
    );
    three_hundred_buyers(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_release_the_hold_and_spend_nothing() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let who = customer("faults");

    let r = shop.purchase(&client, &who, &[10, 10]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["amount_cents"], 2000);
    assert_eq!(body["remaining_cents"], 48_000);
    let before = shop.settled_budget(&client, &who).await;
    assert_eq!(before["spent_cents"], 2000);
    assert_eq!(before["held_cents"], 0);

    let r = shop
        .purchase_simulating(&client, &who, &[30], "decline")
        .await;
    problem(r, StatusCode::PAYMENT_REQUIRED).await;
    assert_eq!(shop.settled_budget(&client, &who).await, before);

    let r = shop
        .purchase_simulating(&client, &who, &[30], "panic")
        .await;
    problem(r, StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(shop.settled_budget(&client, &who).await, before);

    // The shop survived the panic and still serves.
    let r = shop
        .purchase_simulating(&client, &who, &[30], "sleep=50")
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["remaining_cents"], 45_000);
    let after = shop.settled_budget(&client, &who).await;
    assert_eq!(after["spent_cents"], 5000);
    assert_eq!(after["held_cents"], 0);
    assert_eq!(after["remaining_cents"], 45_000);

    // Sign-ups: a declined or panicking sign-up leaves the address free.
    let email = format!("{}@faults.example", customer("f"));
    let r = client
        .post(shop.url("/accounts"))
        .header("x-simulate", "decline")
        .json(&json!({ "email": email, "name": "F" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PAYMENT_REQUIRED).await;
    let r = client
        .post(shop.url("/accounts"))
        .header("x-simulate", "panic")
        .json(&json!({ "email": email, "name": "F" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::INTERNAL_SERVER_ERROR).await;
    // The panic's release may still be on its way: retry, bounded, while the address is held.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = shop.sign_up(&client, &email, "F").await;
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert!(
            Instant::now() < deadline,
            "the address stayed taken after failed sign-ups"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_while_the_handler_runs_released_when_the_client_goes_away() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let who = customer("inflight");

    // While a slow purchase runs, its amount is held; then it is spent.
    let slow = {
        let url = shop.url(&format!("/customers/{who}/purchases"));
        let client = client.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-simulate", "sleep=700")
                .json(&json!({ "product_ids": [40] }))
                .send()
                .await
                .expect("send a slow purchase")
                .status()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = shop.budget(&client, &who).await;
        if b["held_cents"] == 4000 {
            assert_eq!(b["spent_cents"], 0);
            assert_eq!(b["remaining_cents"], 46_000);
            break;
        }
        assert!(Instant::now() < deadline, "the hold never showed: {b}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slow.await.unwrap(), StatusCode::CREATED);
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 4000);
    assert_eq!(b["held_cents"], 0);

    // A client that gives up mid-handler: the hold is released, nothing spent.
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(shop.url(&format!("/customers/{who}/purchases")))
        .header("x-simulate", "sleep=3000")
        .json(&json!({ "product_ids": [40] }))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the client should have timed out: {gave_up:?}"
    );
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(
        b,
        json!({"limit_cents": 50000, "spent_cents": 4000, "held_cents": 0, "remaining_cents": 46000})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_shops_holds_run_out_with_their_lease() {
    let redis = RedisServer::start();
    let lease = [
        ("REDIS_URL", redis.url()),
        ("SHOP_LEASE_MS", "1500".to_owned()),
    ];
    let lease: Vec<(&str, &str)> = lease.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut doomed = Shop::start(&lease).await;
    let client = client();
    let who = customer("dead");

    let url = doomed.url(&format!("/customers/{who}/purchases"));
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-simulate", "sleep=1200")
                .json(&json!({ "product_ids": [50] }))
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = doomed.budget(&client, &who).await;
        if b["held_cents"] == 5000 {
            break;
        }
        assert!(Instant::now() < deadline, "the hold never showed: {b}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server dies (SIGKILL) with the hold in flight.
    doomed.kill();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the request died with the shop"
    );

    // Another shop on the same Redis sees the hold until its lease runs out, then nothing.
    let shop = Shop::start(&lease).await;
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let b = shop.budget(&client, &who).await;
        if b["held_cents"] == 0 {
            assert_eq!(b["spent_cents"], 0);
            assert_eq!(b["remaining_cents"], 50_000);
            break;
        }
        assert_eq!(b["held_cents"], 5000);
        assert!(Instant::now() < deadline, "the lease never ran out: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// E-mail addresses

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn email_addresses_belong_to_one_account() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let local = customer("ann");
    let forms = [
        format!("{local}@example.com"),
        format!(" {}@Example.COM", local.to_uppercase()),
        format!("{local}@EXAMPLE.com  "),
        format!("\t{}@example.com", local.to_uppercase()),
        format!("  {local}@Example.Com"),
    ];
    let normalized = format!("{local}@example.com");

    let url = shop.url("/accounts");
    let results = concurrently(50, |i| {
        sent(
            client
                .post(&url)
                .json(&json!({ "email": forms[i % forms.len()], "name": format!("Ann {i}") }))
                .send(),
        )
    })
    .await;
    let created: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "exactly one sign-up gets the address");
    assert_eq!(
        results
            .iter()
            .filter(|(s, _)| *s == StatusCode::CONFLICT)
            .count(),
        49,
        "every other one finds it taken"
    );
    for (s, body) in &results {
        if *s == StatusCode::CONFLICT {
            assert_eq!(body["status"], 409);
        }
    }
    let ann = created[0].1.clone();
    assert_eq!(ann["email"], normalized.as_str());
    let ann_id = ann["account_id"].as_str().unwrap().to_owned();

    let r = shop.account(&client, &ann_id).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), ann);

    // Bob takes another address; Ann cannot take Bob's, and keeps her own.
    let bob_email = format!("{}@example.com", customer("bob"));
    let r = shop.sign_up(&client, &bob_email, "Bob").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let bob: Value = r.json().await.unwrap();
    let bob_id = bob["account_id"].as_str().unwrap().to_owned();

    let r = shop
        .change_email(&client, &ann_id, &format!(" {}", bob_email.to_uppercase()))
        .await;
    problem(r, StatusCode::CONFLICT).await;
    let r = shop.account(&client, &ann_id).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["email"],
        normalized.as_str()
    );
    let r = shop.sign_up(&client, &normalized, "Eve").await;
    problem(r, StatusCode::CONFLICT).await;

    // Re-claiming her own address (another form of it) is fine.
    let r = shop
        .change_email(&client, &ann_id, &normalized.to_uppercase())
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["email"],
        normalized.as_str()
    );

    // A successful change frees the old address.
    let new_email = format!("{}@example.org", customer("ann-new"));
    let r = shop.change_email(&client, &ann_id, &new_email).await;
    assert_eq!(r.status(), StatusCode::OK);
    let changed: Value = r.json().await.unwrap();
    assert_eq!(changed["email"], new_email.as_str());
    assert_eq!(changed["account_id"], ann_id.as_str());
    let r = shop.sign_up(&client, &normalized, "Eve").await;
    assert_eq!(r.status(), StatusCode::CREATED, "the old address is free");

    // Bad addresses and unknown accounts.
    let r = shop.change_email(&client, &ann_id, "not an address").await;
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = shop
        .change_email(&client, "no-such-account", "x@example.com")
        .await;
    problem(r, StatusCode::NOT_FOUND).await;
    let r = shop.account(&client, "no-such-account").await;
    problem(r, StatusCode::NOT_FOUND).await;

    // Deleting frees the address.
    let r = client
        .delete(shop.url(&format!("/accounts/{bob_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = shop.account(&client, &bob_id).await;
    problem(r, StatusCode::NOT_FOUND).await;
    let r = client
        .delete(shop.url(&format!("/accounts/{bob_id}")))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = shop.sign_up(&client, &bob_email, "Bob again").await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "a deleted account's address is free"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_a_problem_and_changes_nothing() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let who = customer("bad");
    let purchases = shop.url(&format!("/customers/{who}/purchases"));

    // Another method on a reserved route is 405, not a reservation's rejection.
    let r = client.get(&purchases).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    problem(r, StatusCode::METHOD_NOT_ALLOWED).await;

    let r = client
        .post(&purchases)
        .header("content-type", "application/json")
        .body("{\"product_ids\": [1,")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;

    let r = client
        .post(&purchases)
        .header("content-type", "text/plain")
        .body("{\"product_ids\": [1]}")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let big = format!(
        "{{\"product_ids\": [1], \"padding\": \"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let r = client
        .post(&purchases)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;

    for products in [vec![0], vec![10_001], vec![1, 2, 99_999], vec![]] {
        let r = shop.purchase(&client, &who, &products).await;
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let r = shop.purchase(&client, &who, &[1; 101]).await;
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = client
        .post(&purchases)
        .json(&json!({ "product_ids": "seven" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;

    let long = "a".repeat(65);
    for bad in ["bad!id", "b%20d", long.as_str()] {
        let r = shop.purchase(&client, bad, &[1]).await;
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
        let r = client
            .get(shop.url(&format!("/customers/{bad}/budget")))
            .send()
            .await
            .unwrap();
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    // 64 characters is still a customer id; 100 ids (repeats allowed) is still a purchase.
    let edge = "a".repeat(63) + "_";
    let r = shop.budget(&client, &edge).await;
    assert_eq!(r["spent_cents"], 0);

    for bad in [
        "",
        "   ",
        "ann",
        "ann@",
        "@example.com",
        "ann@example",
        "a b@example.com",
        "a@b@example.com",
    ] {
        let r = shop.sign_up(&client, bad, "X").await;
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let r = client
        .post(shop.url("/accounts"))
        .header("content-type", "application/json")
        .body("{\"email\":")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    let r = client
        .post(shop.url("/accounts"))
        .body("email=x@example.com")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    // axum's own answers are problems too.
    let r = client.get(shop.url("/no/such/route")).send().await.unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = client.delete(shop.url("/healthz")).send().await.unwrap();
    problem(r, StatusCode::METHOD_NOT_ALLOWED).await;

    // Nothing was reserved or spent.
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(
        b,
        json!({"limit_cents": 50000, "spent_cents": 0, "held_cents": 0, "remaining_cents": 50000})
    );
    let r = shop.purchase(&client, &who, &[1; 100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.json::<Value>().await.unwrap()["amount_cents"], 10_000);
}

// ---------------------------------------------------------------------------------------------
// Redis going away

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_is_503_and_the_shop_recovers() {
    let mut redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let who = customer("outage");

    let r = shop.purchase(&client, &who, &[5]).await;
    assert_eq!(r.status(), StatusCode::CREATED);

    redis.stop();
    let r = shop.purchase(&client, &who, &[5]).await;
    let retry_after = r.headers().get("retry-after").cloned();
    problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(retry_after.is_some(), "a 503 says when to retry");
    let r = client
        .get(shop.url(&format!("/customers/{who}/budget")))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_some());
    problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
    let r = shop.sign_up(&client, "outage@example.com", "O").await;
    problem(r, StatusCode::SERVICE_UNAVAILABLE).await;

    // Redis comes back empty (no data, no scripts); the same shop process serves again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = shop.purchase(&client, &who, &[7]).await;
        if r.status() == StatusCode::CREATED {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["remaining_cents"], 49_300, "Redis came back empty");
            break;
        }
        problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(
            Instant::now() < deadline,
            "the shop did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 700);
    assert_eq!(b["held_cents"], 0);
    let r = shop.sign_up(&client, "outage@example.com", "O").await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

// ---------------------------------------------------------------------------------------------
// Start-up

fn run_to_exit(env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(example_binary("shop"));
    command
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_URLS")
        .env("SHOP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start the shop example");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("poll the shop").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the shop did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("the shop's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn unreachable_redis_fails_fast() {
    let port = support::redis_server::free_port();
    let (ok, output) = run_to_exit(&[("REDIS_URL", &format!("redis://127.0.0.1:{port}/"))]);
    assert!(!ok, "the shop must exit non-zero: {output}");
    assert!(output.contains("Redis"), "a clear message: {output}");
}

#[test]
fn unreachable_cluster_fails_fast() {
    let port = support::redis_server::free_port();
    let (ok, output) =
        run_to_exit(&[("REDIS_CLUSTER_URLS", &format!("redis://127.0.0.1:{port}/"))]);
    assert!(!ok, "the shop must exit non-zero: {output}");
    assert!(output.contains("Cluster"), "a clear message: {output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_300_concurrent_purchases_make_exactly_25() {
    let cluster = support::redis_server::RedisCluster::start(3, 0);
    let seeds = cluster.urls().join(",");
    let shop = Shop::start(&[("REDIS_CLUSTER_URLS", &seeds)]).await;
    assert!(
        shop.first_line.contains("Redis Cluster"),
        "first log line names the store: {:?}",
        shop.first_line
    );
    three_hundred_buyers(&shop).await;
}
