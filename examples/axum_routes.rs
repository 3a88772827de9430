//! An axum router with a different policy per route.
//!
//! ```text
//! cargo run --example axum_routes
//! curl -i -X POST localhost:3002/tenants/t1/jobs -H 'content-type: application/json' -d '{"cpu_seconds": 30}'
//! curl -i -X POST localhost:3002/usernames -H 'content-type: application/json' -d '{"username": "Ann", "user_id": "u1"}'
//! curl -i localhost:3002/tenants/t1/quota
//! ```
//!
//! `POST /tenants/{tenant}/jobs` spends CPU seconds against a daily quota (premium tenants get
//! more); `POST /usernames` claims a username. `GET` routes are not reserved.

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{Request, StatusCode};
use tower_reserve::{
    Budget, Claim, Extracted, Hold, MemoryStore, ReserveLayer, Store, Unique, Window, extract,
};

/// A per-key limit, as a read model would answer it.
async fn daily_quota(tenant: &str) -> u64 {
    tokio::task::yield_now().await;
    if tenant.starts_with("premium-") {
        36_000
    } else {
        3_600
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = MemoryStore::new();

    let jobs = ReserveLayer::new(store.clone(), |req: Request<Bytes>| async move {
        let tenant = extract::path_param(&req, "tenant")?.to_owned();
        let seconds: u64 = extract::json_pointer(&req, "/cpu_seconds")?;
        let budget =
            Budget::new(format!("cpu:{tenant}"), daily_quota(&tenant).await).per(Window::Day);
        Extracted::Ok((req, vec![Claim::spend(budget, seconds)]))
    })
    .lease(Duration::from_secs(5));

    let usernames = ReserveLayer::new(store.clone(), |req: Request<Bytes>| async move {
        let name: String = extract::json_pointer(&req, "/username")?;
        let user: String = extract::json_pointer(&req, "/user_id")?;
        let value = Unique::normalized("usernames", &name, |n| Cow::Owned(n.trim().to_lowercase()));
        Extracted::Ok((req, vec![Claim::own(value, user)]))
    });

    let app = Router::new()
        .route(
            "/tenants/{tenant}/jobs",
            post(|hold: axum::Extension<Hold>| async move {
                (StatusCode::CREATED, format!("job accepted, {:?} seconds left today\n", hold.remaining()[0]))
            })
            .route_layer(jobs),
        )
        .route("/usernames", post(|| async { (StatusCode::CREATED, "username taken for you\n") }).route_layer(usernames))
        .route(
            "/tenants/{tenant}/quota",
            get(|State(store): State<MemoryStore>, Path(tenant): Path<String>| async move {
                let budget = Budget::new(format!("cpu:{tenant}"), daily_quota(&tenant).await).per(Window::Day);
                match store.budget(&budget).await {
                    Ok(s) => Ok(Json(serde_json::json!({
                        "limit": s.limit, "spent": s.spent, "held": s.held, "remaining": s.remaining,
                    }))),
                    Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                }
            }),
        )
        .with_state(store);

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3002".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
