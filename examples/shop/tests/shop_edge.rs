//! The shop at the edge, end to end over real sockets: requests spelled otherwise, sent twice,
//! sent slowly, connections beyond the limit, purchase-and-cancel churn, readiness. Raw bytes
//! where a client library would have corrected the request.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::raw;
use support::redis_server::RedisServer;
use support::shop::{Shop, client};
use tokio::io::AsyncWriteExt;

fn customer(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn is_problem(answer: &raw::Answer) -> bool {
    answer
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/problem+json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_the_purchase_path_never_spend() {
    let shop = Shop::start(&[]).await;
    let client = client();
    let who = customer("spell");
    let body = json!({ "product_ids": [100, 100, 100] }).to_string();
    let r = raw::send(
        &shop.base,
        &raw::post(&format!("/customers/{who}/purchases"), &[], &body),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let rest = &who[1..];
    for path in [
        format!("/customers/%73{rest}/purchases"),
        format!("/customers/{who}/purchase%73"),
        format!("//customers/{who}/purchases"),
        format!("/./customers/{who}/purchases"),
        format!("/customers/x/../{who}/purchases"),
        format!("/customers/{who}/purchases/"),
        format!("/customers/{who};x/purchases"),
    ] {
        let r = raw::send(&shop.base, &raw::post(&path, &[], &body)).await;
        assert!(matches!(r.status, 400 | 404 | 422), "{path}: {}", r.text);
        assert!(is_problem(&r), "{path}: {}", r.text);
    }
    let budget = shop.settled_budget(&client, &who).await;
    assert_eq!(budget["spent_cents"], 30_000, "{budget}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_must_come_once_and_unsupported_framing_are_refused() {
    let shop = Shop::start(&[]).await;
    let client = client();
    let who = customer("twice");
    let path = format!("/customers/{who}/purchases");
    let body = json!({ "product_ids": [100] }).to_string();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "two idempotency keys",
            raw::post(&path, &["Idempotency-Key: k1", "Idempotency-Key: k2"], &body),
            400,
        ),
        ("two hosts", raw::post(&path, &["Host: other"], &body), 400),
        (
            "HTTP/1.1 without Host",
            format!(
                "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
            400,
        ),
        (
            "a coding other than chunked",
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            501,
        ),
        (
            "TRACE",
            b"TRACE /healthz HTTP/1.1\r\nHost: x\r\nCookie: s=1\r\nConnection: close\r\n\r\n".to_vec(),
            405,
        ),
    ];
    for (what, request, status) in cases {
        let r = raw::send(&shop.base, &request).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert!(is_problem(&r), "{what}: {}", r.text);
    }
    // A declared body above 64 KiB with Expect: 100-continue: 413 at once.
    let mut stream = raw::connect(&shop.base).await;
    stream
        .write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = raw::read_head(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(r.status, 413, "{}", r.text);
    let budget = shop.settled_budget(&client, &who).await;
    assert_eq!(budget["spent_cents"], 0, "{budget}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_heads_and_stalled_bodies_are_cut_off() {
    let shop = Shop::start(&[("SHOP_HEADER_TIMEOUT", "500ms")]).await;
    let bound = Duration::from_secs(10);
    let mut idle = raw::connect(&shop.base).await;
    let mut half = raw::connect(&shop.base).await;
    half.write_all(b"POST /accounts HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    let mut kept = raw::connect(&shop.base).await;
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
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw::send(&shop.base, big.as_bytes()).await;
    assert_eq!(r.status, 431, "{}", r.text);
    let mut stream = raw::connect(&shop.base).await;
    stream
        .write_all(b"POST /customers/stall/purchases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"product_ids\"")
        .await
        .unwrap();
    let r = raw::read_answer(&mut stream, bound)
        .await
        .expect("an answer");
    assert_eq!(r.status, 408, "{}", r.text);
    assert!(is_problem(&r), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let shop = Shop::start(&[("SHOP_HEADER_TIMEOUT", "1m"), ("SHOP_MAX_CONNECTIONS", "2")]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = raw::connect(&shop.base).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = raw::read_head(&mut stream, Duration::from_secs(10)).await;
        assert_eq!(r.map(|r| r.status), Some(200));
        held.push(stream);
    }
    let mut third = raw::connect(&shop.base).await;
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
    drop(held.pop());
    let r = raw::read_head(&mut third, Duration::from_secs(10)).await;
    assert_eq!(r.map(|r| r.status), Some(200));
}

/// Keys in the Redis at `redis` that never expire.
fn keys_without_expiry(redis: &RedisServer) -> u64 {
    let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', '*')) do if redis.call('TTL', k) == -1 then n = n + 1 end end return n";
    let out = redis.cli(&["EVAL", script, "0"]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count: {out:?}"))
}

/// One keyed purchase and its cancellation.
async fn purchase_and_cancel(shop: &Shop, client: &reqwest::Client, who: &str) {
    let r = client
        .post(shop.url(&format!("/customers/{who}/purchases")))
        .header("idempotency-key", uuid::Uuid::new_v4().to_string())
        .json(&json!({ "product_ids": [10] }))
        .send()
        .await
        .expect("send a purchase");
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.expect("a purchase");
    let id = body["purchase_id"].as_str().expect("an id");
    let r = client
        .delete(shop.url(&format!("/customers/{who}/purchases/{id}")))
        .send()
        .await
        .expect("send a cancellation");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_and_cancel_churn_leaves_nothing_that_lasts() {
    let redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let who = customer("churn");
    for _ in 0..30 {
        purchase_and_cancel(&shop, &client, &who).await;
    }
    let after_some = keys_without_expiry(&redis);
    for _ in 0..60 {
        purchase_and_cancel(&shop, &client, &who).await;
    }
    // More cycles, not one more key for good: all they wrote expires.
    assert_eq!(keys_without_expiry(&redis), after_some);
    let budget = shop.settled_budget(&client, &who).await;
    assert_eq!(budget["spent_cents"], 0, "{budget}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_older_than_the_cancel_window_is_gone() {
    let shop = Shop::start(&[("SHOP_CANCEL_WINDOW", "1s")]).await;
    let client = client();
    let who = customer("old");
    let r = shop.purchase(&client, &who, &[100]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    let id = body["purchase_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = client
        .delete(shop.url(&format!("/customers/{who}/purchases/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GONE);
    let budget = shop.settled_budget(&client, &who).await;
    assert_eq!(budget["spent_cents"], 10_000, "{budget}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_the_store_while_healthz_says_the_process_serves() {
    let mut redis = RedisServer::start();
    let shop = Shop::start(&[("REDIS_URL", &redis.url())]).await;
    let client = client();
    let r = client.get(shop.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    redis.stop();
    let r = client.get(shop.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = client.get(shop.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Whether any key in the Redis at `redis` holds `digest`.
fn has_key_with(redis: &RedisServer, digest: &str) -> bool {
    !redis
        .cli(&["--scan", "--pattern", &format!("*{digest}*")])
        .trim()
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_key_keys_the_addresses_in_the_store() {
    let redis = RedisServer::start();
    let secret = "a deployment secret for the shop";
    let shop = Shop::start(&[("REDIS_URL", &redis.url()), ("SHOP_DIGEST_KEY", secret)]).await;
    let client = client();
    let email = format!("{}@example.com", customer("keyed"));
    let r = shop.sign_up(&client, &email, "Ann").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let key = tower_reserve::DigestKey::new(secret).unwrap();
    let keyed = tower_reserve::Unique::keyed_email("accounts", &email, &key).digest_hex();
    let plain = tower_reserve::Unique::email("accounts", &email).digest_hex();
    assert!(
        has_key_with(&redis, &keyed),
        "no key holds the keyed digest"
    );
    assert!(
        !has_key_with(&redis, &plain),
        "the unkeyed digest is in Redis"
    );
    // The keyed address is still one account's.
    let r = shop.sign_up(&client, &email.to_uppercase(), "Bob").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_reused_keys_are_not_store_errors() {
    let shop = Shop::start(&[]).await;
    let client = client();
    let who = customer("replay");
    let url = shop.url(&format!("/customers/{who}/purchases"));
    let send = |products: Value| {
        client
            .post(&url)
            .header("idempotency-key", "the-same-key")
            .json(&json!({ "product_ids": products }))
            .send()
    };
    assert_eq!(
        send(json!([1])).await.unwrap().status(),
        StatusCode::CREATED
    );
    for _ in 0..3 {
        assert_eq!(
            send(json!([1])).await.unwrap().status(),
            StatusCode::CREATED
        );
        assert_eq!(
            send(json!([2])).await.unwrap().status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
    let page = client
        .get(shop.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: f64 = page
        .lines()
        .filter(|l| l.starts_with("tower_reserve_store_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_heads_is_outlasted() {
    let server = Shop::start(&[
        ("SHOP_HEADER_TIMEOUT", "1s"),
        ("SHOP_MAX_CONNECTIONS", "50"),
    ])
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
