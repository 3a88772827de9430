//! End to end: the compiled `hyper_service` example (plain hyper, no axum) as a child process,
//! over real HTTP on loopback.

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::example::{Example, client};

/// The example's source: it must stand for a service with no axum at all.
const SOURCE: &str = include_str!("../src/main.rs");

/// A wallet of its own for each case.
fn wallet(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn spend(api: &Example, client: &Client, wallet: &str, cents: u64) -> Response {
    client
        .post(api.url(&format!("/wallets/{wallet}/spend")))
        .json(&json!({ "cents": cents }))
        .send()
        .await
        .expect("send a spend")
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

#[test]
fn the_example_uses_no_axum() {
    for (n, line) in SOURCE.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        assert!(
            !code.contains("axum"),
            "line {} of examples/hyper_service/src/main.rs names axum: {line}",
            n + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spends_over_http() {
    let api = Example::start("hyper_service", "ADDR", &[]);
    let client = client();
    let w = wallet("w");

    // Within the limit: each spend says what is left of 1000 cents.
    for (cents, left) in [(400, 600), (250, 350), (350, 0)] {
        let r = spend(&api, &client, &w, cents).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, json!({ "remaining_cents": left }));
    }
    // Over budget: 403, with what was asked and what is left.
    let body = problem(spend(&api, &client, &w, 1).await, StatusCode::FORBIDDEN).await;
    assert_eq!(
        (body["requested"].as_u64(), body["remaining"].as_u64()),
        (Some(1), Some(0))
    );
    let body = problem(
        spend(&api, &client, &wallet("w"), 1_001).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(body["remaining"], 1000);

    // Anything else passes through unreserved.
    let r = client.get(api.url("/anything")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "ok": true }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_refused() {
    let api = Example::start("hyper_service", "ADDR", &[]);
    let client = client();
    let w = wallet("bad");
    let url = api.url(&format!("/wallets/{w}/spend"));
    let post = |content_type: &'static str, body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    // Not JSON by its content type: 415.
    let r = post("text/plain", b"{\"cents\": 5}".to_vec())
        .await
        .unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    // Malformed JSON: 400.
    let r = post("application/json", b"{\"cents\": ".to_vec())
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    // JSON of the wrong shape, nothing at /cents, or an amount of zero: 422.
    for body in [
        &b"{\"cents\": \"five\"}"[..],
        b"{\"amount\": 5}",
        b"{\"cents\": 0}",
    ] {
        let r = post("application/json", body.to_vec()).await.unwrap();
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    // Above 64 KiB: 413, whether or not the length is declared up front.
    let mut big = b"{\"cents\": 1, \"pad\": \"".to_vec();
    big.resize(64 * 1024 + 1, b'x');
    big.extend_from_slice(b"\"}");
    let r = post("application/json", big.clone()).await.unwrap();
    problem(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    let path = format!("/wallets/{w}/spend");
    let no_pause = std::time::Duration::ZERO;
    let status = post_in_chunks(&api, &path, &big, Framing::Chunked, no_pause).await;
    assert_eq!(status, 413);

    // Nothing of it was spent: the whole 1000 is left.
    let r = spend(&api, &client, &w, 1_000).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["remaining_cents"], 0);
}

/// How a body goes out in [`post_in_chunks`].
#[derive(Clone, Copy)]
enum Framing {
    /// `content-length` up front.
    Declared,
    /// `transfer-encoding: chunked`, no length up front.
    Chunked,
}

/// POSTs `body` as JSON in 4 KiB pieces, `pause` apart, over a plain TCP connection, and answers
/// the response's status. Every write must go through: a server that answers before the body
/// is in still reads the rest (within its bounds), so the client sees the answer, not a reset.
async fn post_in_chunks(
    api: &Example,
    path: &str,
    body: &[u8],
    framing: Framing,
    pause: std::time::Duration,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let length = match framing {
        Framing::Declared => format!("content-length: {}", body.len()),
        Framing::Chunked => "transfer-encoding: chunked".to_owned(),
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{length}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for (n, piece) in body.chunks(4096).enumerate() {
        let mut bytes = Vec::with_capacity(piece.len() + 16);
        match framing {
            Framing::Declared => bytes.extend_from_slice(piece),
            Framing::Chunked => {
                bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                bytes.extend_from_slice(piece);
                bytes.extend_from_slice(b"\r\n");
            }
        }
        if let Err(e) = stream.write_all(&bytes).await {
            panic!("piece {n} of the body could not be sent: {e}");
        }
        tokio::time::sleep(pause).await;
    }
    if let Framing::Chunked = framing {
        stream
            .write_all(b"0\r\n\r\n")
            .await
            .expect("the last chunk");
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut response),
    );
    read.await
        .expect("the response within 10 s")
        .expect("the response, not a reset");
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// A client still sending an oversized body when the 413 is decided (at once, from its
/// `content-length`, or once 64 KiB have come in) gets the 413, not a connection reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_still_being_sent_gets_its_413() {
    let api = Example::start("hyper_service", "ADDR", &[]);
    let w = wallet("slow");
    let mut big = b"{\"cents\": 1, \"pad\": \"".to_vec();
    big.resize(200 * 1024, b'x');
    big.extend_from_slice(b"\"}");
    let pause = std::time::Duration::from_millis(2);
    for framing in [Framing::Declared, Framing::Chunked] {
        let path = format!("/wallets/{w}/spend");
        let status = post_in_chunks(&api, &path, &big, framing, pause).await;
        assert_eq!(status, 413);
    }
    let r = spend(&api, &client(), &w, 1_000).await;
    assert_eq!(r.status(), StatusCode::OK, "nothing was spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_spends_are_granted_exactly_as_often_as_they_fit() {
    let api = Example::start("hyper_service", "ADDR", &[]);
    let client = client();
    let w = wallet("crowd");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let request = client
                .post(api.url(&format!("/wallets/{w}/spend")))
                .json(&json!({ "cents": 30 }))
                .send();
            tokio::spawn(async move {
                let r = request.await.expect("send a spend");
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut granted = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("a spend task") {
            (StatusCode::OK, body) => granted.push(body["remaining_cents"].as_u64().unwrap()),
            (StatusCode::FORBIDDEN, body) => {
                assert_eq!(body["requested"], 30);
                assert!(body["remaining"].as_u64().unwrap() < 30, "{body}");
                refused += 1;
            }
            (status, body) => panic!("unexpected {status}: {body}"),
        }
    }
    // floor(1000 / 30) = 33 fit; each saw its own remainder.
    assert_eq!(granted.len(), 33);
    assert_eq!(refused, 67);
    granted.sort_unstable();
    let expected: Vec<u64> = (0..33).map(|i| 10 + 30 * i).collect();
    assert_eq!(granted, expected);
    // And the wallet has exactly 10 cents left.
    let r = spend(&api, &client, &w, 10).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = problem(spend(&api, &client, &w, 1).await, StatusCode::FORBIDDEN).await;
    assert_eq!(body["remaining"], 0);
}
