//! An axum router with a different policy per route.
//!
//! ```text
//! cargo run -p axum_routes
//! curl -i -X POST localhost:3002/tenants/t1/jobs -H 'content-type: application/json' -d '{"cpu_seconds": 30}'
//! curl -i -X POST localhost:3002/usernames -H 'content-type: application/json' -d '{"username": "Ann", "user_id": "u1"}'
//! curl -i localhost:3002/tenants/t1/quota
//! ```
//!
//! `POST /tenants/{tenant}/jobs` spends CPU seconds against a daily quota (premium tenants get
//! more); `POST /usernames` claims a username; `GET /tenants/{tenant}/quota` shows the quota, read
//! through the same [`BudgetOf`] the jobs route reserves by. `GET` routes are not reserved.

use std::borrow::Cow;
use std::time::Duration;

use axum::Router;
use axum::routing::{get_service, post};
use bytes::Bytes;
use http::{Request, StatusCode};
use tower_reserve::{
    Budget, BudgetOf, Claim, Extracted, Hold, MemoryStore, ReserveLayer, Unique, Window, extract,
    usage,
};

/// A tenant's daily quota of CPU seconds: the one place its key, limit and window are decided,
/// for the jobs route and the quota read alike.
fn cpu_quota() -> BudgetOf {
    BudgetOf::new(|req: &Request<Bytes>| {
        let tenant = extract::path_param(req, "tenant")?;
        let limit = if tenant.starts_with("premium-") {
            36_000
        } else {
            3_600
        };
        Ok(Budget::new(format!("cpu:{tenant}"), limit).per(Window::Day))
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = MemoryStore::new();

    let jobs = ReserveLayer::new(
        store.clone(),
        cpu_quota().spend(|req: &Request<Bytes>| extract::json_pointer(req, "/cpu_seconds")),
    )
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
            post(|hold: Hold| async move {
                let left = hold
                    .budgets()
                    .next()
                    .and_then(|(b, _)| hold.remaining_of(b));
                (
                    StatusCode::CREATED,
                    format!("job accepted, {left:?} seconds left today\n"),
                )
            })
            .route_layer(jobs),
        )
        .route(
            "/usernames",
            post(|| async { (StatusCode::CREATED, "username taken for you\n") })
                .route_layer(usernames),
        )
        .route(
            "/tenants/{tenant}/quota",
            get_service(usage(store, cpu_quota())),
        );

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3002".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
