//! End to end, on the embedded store, one Redis node and a Cluster: what a client that retries
//! can count on. Idempotency keys (one charge however many sends race; the first answer again,
//! across restarts on Redis), cancellations (the amount back once) and the metrics that show it.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::redis_server::{RedisCluster, RedisServer};
use support::shop::{Shop, client};

/// Where a shop under test keeps its claims; the servers stop when it is dropped.
enum Backend {
    Embedded,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    fn embedded() -> Self {
        Backend::Embedded
    }

    fn redis() -> Self {
        Backend::Redis(RedisServer::start())
    }

    fn cluster() -> Self {
        Backend::Cluster(RedisCluster::start(3, 0))
    }

    /// A shop on this backend (a second one on Redis shares the first one's data).
    async fn shop(&self) -> Shop {
        match self {
            Backend::Embedded => Shop::start(&[]).await,
            Backend::Redis(redis) => Shop::start(&[("REDIS_URL", &redis.url())]).await,
            Backend::Cluster(cluster) => {
                Shop::start(&[("REDIS_CLUSTER_URLS", &cluster.urls().join(","))]).await
            }
        }
    }
}

macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::embedded()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::redis()).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::cluster()).await;
                }
            )*
        }
    };
}

on_every_store!(
    one_key_is_one_charge,
    failures_are_replayed_as_failures,
    cancelled_once,
);

fn customer(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn keyed_purchase(
    shop: &Shop,
    client: &Client,
    who: &str,
    key: &str,
    products: &[u64],
) -> Response {
    client
        .post(shop.url(&format!("/customers/{who}/purchases")))
        .header("idempotency-key", key)
        .json(&json!({ "product_ids": products }))
        .send()
        .await
        .expect("send a purchase")
}

fn replayed(r: &Response) -> bool {
    r.headers()
        .get("idempotency-replayed")
        .is_some_and(|v| v == "true")
}

/// Asserts an RFC 9457 problem with this status and answers its body.
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
        "{status}: {content_type:?}"
    );
    let body: Value = r.json().await.expect("a problem body");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "no {member} in {body}");
    }
    body
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys

async fn one_key_is_one_charge(backend: Backend) {
    let shop = backend.shop().await;
    let client = client();
    let who = customer("keyed");
    let key = format!("order-{}", uuid::Uuid::new_v4());

    // 50 sends of one purchase at once, the first of them slow enough that the others meet it
    // in flight or after it finished.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, url, key) = (
                client.clone(),
                shop.url(&format!("/customers/{who}/purchases")),
                key.clone(),
            );
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .header("idempotency-key", key)
                    .header("x-simulate", "sleep=100")
                    .json(&json!({ "product_ids": [30] }))
                    .send()
                    .await
                    .expect("send a purchase");
                let status = r.status();
                let retry_after = r.headers().get("retry-after").is_some();
                let body: Value = r.json().await.expect("a JSON body");
                (status, retry_after, body)
            })
        })
        .collect();
    let mut created = Vec::new();
    for task in tasks {
        let (status, retry_after, body) = task.await.expect("a request task");
        match status {
            StatusCode::CREATED => created.push(body),
            StatusCode::CONFLICT => {
                assert!(retry_after, "a 409 in flight says when to retry: {body}");
                assert_eq!(body["status"], 409);
            }
            other => panic!("every answer is 201 or 409, not {other}: {body}"),
        }
    }
    assert!(!created.is_empty(), "the first send succeeds");
    let purchase_id = created[0]["purchase_id"].clone();
    assert!(purchase_id.is_string());
    for body in &created {
        assert_eq!(body, &created[0], "every 201 is the one purchase");
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 3000, "charged exactly once: {b}");
    assert_eq!(b["held_cents"], 0);

    // Once it finished, a retry gets the same 201, marked as a replay, and spends nothing.
    let r = keyed_purchase(&shop, &client, &who, &key, &[30]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(replayed(&r), "a replay says so");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, created[0]);
    assert_eq!(shop.settled_budget(&client, &who).await, b);

    // The same key with another body is another request: 422, nothing spent.
    let r = keyed_purchase(&shop, &client, &who, &key, &[31]).await;
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(shop.settled_budget(&client, &who).await, b);

    // Keys are per path: the same key for another customer, or for a sign-up, is a new request.
    let other = customer("keyed-other");
    let r = keyed_purchase(&shop, &client, &other, &key, &[30]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(!replayed(&r));
    let body: Value = r.json().await.unwrap();
    assert_ne!(body["purchase_id"], purchase_id);
    let email = format!("{}@keys.example", customer("k"));
    let sign_up = |email: String| {
        client
            .post(shop.url("/accounts"))
            .header("idempotency-key", &key)
            .json(&json!({ "email": email, "name": "K" }))
            .send()
    };
    let first = sign_up(email.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    let first: Value = first.json().await.unwrap();
    let again = sign_up(email.clone()).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(replayed(&again));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["account_id"], first["account_id"], "one account");

    // Keys as clients send them: bare or quoted; anything else is 400 and changes nothing.
    let quoted = format!("\"{key}-q\"");
    let r = keyed_purchase(&shop, &client, &who, &quoted, &[1]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = keyed_purchase(&shop, &client, &who, &format!("{key}-q"), &[1]).await;
    assert!(
        replayed(&r),
        "a quoted key and its bare spelling are one key"
    );
    for bad in ["", "two words", &"k".repeat(256), "\"unclosed"] {
        let r = keyed_purchase(&shop, &client, &who, bad, &[1]).await;
        problem(r, StatusCode::BAD_REQUEST).await;
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 3100, "{b}");
}

async fn failures_are_replayed_as_failures(backend: Backend) {
    let shop = backend.shop().await;
    let client = client();
    let who = customer("declined");
    let key = format!("try-{}", uuid::Uuid::new_v4());
    let r = client
        .post(shop.url(&format!("/customers/{who}/purchases")))
        .header("idempotency-key", &key)
        .header("x-simulate", "decline")
        .json(&json!({ "product_ids": [40] }))
        .send()
        .await
        .unwrap();
    let declined = problem(r, StatusCode::PAYMENT_REQUIRED).await;

    // The retry does not run the handler (which would now succeed): it learns the first failed.
    let r = keyed_purchase(&shop, &client, &who, &key, &[40]).await;
    assert!(replayed(&r));
    assert_eq!(problem(r, StatusCode::PAYMENT_REQUIRED).await, declined);
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 0, "{b}");
    assert_eq!(b["held_cents"], 0);

    // A request the layer refused before any handler ran leaves its key free: over budget
    // now, the same key works once the budget allows it.
    let big = format!("big-{}", uuid::Uuid::new_v4());
    let r = keyed_purchase(&shop, &client, &who, &big, &[400, 200]).await;
    problem(r, StatusCode::FORBIDDEN).await;
    let r = keyed_purchase(&shop, &client, &who, &big, &[400, 100]).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "another body, after a refusal"
    );
}

// ---------------------------------------------------------------------------------------------
// Cancellations

async fn cancel(shop: &Shop, client: &Client, who: &str, purchase_id: &str) -> Response {
    client
        .delete(shop.url(&format!("/customers/{who}/purchases/{purchase_id}")))
        .send()
        .await
        .expect("send a cancellation")
}

async fn cancelled_once(backend: Backend) {
    let shop = backend.shop().await;
    let client = client();
    let who = customer("cancel");
    let mut ids = Vec::new();
    for products in [&[100, 20][..], &[50], &[70]] {
        let r = shop.purchase(&client, &who, products).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let body: Value = r.json().await.unwrap();
        ids.push(body["purchase_id"].as_str().unwrap().to_owned());
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 24_000);

    // Cancelled: the amount is back, once; a repeat answers the same and gives nothing again.
    let r = cancel(&shop, &client, &who, &ids[0]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"purchase_id": ids[0], "customer_id": who, "refunded_cents": 12_000, "remaining_cents": 38_000})
    );
    let r = cancel(&shop, &client, &who, &ids[0]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["refunded_cents"], 12_000);
    assert_eq!(again["remaining_cents"], 38_000);

    // 40 cancellations of one purchase at once, racing purchases near the limit: the amount
    // comes back once, and nothing above the limit is ever granted.
    let racers: Vec<_> = (0..40)
        .map(|i| {
            let (client, cancel_url, buy_url) = (
                client.clone(),
                shop.url(&format!("/customers/{who}/purchases/{}", ids[1])),
                shop.url(&format!("/customers/{who}/purchases")),
            );
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let r = client.delete(cancel_url).send().await.unwrap();
                    let status = r.status();
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(status, StatusCode::OK, "{body}");
                    assert_eq!(body["refunded_cents"], 5000);
                    0
                } else {
                    let r = client
                        .post(buy_url)
                        .json(&json!({ "product_ids": [25] }))
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::CREATED => 2500,
                        StatusCode::FORBIDDEN => 0,
                        other => panic!("a purchase is 201 or 403, not {other}"),
                    }
                }
            })
        })
        .collect();
    let mut bought = 0;
    for racer in racers {
        bought += racer.await.expect("a racing request");
    }
    let b = shop.settled_budget(&client, &who).await;
    assert_eq!(
        b["spent_cents"].as_u64().unwrap(),
        24_000 - 12_000 - 5000 + bought,
        "{b}"
    );
    assert!(b["spent_cents"].as_u64().unwrap() <= 50_000);
    assert_eq!(b["held_cents"], 0);

    // Another customer's purchase, a made-up id, an id with one character changed: 404, and
    // nothing moves.
    let before = shop.settled_budget(&client, &who).await;
    let stranger = customer("stranger");
    problem(
        cancel(&shop, &client, &stranger, &ids[2]).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        cancel(&shop, &client, &who, "no-such-purchase").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let mut forged = ids[2].clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    problem(
        cancel(&shop, &client, &who, &forged).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(shop.settled_budget(&client, &who).await, before);
    let stranger_budget = shop.settled_budget(&client, &stranger).await;
    assert_eq!(stranger_budget["spent_cents"], 0);
}

// ---------------------------------------------------------------------------------------------
// Across restarts: only Redis keeps keys and cancellations past the process

async fn a_restarted_shop_answers_as_the_first_did(backend: Backend) {
    let client = client();
    let who = customer("restart");
    let key = format!("order-{}", uuid::Uuid::new_v4());
    let first = backend.shop().await;
    let r = keyed_purchase(&first, &client, &who, &key, &[12]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let original: Value = r.json().await.unwrap();
    let other = first.purchase(&client, &who, &[8]).await;
    let other: Value = other.json().await.unwrap();
    drop(first);

    let second = backend.shop().await;
    let r = keyed_purchase(&second, &client, &who, &key, &[12]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(replayed(&r));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, original, "the same 201, from the store");
    // A purchase the first shop made is cancelled by the second: they sign ids with one key.
    let purchase_id = other["purchase_id"].as_str().unwrap();
    let r = cancel(&second, &client, &who, purchase_id).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = second.settled_budget(&client, &who).await;
    assert_eq!(b["spent_cents"], 1200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_restarted_shop_answers_as_the_first_did() {
    a_restarted_shop_answers_as_the_first_did(Backend::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_a_restarted_shop_answers_as_the_first_did() {
    a_restarted_shop_answers_as_the_first_did(Backend::cluster()).await;
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The value of the sample of `name` whose labels include every one of `labels`, summed over
/// the samples that match.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let matches = series.starts_with(name)
                && series[name.len()..].starts_with(['{', ' '])
                && labels.iter().all(|l| series.contains(l));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_as_requests_are_served() {
    let shop = Shop::start(&[]).await;
    let client = client();
    let scrape = || async {
        let r = client.get(shop.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap()
    };
    let route = r#"route="/customers/{customer_id}/purchases""#;
    let before = scrape().await;
    let who = customer("metrics");
    for _ in 0..3 {
        assert_eq!(
            shop.purchase(&client, &who, &[100]).await.status(),
            StatusCode::CREATED
        );
    }
    let r = shop.purchase(&client, &who, &[10_000]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = scrape().await;

    let granted = |text: &str| {
        sample(
            text,
            "tower_reserve_reservations_total",
            &[route, r#"outcome="granted""#],
        )
    };
    let committed = |text: &str| {
        sample(
            text,
            "tower_reserve_settlements_total",
            &[route, r#"result="committed""#],
        )
    };
    let over_budget = |text: &str| {
        sample(
            text,
            "tower_reserve_denials_total",
            &[route, r#"reason="over_budget""#],
        )
    };
    assert_eq!(granted(&after) - granted(&before), 3.0, "{after}");
    assert_eq!(committed(&after) - committed(&before), 3.0, "{after}");
    assert_eq!(over_budget(&after) - over_budget(&before), 1.0, "{after}");
    assert!(!after.contains(&who), "never labelled by customer: {after}");
}
