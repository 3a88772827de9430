//! End to end: the compiled `gateway` example as a child process, in front of an upstream
//! written without this crate (a plain hyper service in the test that counts what reaches it),
//! on the embedded store and on a real `redis-server`.
#![cfg(feature = "policy")]

mod support;

use std::path::PathBuf;

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::gateway::{BIG, Gateway, Upstream, big_byte, client, sample, shop_policy};
use support::redis_server::{RedisServer, free_port};
use tower_reserve::{Budget, RedisStore, Store};

const PURCHASES: &str = "/customers/{customer_id}/purchases";

/// A customer id of its own for each case.
fn customer(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn purchases_of(customer: &str) -> String {
    format!("/customers/{customer}/purchases")
}

async fn purchase(
    gateway: &Gateway,
    client: &Client,
    customer: &str,
    products: &[u64],
) -> Response {
    client
        .post(gateway.url(&purchases_of(customer)))
        .json(&json!({ "product_ids": products }))
        .send()
        .await
        .expect("send a purchase")
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
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// A policy file of the test's own, in a directory of its own.
struct PolicyFile {
    path: PathBuf,
}

impl PolicyFile {
    fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-reserve-gateway-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the policy");
        let file = PolicyFile {
            path: dir.join("policy.toml"),
        };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("write the policy");
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The race, through the gateway

/// 300 concurrent $20 purchases on a $500 budget: exactly 25 reach the upstream.
async fn three_hundred_buyers(gateway: &Gateway, upstream: &Upstream) -> String {
    let client = client();
    let who = customer("crowd");
    let url = gateway.url(&purchases_of(&who));
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let request = client.post(&url).json(&json!({ "product_ids": [20] }));
            tokio::spawn(async move {
                let r = request.send().await.expect("send a purchase");
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("a purchase task"));
    }
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let refused: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::FORBIDDEN)
        .collect();
    assert_eq!(created, 25, "exactly $500 / $20 purchases succeed");
    assert_eq!(refused.len(), 275, "every other one is over budget");
    for (_, body) in &refused {
        assert_eq!(body["status"], 403);
        assert_eq!(body["requested"], 2000);
        assert!(body["remaining"].as_u64().unwrap() < 2000, "{body}");
    }
    assert_eq!(
        upstream.count(&purchases_of(&who)),
        25,
        "exactly 25 reached the upstream"
    );
    // Spent in full: not one cent more fits.
    let r = purchase(gateway, &client, &who, &[1]).await;
    let body = problem(r, StatusCode::FORBIDDEN).await;
    assert_eq!(body["remaining"], 0);
    who
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_300_concurrent_purchases_reach_the_upstream_25_times() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    assert!(
        gateway.first_line.contains("in-memory"),
        "the first line names the store: {:?}",
        gateway.first_line
    );
    three_hundred_buyers(&gateway, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_300_concurrent_purchases_reach_the_upstream_25_times() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    assert!(
        gateway.first_line.contains("Redis"),
        "the first line names the store: {:?}",
        gateway.first_line
    );
    let who = three_hundred_buyers(&gateway, &upstream).await;
    let store = RedisStore::builder()
        .prefix("gateway")
        .connect(&redis.url())
        .await
        .expect("connect to the gateway's Redis");
    let status = store
        .budget(&Budget::new(format!("customer:{who}"), 50_000))
        .await
        .expect("read the budget");
    assert_eq!((status.spent, status.held), (50_000, 0));
}

#[tokio::test]
async fn an_unreachable_redis_stops_the_gateway_with_a_message() {
    let upstream = Upstream::start().await;
    let output = std::process::Command::new(support::example::example_binary("gateway"))
        .env("GATEWAY_ADDR", "127.0.0.1:0")
        .env("GATEWAY_UPSTREAM", upstream.url())
        .env("GATEWAY_POLICY", shop_policy())
        .env("REDIS_URL", format!("redis://127.0.0.1:{}/", free_port()))
        .env_remove("REDIS_CLUSTER_URLS")
        .output()
        .expect("run the gateway");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("store: Redis at"),
        "the first line names the store"
    );
}

// ---------------------------------------------------------------------------------------------
// Unique values

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_many_concurrent_sign_ups_one_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    let email = format!("race-{}@example.com", uuid::Uuid::new_v4().simple());
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            // The same address, however it is cased and spaced.
            let shown = if i % 2 == 0 {
                email.to_uppercase()
            } else {
                format!("  {email} ")
            };
            let request = client
                .post(gateway.url("/accounts"))
                .header("x-account-id", format!("account-{i}"))
                .json(&json!({ "email": shown, "name": "Ann" }));
            tokio::spawn(async move { request.send().await.expect("send a sign-up").status() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("a sign-up task"));
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let taken = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, taken), (1, 59), "{statuses:?}");
    assert_eq!(upstream.count("/accounts"), 1);
    let r = client
        .post(gateway.url("/accounts"))
        .header("x-account-id", "account-late")
        .json(&json!({ "email": email, "name": "Late" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::CONFLICT).await;
}

// ---------------------------------------------------------------------------------------------
// Bad input, upstream failures, actual amounts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_reaches_the_upstream_and_holds_nothing() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    let who = customer("bad");
    let url = gateway.url(&purchases_of(&who));
    let send = |body: Vec<u8>, content_type: &str| {
        client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = "application/json";
    let cases: Vec<(Vec<u8>, &str, StatusCode)> = vec![
        (
            br#"{"product_ids": [20"#.to_vec(),
            json,
            StatusCode::BAD_REQUEST,
        ),
        (
            br#"{"product_ids": [20]}"#.to_vec(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            br#"{"product_ids": [101]}"#.to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            br#"{"product_ids": ["x"]}"#.to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            br#"{"product_ids": []}"#.to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            br#"{"product_ids": 20}"#.to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!(
                r#"{{"product_ids": [20], "pad": "{}"}}"#,
                "x".repeat(100_000)
            )
            .into_bytes(),
            json,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (body, content_type, status) in cases {
        let r = send(body, content_type).await.expect("send");
        let problem = problem(r, status).await;
        if let Some(id) = problem.get("id") {
            assert!(id == &json!(101) || id == &json!("x"), "{problem}");
            assert_eq!(problem["table"], "products");
        }
    }
    // A sign-up without the owner's header, or without an address.
    let r = client
        .post(gateway.url("/accounts"))
        .json(&json!({ "email": "ann@example.com" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    let r = client
        .post(gateway.url("/accounts"))
        .header("x-account-id", "a-1")
        .json(&json!({ "name": "Ann" }))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(upstream.seen().is_empty(), "{:?}", upstream.counts());
    // Nothing was held: the whole $500 fits in one purchase.
    let r = purchase(&gateway, &client, &who, &[100, 100, 100, 100, 100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(upstream.count(&purchases_of(&who)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_releases_the_hold() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    let who = customer("fails");
    for status in [500, 503, 409] {
        let r = client
            .post(gateway.url(&purchases_of(&who)))
            .header("x-upstream-status", status.to_string())
            .json(&json!({ "product_ids": [100, 100] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "the upstream's own answer");
    }
    assert_eq!(upstream.count(&purchases_of(&who)), 3);
    // The budget is unchanged: all of it fits, and not a cent more.
    let r = purchase(&gateway, &client, &who, &[100, 100, 100, 100, 100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = purchase(&gateway, &client, &who, &[1]).await;
    problem(r, StatusCode::FORBIDDEN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_and_releases_the_hold() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&nobody, &shop_policy(), &[]).await;
    let client = client();
    let who = customer("nobody");
    let r = purchase(&gateway, &client, &who, &[100, 100, 100, 100]).await;
    problem(r, StatusCode::BAD_GATEWAY).await;
    // Had the $400 stayed held, this $200 would be over budget; it reaches the (absent)
    // upstream instead.
    let r = purchase(&gateway, &client, &who, &[100, 100]).await;
    problem(r, StatusCode::BAD_GATEWAY).await;
    let page = gateway.metrics(&client).await;
    let released = sample(
        &page,
        "tower_reserve_settlements_total",
        &[r#"result="released""#, r#"cause="error_response""#],
    );
    assert_eq!(released, 2.0, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_actual_amount_is_committed_and_not_shown() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    let who = customer("actual");
    let r = client
        .post(gateway.url(&purchases_of(&who)))
        .header("x-upstream-actual", "500")
        .json(&json!({ "product_ids": [20] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(
        r.headers().get("reserve-actual").is_none(),
        "the header stays between the upstream and the gateway"
    );
    // $5 of the $20 were spent: $495 fit, then nothing.
    let r = purchase(&gateway, &client, &who, &[100, 100, 100, 100, 95]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = purchase(&gateway, &client, &who, &[1]).await;
    let body = problem(r, StatusCode::FORBIDDEN).await;
    assert_eq!(body["remaining"], 0);
    // An actual amount above what was held is refused and the hold released.
    let other = customer("actual-over");
    let r = client
        .post(gateway.url(&purchases_of(&other)))
        .header("x-upstream-actual", "999999")
        .json(&json!({ "product_ids": [20] }))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("reserve-actual").is_none());
    problem(r, StatusCode::INTERNAL_SERVER_ERROR).await;
    let r = purchase(&gateway, &client, &other, &[100, 100, 100, 100, 100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // On a path no route reserves, the header means nothing and is removed too.
    let r = client
        .get(gateway.url("/catalogue"))
        .header("x-upstream-actual", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("reserve-actual").is_none());
}

// ---------------------------------------------------------------------------------------------
// Proxying

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    for path in [purchases_of(&customer("hop")), "/elsewhere".to_owned()] {
        let r = client
            .post(gateway.url(&path))
            .header("connection", "x-hop-req")
            .header("x-hop-req", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic eDp5")
            .header("te", "trailers")
            .header("x-upstream-hop", "1")
            .header("x-end-to-end", "kept")
            .json(&json!({ "product_ids": [1] }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        for gone in [
            "x-hop-res",
            "keep-alive",
            "proxy-authenticate",
            "upgrade",
            "trailer",
        ] {
            assert!(
                r.headers().get(gone).is_none(),
                "{path}: {gone} reached the client"
            );
        }
        let connection = r
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            connection
                .as_deref()
                .is_none_or(|v| !v.contains("x-hop-res")),
            "{connection:?}"
        );
        assert_eq!(r.headers()["x-kept"], "yes");
        let seen = upstream
            .seen()
            .into_iter()
            .find(|s| s.path == path)
            .expect("the request reached the upstream");
        for gone in ["x-hop-req", "keep-alive", "proxy-authorization", "te"] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{path}: {gone} reached the upstream"
            );
        }
        let connection = seen
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            connection
                .as_deref()
                .is_none_or(|v| !v.contains("x-hop-req")),
            "{connection:?}"
        );
        assert_eq!(seen.headers["x-end-to-end"], "kept");
        assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
        assert!(seen.headers.get("x-forwarded-host").is_some());
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen.method, "POST");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreserved_paths_stream_through_untouched() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    // 1 MiB, sixteen times the reserved routes' body limit, in chunks of a stream.
    let body: Vec<u8> = (0..BIG).map(|i| (i % 253) as u8).collect();
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::io::Error>> = body
        .chunks(50_000)
        .map(|c| Ok(http_body::Frame::data(bytes::Bytes::copy_from_slice(c))))
        .collect();
    let r = client
        .put(gateway.url("/uploads/a.bin?kind=raw&x=%20y"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(
            futures_util::stream::iter(chunks),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = upstream
        .seen()
        .into_iter()
        .find(|s| s.path == "/uploads/a.bin")
        .expect("the upload reached the upstream");
    assert_eq!(seen.method, "PUT");
    assert!(seen.body == body, "the body arrived whole");
    // The same method and path as a reserved route, another method: untouched too.
    let r = client
        .get(gateway.url(&purchases_of("ann")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A streamed response of 1 MiB arrives whole.
    let r = client.get(gateway.url("/big")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), BIG);
    assert!(got.iter().enumerate().all(|(i, b)| *b == big_byte(i)));
    let page = gateway.metrics(&client).await;
    assert_eq!(
        sample(&page, "tower_reserve_reservations_total", &[]),
        0.0,
        "nothing was reserved: {page}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reload, shadow mode, metrics

const SMALL: &str = r#"
[[route]]
method = "POST"
path = "/customers/{customer_id}/purchases"

[[route.budget]]
key = "customer:{path.customer_id}"
amount = { sum = "/product_ids", table = "products" }
limit = LIMIT

[tables.products]
10 = 1000
20 = PRICE
"#;

fn small(limit: u64, price: u64) -> String {
    SMALL
        .replace("LIMIT", &limit.to_string())
        .replace("PRICE", &price.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_and_a_broken_file_keeps_the_old_one() {
    let upstream = Upstream::start().await;
    let file = PolicyFile::new(&small(3_000, 2_000));
    let gateway = Gateway::start(&upstream.url(), &file.path, &[]).await;
    let client = client();
    let who = customer("reload");
    assert_eq!(
        purchase(&gateway, &client, &who, &[20]).await.status(),
        StatusCode::CREATED
    );
    problem(
        purchase(&gateway, &client, &who, &[20]).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // A higher limit and a lower price, then SIGHUP.
    file.write(&small(5_000, 1_500));
    gateway.hang_up();
    gateway.wait_for_line("policy: reloaded 1 routes");
    assert_eq!(
        purchase(&gateway, &client, &who, &[20]).await.status(),
        StatusCode::CREATED
    );
    // Spent 3 500 of 5 000: the new price was charged.
    let body = problem(
        purchase(&gateway, &client, &who, &[20, 20]).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(body["remaining"], 1_500);

    // A broken file is refused, with its line and field, and the policy in force stays.
    file.write(&small(5_000, 1_500).replace("limit = 5000", "limit = \"lots\""));
    gateway.hang_up();
    let line = gateway.wait_for_line("policy: reload refused");
    assert!(
        line.contains("line 9") && line.contains("route[0].budget[0].limit"),
        "{line}"
    );
    assert_eq!(
        purchase(&gateway, &client, &who, &[10]).await.status(),
        StatusCode::CREATED
    );
    let body = problem(
        purchase(&gateway, &client, &who, &[10]).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(body["remaining"], 500);
    // A file that parses but does not validate is refused too.
    file.write(&small(5_000, 1_500).replace("table = \"products\"", "table = \"prices\""));
    gateway.hang_up();
    let line = gateway.wait_for_line("policy: reload refused");
    assert!(line.contains("no table \"prices\""), "{line}");
    assert_eq!(
        purchase(&gateway, &client, &who, &[20]).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(upstream.count(&purchases_of(&who)), 3);
}

const SHADOWED: &str = r#"
# Watched, not enforced.
[[route]]
method = "POST"
path = "/customers/{customer_id}/purchases"
shadow = true

[[route.budget]]
key = "customer:{path.customer_id}"
amount = { sum = "/product_ids", table = "products" }
limit = 2000

# Enforced, on the same budget.
[[route]]
method = "POST"
path = "/customers/{customer_id}/orders"

[[route.budget]]
key = "customer:{path.customer_id}"
amount = { sum = "/product_ids", table = "products" }
limit = 2000

[tables.products]
20 = 2000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_lets_everything_through_and_holds_nothing() {
    let upstream = Upstream::start().await;
    let file = PolicyFile::new(SHADOWED);
    let gateway = Gateway::start(&upstream.url(), &file.path, &[]).await;
    let client = client();
    let who = customer("shadow");
    for _ in 0..5 {
        let r = purchase(&gateway, &client, &who, &[20, 20]).await;
        assert_eq!(r.status(), StatusCode::CREATED, "over budget, and through");
    }
    assert_eq!(upstream.count(&purchases_of(&who)), 5);
    // Bad input is still refused: it is not a limit's business.
    let r = purchase(&gateway, &client, &who, &[7]).await;
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let page = gateway.metrics(&client).await;
    let would_refuse = sample(
        &page,
        "tower_reserve_denials_total",
        &[
            r#"mode="shadow""#,
            r#"reason="over_budget""#,
            &format!(r#"route="{PURCHASES}""#),
        ],
    );
    assert_eq!(would_refuse, 5.0, "{page}");
    // Nothing was held or spent: the enforced route's whole budget is there.
    let orders = format!("/customers/{who}/orders");
    let order = |products: Value| {
        client
            .post(gateway.url(&orders))
            .json(&json!({ "product_ids": products }))
            .send()
    };
    assert_eq!(
        order(json!([20])).await.unwrap().status(),
        StatusCode::CREATED
    );
    problem(order(json!([20])).await.unwrap(), StatusCode::FORBIDDEN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_requests_go_through() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let client = client();
    let route = format!(r#"route="{PURCHASES}""#);
    let granted = |page: &str| {
        sample(
            page,
            "tower_reserve_reservations_total",
            &[r#"outcome="granted""#, &route],
        )
    };
    let before = gateway.metrics(&client).await;
    assert_eq!(granted(&before), 0.0);
    let who = customer("metrics");
    for _ in 0..3 {
        let r = purchase(&gateway, &client, &who, &[100]).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    problem(
        purchase(&gateway, &client, &who, &[100, 100, 100]).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let r = client
        .post(gateway.url(&purchases_of(&who)))
        .header("x-upstream-status", "502")
        .json(&json!({ "product_ids": [1] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let page = gateway.metrics(&client).await;
    assert_eq!(granted(&page), 4.0, "{page}");
    let count = |name: &str, labels: &[&str]| {
        let mut labels = labels.to_vec();
        labels.push(&route);
        sample(&page, name, &labels)
    };
    assert_eq!(
        count("tower_reserve_reservations_total", &[r#"outcome="denied""#]),
        1.0
    );
    assert_eq!(
        count(
            "tower_reserve_denials_total",
            &[r#"reason="over_budget""#, r#"mode="enforce""#]
        ),
        1.0
    );
    assert_eq!(
        count(
            "tower_reserve_settlements_total",
            &[r#"result="committed""#]
        ),
        3.0
    );
    assert_eq!(
        count(
            "tower_reserve_settlements_total",
            &[r#"result="released""#, r#"cause="error_response""#]
        ),
        1.0
    );
    assert!(
        count("tower_reserve_store_seconds_count", &[r#"op="reserve""#]) >= 5.0,
        "{page}"
    );
    assert!(
        !page.contains(&who),
        "metrics are labelled by route, never by customer"
    );
}
