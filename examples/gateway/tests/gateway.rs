//! End to end: the compiled `gateway` example as a child process, in front of an upstream
//! written without this crate (a plain hyper service in the test that counts what reaches it),
//! on the embedded store and on a real `redis-server`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::gateway::{BIG, Gateway, Upstream, big_byte, client, sample, shop_policy};
use support::raw;
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

// ---------------------------------------------------------------------------------------------
// The edge: requests spelled otherwise, sent twice, sent slowly; upstreams that are slow

/// Every path that reached the upstream.
fn paths(upstream: &Upstream) -> Vec<String> {
    upstream.seen().into_iter().map(|s| s.path).collect()
}

/// A purchase of `cents` (whole hundreds of dollars) as raw bytes at `path`, with extra header lines.
fn raw_purchase(path: &str, cents: u64, extra: &[&str]) -> Vec<u8> {
    // Product 100 costs $100, the dearest in the shop's table.
    let ids = vec![100; (cents / 10_000) as usize];
    let body = json!({ "product_ids": ids }).to_string();
    raw::post(path, extra, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_a_reserved_path_are_reserved_and_forwarded_as_reserved() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let who = customer("spell");
    let canonical = purchases_of(&who);
    // $300 of $500: no other spelling may buy another $300.
    let r = raw::send(&gateway.base, &raw_purchase(&canonical, 30_000, &[])).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let rest = &who[1..];
    let spellings = [
        format!("/customers/%73{rest}/purchases"),
        format!("/customers/{who}/purchase%73"),
        format!("//customers/{who}/purchases"),
        format!("/./customers/{who}/purchases"),
        format!("/customers/x/../{who}/purchases"),
        format!("/customers/{who}/./purchases"),
        format!("/customers/{who}//purchases"),
        format!("/customers/{who}/purchases/"),
        format!("/CUSTOMERS/{who}/Purchases"),
        format!("/%63ustomers/{who}/purchases"),
    ];
    for path in &spellings {
        let r = raw::send(&gateway.base, &raw_purchase(path, 30_000, &[])).await;
        assert_eq!(r.status, 403, "{path} must be reserved: {}", r.text);
    }
    // Refused outright: spellings that servers disagree on.
    for path in [
        format!("/customers/{who}%2Fpurchases"),
        format!("/customers/{who}%2fpurchases"),
        format!("/customers/{who};v=1/purchases"),
        format!("/customers/{who}/..%2fpurchases"),
        format!("/customers/{who}%5Cpurchases"),
    ] {
        let r = raw::send(&gateway.base, &raw_purchase(&path, 30_000, &[])).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/problem+json")),
            "{}",
            r.text
        );
    }
    // The upstream saw the one reserved purchase, in its one spelling.
    assert_eq!(paths(&upstream), [canonical]);

    // One address, two owners, through two spellings of /accounts: one owner.
    let email = format!("{}@example.com", customer("spelled"));
    let body = json!({ "email": email, "name": "Ann" }).to_string();
    let first = raw::send(
        &gateway.base,
        &raw::post("//accounts", &["x-account-id: owner-1"], &body),
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.text);
    let second = raw::send(
        &gateway.base,
        &raw::post("/%61ccounts", &["x-account-id: owner-2"], &body),
    )
    .await;
    assert_eq!(second.status, 409, "{}", second.text);
    assert_eq!(upstream.count("/accounts"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_leaves_the_upstreams_path_prefix() {
    let upstream = Upstream::start().await;
    let base = format!("{}/public", upstream.url());
    let gateway = Gateway::start(&base, &shop_policy(), &[]).await;
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/%2e%2E/secret.txt",
        "/a/../../secret.txt",
        "/.%2e/secret.txt",
        "//../secret.txt",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = raw::send(&gateway.base, request.as_bytes()).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(r.json()["path"], "/public/secret.txt", "{path}");
    }
    for path in ["/..%2fsecret.txt", "/..%5csecret.txt", "/..\\secret.txt"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = raw::send(&gateway.base, request.as_bytes()).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
    }
    let seen = paths(&upstream);
    assert!(seen.iter().all(|p| p.starts_with("/public/")), "{seen:?}");
}

/// The shop's policy with a lease of its own on purchases.
fn shop_policy_with_lease(lease: &str) -> PolicyFile {
    let text = std::fs::read_to_string(shop_policy()).expect("read the shop's policy");
    let text = text.replacen(
        "path = \"/customers/{customer_id}/purchases\"\n",
        &format!("path = \"/customers/{{customer_id}}/purchases\"\nlease = \"{lease}\"\n"),
        1,
    );
    assert!(text.contains("lease ="), "the policy changed shape");
    PolicyFile::new(&text)
}

/// The cents of the purchases of `who` whose work the upstream did.
fn done_cents(upstream: &Upstream, who: &str) -> u64 {
    upstream
        .done()
        .iter()
        .filter(|s| s.path == purchases_of(who))
        .map(|s| {
            let body: Value = serde_json::from_slice(&s.body).expect("a purchase body");
            body["product_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|id| id.as_u64().expect("an id") * 100)
                .sum::<u64>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_slower_than_the_lease_is_waited_for_and_settles_the_hold() {
    let upstream = Upstream::start().await;
    let policy = shop_policy_with_lease("300ms");
    let gateway = Gateway::start(
        &upstream.url(),
        &policy.path,
        &[("GATEWAY_UPSTREAM_TIMEOUT", "5s")],
    )
    .await;
    let client = client();
    let who = customer("slow");
    // Three $300 purchases on a $500 budget, each taking three leases upstream.
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let request = client
                .post(gateway.url(&purchases_of(&who)))
                .header("x-upstream-sleep", "1000")
                .json(&json!({ "product_ids": [100, 100, 100] }));
            tokio::spawn(async move { request.send().await.expect("send").status() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("a purchase"));
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN
        ]
    );
    // The slow purchase was committed: $200 is left, not $500.
    let r = purchase(&gateway, &client, &who, &[100, 100, 100]).await;
    problem(r, StatusCode::FORBIDDEN).await;
    let r = purchase(&gateway, &client, &who, &[100, 100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(done_cents(&upstream, &who), 50_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_past_its_timeout_is_504_and_never_spends_more_than_was_reserved() {
    let upstream = Upstream::start().await;
    let policy = shop_policy_with_lease("300ms");
    let gateway = Gateway::start(
        &upstream.url(),
        &policy.path,
        &[("GATEWAY_UPSTREAM_TIMEOUT", "500ms")],
    )
    .await;
    let client = client();
    let who = customer("late");
    // Six slow $100 purchases and five quick ones on a $500 budget.
    let mut tasks = Vec::new();
    for i in 0..11 {
        let mut request = client
            .post(gateway.url(&purchases_of(&who)))
            .json(&json!({ "product_ids": [100] }));
        if i % 2 == 0 {
            request = request.header("x-upstream-sleep", "1500");
        }
        tasks.push(tokio::spawn(async move {
            let r = request.send().await.expect("send");
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut late = 0;
    for task in tasks {
        let (status, body) = task.await.expect("a purchase");
        match status {
            StatusCode::CREATED | StatusCode::FORBIDDEN => {}
            StatusCode::GATEWAY_TIMEOUT => {
                late += 1;
                let detail = body["detail"].as_str().unwrap_or_default();
                assert!(
                    detail.contains("within 500ms") && detail.contains("kept"),
                    "{body}"
                );
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(late >= 1, "the slow purchases time out");
    // Every slow purchase finishes upstream in the end (bounded wait): the upstream did no more
    // than the $500 that was reserved.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.done().len() < upstream.seen().len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.done().len(), upstream.seen().len());
    assert!(done_cents(&upstream, &who) <= 50_000);
    // A request on no route gets a 504 that says no more than what happened.
    let r = client
        .get(gateway.url("/anything"))
        .header("x-upstream-sleep", "1500")
        .send()
        .await
        .expect("send");
    let body = problem(r, StatusCode::GATEWAY_TIMEOUT).await;
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not answer within 500ms")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_must_come_once_are_refused_when_repeated() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let email = format!("{}@example.com", customer("twice"));
    let body = json!({ "email": email, "name": "Ann" }).to_string();
    let cases: Vec<Vec<u8>> = vec![
        raw::post(
            "/accounts",
            &["x-account-id: victim", "x-account-id: thief"],
            &body,
        ),
        raw::post(
            "/accounts",
            &["x-account-id: a-1", "Idempotency-Key: k1", "Idempotency-Key: k2"],
            &body,
        ),
        raw::post("/accounts", &["x-account-id: a-1", "Host: other"], &body),
        // Two lengths that differ (hyper reads two equal ones as one, as RFC 9112 §6.3 allows).
        format!(
            "POST /accounts HTTP/1.1\r\nHost: x\r\nx-account-id: a-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    ];
    for request in cases {
        let r = raw::send(&gateway.base, &request).await;
        assert_eq!(
            r.status,
            400,
            "{}\n-> {}",
            String::from_utf8_lossy(&request),
            r.text
        );
    }
    assert!(upstream.seen().is_empty(), "{:?}", paths(&upstream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_in_connection_are_gone_before_the_policy_reads_them() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let email = format!("{}@example.com", customer("conn"));
    let body = json!({ "email": email, "name": "Ann" }).to_string();
    // The owner header is named in Connection: it does not reach the policy, so the owner is
    // missing (400), as the upstream would never have seen it either.
    let request = format!(
        "POST /accounts HTTP/1.1\r\nHost: x\r\nConnection: close, x-account-id\r\nx-account-id: a-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw::send(&gateway.base, request.as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // A Connection value that is not a list of header names is refused, not skipped.
    let mut request = b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close, x-\xe9t\xe9\r\nx-\xe9t\xe9: 1\r\n\r\n".to_vec();
    let r = raw::send(&gateway.base, &request).await;
    assert_eq!(r.status, 400, "{}", r.text);
    request = b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close, a b\r\n\r\n".to_vec();
    let r = raw::send(&gateway.base, &request).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(upstream.seen().is_empty(), "{:?}", paths(&upstream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_the_gateways_never_the_clients() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let spoofed = "X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6;host=evil.example\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n";
    // HTTP/1.0 without Host, then HTTP/1.1 with one.
    let r = raw::send(
        &gateway.base,
        format!("GET /one HTTP/1.0\r\n{spoofed}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = raw::send(
        &gateway.base,
        format!("GET /two HTTP/1.1\r\nHost: shop.example\r\n{spoofed}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let h = |name: &str| s.headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(h("forwarded"), None, "{}", s.path);
        assert_eq!(h("x-real-ip"), Some("127.0.0.1"), "{}", s.path);
        assert_eq!(h("x-forwarded-proto"), Some("http"), "{}", s.path);
        assert_ne!(h("x-forwarded-host"), Some("evil.example"), "{}", s.path);
    }
    let h = |i: usize, name: &str| seen[i].headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(h(0, "x-forwarded-host"), None);
    assert_eq!(h(1, "x-forwarded-host"), Some("shop.example"));

    // HTTP/2 has no Host header: the request's authority is the forwarded host.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut request = http::Request::get(gateway.url("/three"))
        .body(http_body_util::Empty::new())
        .unwrap();
    for (name, value) in [
        ("x-forwarded-host", "evil.example"),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
    ] {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    let r = tokio::time::timeout(Duration::from_secs(10), h2.request(request))
        .await
        .expect("an HTTP/2 answer in time")
        .expect("an HTTP/2 answer");
    assert_eq!(r.status(), StatusCode::OK);
    let third = upstream
        .seen()
        .into_iter()
        .find(|s| s.path == "/three")
        .expect("the HTTP/2 request reached the upstream");
    let h = |name: &str| third.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        h("x-forwarded-host"),
        Some(raw::authority(&gateway.base).as_str())
    );
    assert_eq!(h("forwarded"), None);
    assert_eq!(h("x-real-ip"), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_heads_and_stalled_bodies_are_cut_off() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[("GATEWAY_HEADER_TIMEOUT", "500ms")],
    )
    .await;
    let bound = Duration::from_secs(10);
    // Nothing sent at all.
    let mut idle = raw::connect(&gateway.base).await;
    // Half a head.
    let mut half = raw::connect(&gateway.base).await;
    half.write_all(b"POST /accounts HTTP/1.1\r\nHost: x\r\nx-acc")
        .await
        .unwrap();
    // A kept-alive connection after its answer.
    let mut kept = raw::connect(&gateway.base).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = raw::read_head(&mut kept, bound).await.expect("an answer");
    assert_eq!(first.status, 200);
    for (what, stream) in [
        ("idle", &mut idle),
        ("half a head", &mut half),
        ("kept alive", &mut kept),
    ] {
        assert!(
            raw::closed_within(stream, bound).await,
            "{what}: not closed"
        );
    }
    // A head above the bound: 431.
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw::send(&gateway.base, big.as_bytes()).await;
    assert_eq!(r.status, 431, "{}", r.text);
    // More than 100 headers, however short: 431.
    let many: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let r = raw::send(
        &gateway.base,
        format!("GET /x HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 431, "{}", r.text);
    // A body that stops arriving: 408, on a reserved route and on any other.
    for path in ["/customers/stall/purchases", "/anything"] {
        let mut stream = raw::connect(&gateway.base).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"product_ids\""
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let r = raw::read_answer(&mut stream, bound)
            .await
            .expect("an answer");
        assert_eq!(r.status, 408, "{path}: {}", r.text);
    }
    // The unreserved request streamed on as it came; the purchase never left.
    assert_eq!(paths(&upstream), ["/anything"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[
            ("GATEWAY_HEADER_TIMEOUT", "1m"),
            ("GATEWAY_MAX_CONNECTIONS", "2"),
        ],
    )
    .await;
    // The health check's connection is gone by now, or goes within the wait below.
    let mut held: Vec<_> = Vec::new();
    for _ in 0..2 {
        let mut stream = raw::connect(&gateway.base).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = raw::read_head(&mut stream, Duration::from_secs(10)).await;
        assert_eq!(r.map(|r| r.status), Some(200));
        held.push(stream);
    }
    // A third is not served while both are held...
    let mut third = raw::connect(&gateway.base).await;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(
        raw::read_head(&mut third, Duration::from_millis(500))
            .await
            .is_none(),
        "a third connection was served beyond the limit"
    );
    // ...and is once one of them goes.
    drop(held.pop());
    let r = raw::read_head(&mut third, Duration::from_secs(10)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unsupported_requests_get_the_right_status() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &shop_policy(), &[]).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a malformed chunked body on no route",
            b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a coding other than chunked",
            b"POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (
            "CONNECT",
            b"CONNECT upstream.example:443 HTTP/1.1\r\nHost: upstream.example:443\r\nConnection: close\r\n\r\n".to_vec(),
            501,
        ),
        (
            "TRACE",
            b"TRACE / HTTP/1.1\r\nHost: x\r\nCookie: session=secret\r\nConnection: close\r\n\r\n".to_vec(),
            405,
        ),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(),
            400,
        ),
        (
            "HTTP/1.1 without Host",
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, request, status) in cases {
        let r = raw::send(&gateway.base, &request).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/problem+json")),
            "{what}: {}",
            r.text
        );
    }
    // A declared body above the route's limit, with Expect: 100-continue: 413 at once, never
    // 100 Continue first.
    let mut stream = raw::connect(&gateway.base).await;
    stream
        .write_all(b"POST /customers/big/purchases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = raw::read_head(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(r.status, 413, "{}", r.text);
    assert!(upstream.seen().is_empty(), "{:?}", paths(&upstream));
    // Within the limit, the gateway answers the expectation; the upstream gets only the body.
    let r = client()
        .post(gateway.url("/expecting"))
        .header("expect", "100-continue")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::CREATED);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "hello");
    assert!(seen[0].headers.get("expect").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_the_store_while_healthz_says_the_process_serves() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let client = client();
    let r = client.get(gateway.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    redis.stop();
    let r = client.get(gateway.url("/readyz")).send().await.unwrap();
    problem(r, StatusCode::SERVICE_UNAVAILABLE).await;
    let r = client.get(gateway.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_key_keys_the_policys_unique_values_in_the_store() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let secret = "a deployment secret for the gateway";
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[("REDIS_URL", &redis.url()), ("GATEWAY_DIGEST_KEY", secret)],
    )
    .await;
    let client = client();
    let email = format!("{}@example.com", customer("keyed"));
    let sign_up = |owner: &'static str| {
        client
            .post(gateway.url("/accounts"))
            .header("x-account-id", owner)
            .json(&json!({ "email": email, "name": "Ann" }))
            .send()
    };
    assert_eq!(sign_up("a-1").await.unwrap().status(), StatusCode::CREATED);
    let key = tower_reserve::DigestKey::new(secret).unwrap();
    let keyed = tower_reserve::Unique::keyed_email("accounts", &email, &key).digest_hex();
    let plain = tower_reserve::Unique::email("accounts", &email).digest_hex();
    let holding = |digest: &str| redis.cli(&["--scan", "--pattern", &format!("*{digest}*")]);
    assert!(
        !holding(&keyed).trim().is_empty(),
        "no key holds the keyed digest"
    );
    assert!(
        holding(&plain).trim().is_empty(),
        "the unkeyed digest is in Redis"
    );
    assert_eq!(sign_up("a-2").await.unwrap().status(), StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_does_not_undo_what_the_upstream_did() {
    let upstream = Upstream::start().await;
    // Even a route that asks to release when its client goes away: the upstream goes on.
    let text = std::fs::read_to_string(shop_policy()).expect("read the shop's policy");
    let text = text.replacen(
        "path = \"/customers/{customer_id}/purchases\"\n",
        "path = \"/customers/{customer_id}/purchases\"\non_disconnect = \"release\"\n",
        1,
    );
    let policy = PolicyFile::new(&text);
    let gateway = Gateway::start(&upstream.url(), &policy.path, &[]).await;
    let who = customer("gone");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(gateway.url(&purchases_of(&who)))
        .header("x-upstream-sleep", "1000")
        .json(&json!({ "product_ids": [100, 100, 100] }))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    // The upstream finishes, and its answer commits the hold (bounded wait).
    let client = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = gateway.metrics(&client).await;
        let committed = sample(
            &page,
            "tower_reserve_settlements_total",
            &[r#"result="committed""#],
        );
        if committed == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never committed: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done_cents(&upstream, &who), 30_000);
    let r = purchase(&gateway, &client, &who, &[100, 100, 100]).await;
    problem(r, StatusCode::FORBIDDEN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_heads_is_outlasted() {
    let upstream = Upstream::start().await;
    let server = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[
            ("GATEWAY_HEADER_TIMEOUT", "1s"),
            ("GATEWAY_MAX_CONNECTIONS", "50"),
        ],
    )
    .await;
    // Four times the connection limit, each holding half a head, all at once.
    let flood = raw::half_sent_heads(&server.base, 200).await;
    // A real request waits its turn and is served: the flood's connections are closed one
    // head timeout after they are accepted, never all at once, never by running out of files.
    let mut stream = raw::connect(&server.base).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = raw::read_head(&mut stream, Duration::from_secs(30)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_headers_name_the_route_never_the_budgets_key() {
    let upstream = Upstream::start().await;
    let text = std::fs::read_to_string(shop_policy()).expect("read the shop's policy");
    let text = text.replacen(
        "path = \"/customers/{customer_id}/purchases\"\n",
        "path = \"/customers/{customer_id}/purchases\"\nremaining_headers = true\n",
        1,
    );
    let policy = PolicyFile::new(&text);
    let gateway = Gateway::start(&upstream.url(), &policy.path, &[]).await;
    let client = client();
    let who = customer("headers");
    let r = purchase(&gateway, &client, &who, &[100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let header = |name: &str| r.headers()[name].to_str().unwrap().to_owned();
    let (policy, state) = (header("ratelimit-policy"), header("ratelimit"));
    assert!(
        !policy.contains(&who) && !state.contains(&who),
        "{policy} {state}"
    );
    let name = "\"/customers/{customer_id}/purchases\"";
    let prefix = format!("{name};q=50000;qu=\"units\";pk=:");
    assert!(policy.starts_with(&prefix), "{policy}");
    let pk = policy.split_once(";pk=").unwrap().1;
    assert_eq!(state, format!("{name};r=40000;pk={pk}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_or_idles_on_http2_is_disconnected() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &shop_policy(),
        &[("GATEWAY_HEADER_TIMEOUT", "500ms")],
    )
    .await;
    // A client that asks for a huge answer and reads none of it, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket
        .connect(raw::authority(&gateway.base).parse().unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then it reads: what was in the buffers, then the end, long before the whole answer.
    let mut read = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "the connection was never closed");
    assert!(read < support::gateway::HUGE, "read {read} bytes");

    // An HTTP/2 connection with no stream open is closed after the timeout.
    let tcp = tokio::net::TcpStream::connect(raw::authority(&gateway.base))
        .await
        .unwrap();
    let (mut send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(gateway.url("/healthz"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = send.send_request(request).await.expect("an answer");
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
}
