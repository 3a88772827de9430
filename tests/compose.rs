//! The layer among tower-http's layers and axum's extractors, as users stack them: each layer
//! inside and outside it, with a route's own `route_layer`, and `Option<Hold>` for a handler
//! that serves requests with and without claims.

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::fresh;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_reserve::{Budget, Claim, Extracted, Hold, MemoryStore, ReserveLayer, Store, extract};

/// Spends the `x-amount` header's amount from `budget`; a request without one claims nothing.
fn spending(
    store: MemoryStore,
    budget: Budget,
) -> ReserveLayer<MemoryStore, impl tower_reserve::ExtractClaims> {
    ReserveLayer::new(store, move |req: Request<Bytes>| {
        let budget = budget.clone();
        async move {
            let claims = match extract::header(&req, "x-amount") {
                Ok(amount) => vec![Claim::spend(budget, amount.parse().unwrap_or(1))],
                Err(_) => Vec::new(),
            };
            Extracted::Ok((req, claims))
        }
    })
}

async fn handler(hold: Option<Hold>) -> String {
    match hold {
        Some(hold) => format!("held {}", hold.budgets().map(|(_, a)| a).sum::<u64>()),
        None => "nothing held".to_owned(),
    }
}

fn purchase(amount: Option<u64>) -> Request<String> {
    let mut req = Request::post("/buy");
    if let Some(amount) = amount {
        req = req.header("x-amount", amount.to_string());
    }
    req.body(String::new()).unwrap()
}

async fn text(response: axum::response::Response) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn option_hold_is_none_without_claims_and_some_with() {
    let store = MemoryStore::new();
    let budget = Budget::new(fresh("opt"), 100);
    let app: Router = Router::new()
        .route("/buy", post(handler))
        .route_layer(spending(store.clone(), budget.clone()));
    let (status, body) = text(app.clone().oneshot(purchase(Some(7))).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "held 7"));
    let (status, body) = text(app.oneshot(purchase(None)).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "nothing held"));
    assert_eq!(store.budget(&budget).await.unwrap().spent, 7);
}

/// tower-http's common layers inside `route_layer` next to the reservation, and outside the
/// whole router: every stack builds, serves, and settles.
#[tokio::test]
async fn tower_http_layers_compose_inside_and_outside() {
    let store = MemoryStore::new();
    let budget = Budget::new(fresh("stack"), 1_000);
    let inside: Router = Router::new().route("/buy", post(handler)).route_layer(
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(CatchPanicLayer::new())
            .layer(TimeoutLayer::with_status_code(
                StatusCode::GATEWAY_TIMEOUT,
                Duration::from_secs(5),
            ))
            .layer(spending(store.clone(), budget.clone()))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::GATEWAY_TIMEOUT,
                Duration::from_secs(5),
            ))
            .layer(CatchPanicLayer::new())
            .layer(CompressionLayer::new())
            .layer(RequestBodyLimitLayer::new(1024)),
    );
    let (status, body) = text(inside.oneshot(purchase(Some(10))).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "held 10"));

    let outside = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_secs(5),
        ))
        .layer(CompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(1024))
        .service(
            Router::new()
                .route("/buy", post(handler))
                .route_layer(spending(store.clone(), budget.clone())),
        );
    let response = outside.oneshot(purchase(Some(20))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"held 20");
    assert_eq!(store.budget(&budget).await.unwrap().spent, 30);
}
