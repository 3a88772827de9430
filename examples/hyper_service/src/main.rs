//! A plain hyper 1 service, wrapped with the layer and served with hyper-util: no axum.
//!
//! ```text
//! cargo run -p hyper_service
//! curl -i -X POST localhost:3001/wallets/w1/spend -H 'content-type: application/json' -d '{"cents": 400}'
//! ```
//!
//! Each wallet may spend 1000 cents in total; one `Routes` table holds the policy per route.
//!
//! | method and path | body | success | errors |
//! | --- | --- | --- | --- |
//! | `POST /wallets/{wallet}/spend` | `{"cents": u64}` | `200` `{"remaining_cents"}` | `403` over budget, `400`/`415`/`422` bad body, `413` over 64 KiB (problem+json) |
//! | anything else | | `200` `{"ok": true}` | |
//!
//! The layer takes any request body, hyper's `Incoming` included; it reads the body (within its
//! limit) to work out the claims and hands the inner service a [`RequestBody`] with the same
//! bytes. So the inner service is a tower service of `Request<RequestBody>` (tower's
//! `service_fn`), and hyper-util's `TowerToHyperService` serves the whole stack. The address is
//! `ADDR` (default `127.0.0.1:3001`).

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_reserve::{
    Budget, Claim, Extracted, Hold, MemoryStore, RequestBody, ReserveLayer, Routes, extract,
};

async fn handle(req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let left = req.extensions().get::<Hold>().and_then(|hold| {
        hold.budgets()
            .next()
            .and_then(|(b, _)| hold.remaining_of(b))
    });
    let body = match left {
        Some(left) => format!("{{\"remaining_cents\":{left}}}"),
        None => "{\"ok\":true}".to_owned(),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let routes = Routes::new().route(
        Method::POST,
        "/wallets/{wallet}/spend",
        |req: Request<Bytes>| async move {
            let wallet = extract::path_param(&req, "wallet")?.to_owned();
            let cents: u64 = extract::json_pointer(&req, "/cents")?;
            Extracted::Ok((req, vec![Claim::spend(Budget::new(wallet, 1_000), cents)]))
        },
    );
    // Requests go in as hyper gives them (`Request<Incoming>`); `handle` gets `RequestBody`.
    let service = ServiceBuilder::new()
        .layer(ReserveLayer::new(MemoryStore::new(), routes))
        .service_fn(handle);

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
