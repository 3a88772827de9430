//! Tracing: each request in a span of its own, with its hold id; unique values only as
//! digests. A test binary of its own: `tracing`'s callsite interest is process-wide, and a
//! test on another thread reaching a callsite first, with no subscriber there, races this one.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_reserve::{Claim, Extracted, RequestBody, ReserveLayer, Unique, extract};

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn requests_are_traced_with_their_hold_and_no_raw_values() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // Callsites another test's thread reached first (with no subscriber there) may have cached
    // that nobody listens: ask every callsite again, now that this thread's subscriber exists.
    tracing::callsite::rebuild_interest_cache();

    let store = tower_reserve::MemoryStore::new();
    let svc = ReserveLayer::new(store, |req: Request<Bytes>| async move {
        let email: String = extract::json_pointer(&req, "/email")?;
        Extracted::Ok((
            req,
            vec![Claim::own(Unique::email("accounts", &email), "acct-1")],
        ))
    })
    .layer(tower::service_fn(|_req: Request<RequestBody>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }));
    let req = Request::post("/accounts")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"email":"Secret.Person@Example.com"}"#,
        )))
        .unwrap();
    let answer = svc.oneshot(req).await.unwrap();
    assert_eq!(answer.status(), 200);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("reserve{"), "a span per request: {logs}");
    assert!(logs.contains(r#"path="/accounts""#), "{logs}");
    assert!(logs.contains("reserved"), "{logs}");
    assert!(logs.contains("settled"), "{logs}");
    assert!(
        !logs.to_lowercase().contains("secret.person"),
        "the address never reaches the logs: {logs}"
    );
    let digest = Unique::email("accounts", "secret.person@example.com").digest_hex();
    assert!(logs.contains(&digest), "its digest does: {logs}");
}
