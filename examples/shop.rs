//! The shop: a customer may not buy more than a fixed amount in total, and an e-mail address
//! belongs to one account at a time. The HTTP contract is in `shared/shop-api.md`.
//!
//! ```text
//! cargo run --release --example shop
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release --example shop
//! ```
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `SHOP_ADDR` | address to listen on | `127.0.0.1:3000` |
//! | `REDIS_URL` | one Redis node | unset: the embedded in-memory store |
//! | `REDIS_CLUSTER_URLS` | comma-separated Redis Cluster seed nodes | unset |
//! | `SHOP_BUDGET_CENTS` | every customer's lifetime spend limit | `50000` |
//! | `SHOP_LEASE_MS` | how long a hold lives if nobody settles it | `30000` |
//! | `SHOP_FAULTS` | `1` turns on the `X-Simulate` request header | off |

use std::any::Any;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_reserve::{
    Budget, Claim, Disconnect, Extracted, Hold, MemoryStore, RedisStore, Rejection, RejectionKind,
    ReserveLayer, Store, Unique, extract, normalize_email,
};

/// The configuration read from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every customer's lifetime spend limit, in cents.
    pub budget_cents: u64,
    /// The lease of every hold.
    pub lease: Duration,
    /// Whether `X-Simulate` is honoured.
    pub faults: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            budget_cents: 50_000,
            lease: Duration::from_secs(30),
            faults: false,
        }
    }
}

/// The unique namespace of account e-mail addresses.
const EMAILS: &str = "accounts";
/// The most product ids one purchase may name.
const MAX_ITEMS: usize = 100;
/// The catalogue's highest product id.
const MAX_PRODUCT: u64 = 10_000;

// ---------------------------------------------------------------------------------------------
// Problems (RFC 9457)

fn problem(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Response {
    Rejection::new(status, title, detail.into())
        .into_response()
        .into_response()
}

fn not_found(detail: impl Into<String>) -> Response {
    problem(StatusCode::NOT_FOUND, "Not found", detail)
}

fn unprocessable(detail: impl Into<String>) -> Response {
    problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Unprocessable content",
        detail,
    )
}

/// Renders the layer's rejections; over-budget answers carry `requested_cents` and
/// `remaining_cents`.
fn render_rejection(rejection: Rejection) -> http::Response<http_body_util::Full<Bytes>> {
    let rejection = match rejection.kind().clone() {
        RejectionKind::OverBudget {
            requested,
            remaining,
            ..
        } => rejection
            .with_detail(format!(
                "this purchase costs {requested} cents, but only {remaining} cents of the budget remain"
            ))
            .with("requested_cents", requested)
            .with("remaining_cents", remaining),
        RejectionKind::Taken { .. } => {
            rejection.with_detail("the e-mail address is already taken by another account")
        }
        _ => rejection,
    };
    rejection.into_response()
}

/// The response of a handler that panicked.
fn panic_response(
    _panic: Box<dyn Any + Send + 'static>,
) -> http::Response<http_body_util::Full<Bytes>> {
    Rejection::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error",
        "the handler failed; nothing was kept",
    )
    .into_response()
}

/// Turns every error response that is not a problem yet (axum's own 404, 405, rejections) into
/// one, keeping its status and headers such as `Allow`.
async fn problems_everywhere(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let title = status.canonical_reason().unwrap_or("Error");
    let detail = if text.is_empty() {
        title.to_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    }))
    .expect("JSON values serialize");
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

async fn fallback() -> Response {
    not_found("no such resource")
}

// ---------------------------------------------------------------------------------------------
// The catalogue

/// The price of a product in cents, from the (here simulated) product repository.
async fn price(product_id: u64) -> Option<u64> {
    tokio::task::yield_now().await;
    (1..=MAX_PRODUCT)
        .contains(&product_id)
        .then(|| product_id * 100)
}

// ---------------------------------------------------------------------------------------------
// Accounts: the aggregate lives in the app, the e-mail claims in the store.

#[derive(Debug, Clone)]
struct Account {
    email: String,
    name: String,
}

type Accounts = Arc<Mutex<HashMap<String, Account>>>;

fn account_json(id: &str, account: &Account) -> serde_json::Value {
    json!({ "account_id": id, "email": account.email, "name": account.name })
}

/// Whether a normalized address looks like an e-mail address.
fn is_email(address: &str) -> bool {
    if address.is_empty() || address.len() > 254 || address.chars().any(char::is_whitespace) {
        return false;
    }
    let mut parts = address.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

fn valid_customer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A path parameter of the matched route (`{customer_id}`, `{account_id}`), as text.
fn param<B>(req: &Request<B>, name: &str) -> String {
    extract::path_param(req, name).unwrap_or("").to_owned()
}

fn customer_budget(customer_id: &str, cfg: &Config) -> Budget {
    Budget::new(format!("customer:{customer_id}"), cfg.budget_cents)
}

/// What the purchase extractor worked out, for the handler.
#[derive(Debug, Clone)]
struct Purchase {
    customer_id: String,
    amount_cents: u64,
}

#[derive(Deserialize)]
struct PurchaseBody {
    product_ids: Vec<u64>,
}

#[derive(Deserialize)]
struct SignUpBody {
    email: String,
    name: String,
}

#[derive(Deserialize)]
struct EmailBody {
    email: String,
}

/// A sign-up the extractor validated, with the account id it minted.
#[derive(Debug, Clone)]
struct SignUp {
    account_id: String,
    email: String,
    name: String,
}

/// An e-mail change the extractor validated.
#[derive(Debug, Clone)]
struct EmailChange {
    account_id: String,
    email: String,
}

fn checked_email(raw: &str) -> Result<String, Rejection> {
    let email = normalize_email(raw);
    if !is_email(&email) {
        return Err(Rejection::unprocessable(format!(
            "{raw:?} is not an e-mail address"
        )));
    }
    Ok(email)
}

fn account_missing(id: &str) -> Rejection {
    Rejection::new(
        StatusCode::NOT_FOUND,
        "Not found",
        format!("there is no account {id:?}"),
    )
}

// ---------------------------------------------------------------------------------------------
// The app

#[derive(Clone)]
struct AppState<St> {
    store: St,
    cfg: Arc<Config>,
    accounts: Accounts,
}

/// The shop's router, on any store.
pub fn app<St: Store>(store: St, cfg: Config) -> Router {
    let cfg = Arc::new(cfg);
    let accounts: Accounts = Arc::default();

    let purchase_layer = {
        let shared = cfg.clone();
        ReserveLayer::new(store.clone(), move |mut req: Request<Bytes>| {
            let cfg = shared.clone();
            async move {
                let customer_id = param(&req, "customer_id");
                if !valid_customer_id(&customer_id) {
                    return Err(Rejection::unprocessable(
                        "a customer id is 1 to 64 characters of [A-Za-z0-9_-]",
                    ));
                }
                let body: PurchaseBody = extract::json(&req)?;
                if body.product_ids.is_empty() || body.product_ids.len() > MAX_ITEMS {
                    return Err(Rejection::unprocessable(format!(
                        "a purchase names 1 to {MAX_ITEMS} products, not {}",
                        body.product_ids.len()
                    )));
                }
                let mut amount: u64 = 0;
                for &id in &body.product_ids {
                    let Some(p) = price(id).await else {
                        return Err(Rejection::unprocessable(format!("unknown product {id}"))
                            .with("product_id", id));
                    };
                    amount = amount
                        .checked_add(p)
                        .ok_or_else(|| Rejection::unprocessable("the amount is too large"))?;
                }
                let claim = Claim::spend(customer_budget(&customer_id, &cfg), amount);
                req.extensions_mut().insert(Purchase {
                    customer_id,
                    amount_cents: amount,
                });
                Extracted::Ok((req, vec![claim]))
            }
        })
        .lease(cfg.lease)
        // The contract: a request whose client went away leaves nothing behind.
        .on_disconnect(Disconnect::Release)
        .error_handler(render_rejection)
    };

    let sign_up_layer = ReserveLayer::new(store.clone(), |mut req: Request<Bytes>| async move {
        let body: SignUpBody = extract::json(&req)?;
        let email = checked_email(&body.email)?;
        if body.name.chars().count() > 200 {
            return Err(Rejection::unprocessable("a name is at most 200 characters"));
        }
        let account_id = uuid::Uuid::new_v4().simple().to_string();
        let claim = Claim::own(Unique::email(EMAILS, &email), account_id.clone());
        req.extensions_mut().insert(SignUp {
            account_id,
            email,
            name: body.name,
        });
        Extracted::Ok((req, vec![claim]))
    })
    .lease(cfg.lease)
    .on_disconnect(Disconnect::Release)
    .error_handler(render_rejection);

    let change_layer = {
        let accounts = accounts.clone();
        ReserveLayer::new(store.clone(), move |mut req: Request<Bytes>| {
            let accounts = accounts.clone();
            async move {
                let account_id = param(&req, "account_id");
                let old = accounts
                    .lock()
                    .expect("accounts lock")
                    .get(&account_id)
                    .map(|a| a.email.clone())
                    .ok_or_else(|| account_missing(&account_id))?;
                let body: EmailBody = extract::json(&req)?;
                let email = checked_email(&body.email)?;
                let mut claims = vec![Claim::own(
                    Unique::email(EMAILS, &email),
                    account_id.clone(),
                )];
                if email != old {
                    claims.push(Claim::release_on_commit(
                        Unique::email(EMAILS, &old),
                        account_id.clone(),
                    ));
                }
                req.extensions_mut()
                    .insert(EmailChange { account_id, email });
                Extracted::Ok((req, claims))
            }
        })
        .lease(cfg.lease)
        // The contract: a request whose client went away leaves nothing behind.
        .on_disconnect(Disconnect::Release)
        .error_handler(render_rejection)
    };

    let delete_layer = {
        let accounts = accounts.clone();
        ReserveLayer::new(store.clone(), move |req: Request<Bytes>| {
            let accounts = accounts.clone();
            async move {
                let account_id = param(&req, "account_id");
                let old = accounts
                    .lock()
                    .expect("accounts lock")
                    .get(&account_id)
                    .map(|a| a.email.clone())
                    .ok_or_else(|| account_missing(&account_id))?;
                let claim = Claim::release_on_commit(Unique::email(EMAILS, &old), account_id);
                Extracted::Ok((req, vec![claim]))
            }
        })
        .lease(cfg.lease)
        // The contract: a request whose client went away leaves nothing behind.
        .on_disconnect(Disconnect::Release)
        .error_handler(render_rejection)
    };

    let state = AppState {
        store,
        cfg,
        accounts,
    };
    let catch_panic = CatchPanicLayer::custom(panic_response);

    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/customers/{customer_id}/purchases",
            post(purchase::<St>)
                .layer::<_, Infallible>(catch_panic)
                .route_layer(purchase_layer),
        )
        .route("/customers/{customer_id}/budget", get(budget::<St>))
        .route(
            "/accounts",
            post(sign_up::<St>)
                .layer::<_, Infallible>(catch_panic)
                .route_layer(sign_up_layer),
        )
        .route("/accounts/{account_id}", get(get_account::<St>))
        .route(
            "/accounts/{account_id}",
            delete(delete_account::<St>)
                .layer::<_, Infallible>(catch_panic)
                .route_layer(delete_layer),
        )
        .route(
            "/accounts/{account_id}/email",
            put(change_email::<St>)
                .layer::<_, Infallible>(catch_panic)
                .route_layer(change_layer),
        )
        .fallback(fallback)
        .with_state(state)
        .layer(axum::middleware::map_response(problems_everywhere))
}

/// Acts on `X-Simulate` (when faults are on): `Some(response)` when the handler must answer so.
async fn simulate(cfg: &Config, headers: &HeaderMap) -> Option<Response> {
    if !cfg.faults {
        return None;
    }
    let value = headers.get("x-simulate")?.to_str().ok()?.trim().to_owned();
    if value == "decline" {
        return Some(problem(
            StatusCode::PAYMENT_REQUIRED,
            "Payment declined",
            "the payment was declined (simulated); nothing was kept",
        ));
    }
    if value == "panic" {
        panic!("X-Simulate: panic");
    }
    if let Some(ms) = value.strip_prefix("sleep=") {
        match ms.trim().parse::<u64>() {
            Ok(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Err(_) => {
                return Some(problem(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("X-Simulate: sleep={ms} is not a number of milliseconds"),
                ));
            }
        }
        return None;
    }
    Some(problem(
        StatusCode::BAD_REQUEST,
        "Bad request",
        format!("unknown X-Simulate value {value:?}: use decline, panic or sleep=MS"),
    ))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn purchase<St: Store>(
    State(state): State<AppState<St>>,
    Extension(hold): Extension<Hold>,
    Extension(purchase): Extension<Purchase>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = simulate(&state.cfg, &headers).await {
        return response;
    }
    let remaining = hold.remaining().first().copied().flatten().unwrap_or(0);
    let body = json!({
        "purchase_id": uuid::Uuid::new_v4().simple().to_string(),
        "customer_id": purchase.customer_id,
        "amount_cents": purchase.amount_cents,
        "remaining_cents": remaining,
    });
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn budget<St: Store>(State(state): State<AppState<St>>, req: Request<Body>) -> Response {
    let customer_id = param(&req, "customer_id");
    if !valid_customer_id(&customer_id) {
        return unprocessable("a customer id is 1 to 64 characters of [A-Za-z0-9_-]");
    }
    match state
        .store
        .budget(&customer_budget(&customer_id, &state.cfg))
        .await
    {
        Ok(status) => Json(json!({
            "limit_cents": status.limit,
            "spent_cents": status.spent,
            "held_cents": status.held,
            "remaining_cents": status.remaining,
        }))
        .into_response(),
        Err(err) => {
            let mut response = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Reservation store unavailable",
                format!("the budget could not be read: {err}"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

async fn sign_up<St: Store>(
    State(state): State<AppState<St>>,
    Extension(sign_up): Extension<SignUp>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = simulate(&state.cfg, &headers).await {
        return response;
    }
    let account = Account {
        email: sign_up.email,
        name: sign_up.name,
    };
    let body = account_json(&sign_up.account_id, &account);
    state
        .accounts
        .lock()
        .expect("accounts lock")
        .insert(sign_up.account_id, account);
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn get_account<St: Store>(
    State(state): State<AppState<St>>,
    Path(account_id): Path<String>,
) -> Response {
    let accounts = state.accounts.lock().expect("accounts lock");
    match accounts.get(&account_id) {
        Some(account) => Json(account_json(&account_id, account)).into_response(),
        None => not_found(format!("there is no account {account_id:?}")),
    }
}

async fn change_email<St: Store>(
    State(state): State<AppState<St>>,
    Extension(change): Extension<EmailChange>,
) -> Response {
    let mut accounts = state.accounts.lock().expect("accounts lock");
    match accounts.get_mut(&change.account_id) {
        Some(account) => {
            account.email = change.email;
            Json(account_json(&change.account_id, account)).into_response()
        }
        None => not_found(format!("there is no account {:?}", change.account_id)),
    }
}

async fn delete_account<St: Store>(
    State(state): State<AppState<St>>,
    req: Request<Body>,
) -> Response {
    let account_id = param(&req, "account_id");
    match state
        .accounts
        .lock()
        .expect("accounts lock")
        .remove(&account_id)
    {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(format!("there is no account {account_id:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            fail(&format!("{name}={v:?} is not a non-negative integer"));
        }),
        Err(_) => default,
    }
}

fn fail(message: &str) -> ! {
    eprintln!("shop: {message}");
    std::process::exit(1);
}

fn config() -> Config {
    let lease_ms = env_u64("SHOP_LEASE_MS", 30_000);
    if !(1..=86_400_000).contains(&lease_ms) {
        fail("SHOP_LEASE_MS must be 1 to 86400000 (1 ms to 1 day)");
    }
    Config {
        budget_cents: env_u64("SHOP_BUDGET_CENTS", 50_000),
        lease: Duration::from_millis(lease_ms),
        faults: std::env::var("SHOP_FAULTS").is_ok_and(|v| v.trim() == "1"),
    }
}

async fn serve(router: Router, addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
    let local: SocketAddr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("cannot read the listening address: {e}")));
    println!("listening on http://{local}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .unwrap_or_else(|e| fail(&format!("server error: {e}")));
    println!("shut down");
}

/// Ctrl-C or SIGTERM: stop accepting, let requests in flight finish (and settle their holds).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    println!("shutting down: finishing the requests in flight");
}

/// The URL with any password or user name masked, for logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[tokio::main]
async fn main() {
    let cfg = config();
    let addr = std::env::var("SHOP_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let redis_url = std::env::var("REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let cluster = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|v| !v.trim().is_empty());

    if cluster.is_some() && redis_url.is_some() {
        fail("set REDIS_URL (one node) or REDIS_CLUSTER_URLS (a Cluster), not both");
    }
    if let Some(urls) = cluster {
        let seeds: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        let shown: Vec<String> = seeds.iter().map(|u| redact(u)).collect();
        println!(
            "store: Redis Cluster via {} (budget {} cents per customer, lease {} ms, faults {})",
            shown.join(","),
            cfg.budget_cents,
            cfg.lease.as_millis(),
            if cfg.faults { "on" } else { "off" }
        );
        let store = RedisStore::builder()
            .prefix("shop")
            .connect_cluster(&seeds)
            .await
            .unwrap_or_else(|e| {
                fail(&format!(
                    "cannot reach the Redis Cluster at {}: {e}",
                    shown.join(",")
                ))
            });
        serve(app(store, cfg), &addr).await;
        return;
    }
    match redis_url {
        Some(url) => {
            let shown = redact(&url);
            println!(
                "store: Redis at {shown} (budget {} cents per customer, lease {} ms, faults {})",
                cfg.budget_cents,
                cfg.lease.as_millis(),
                if cfg.faults { "on" } else { "off" }
            );
            let store = RedisStore::builder()
                .prefix("shop")
                .connect(&url)
                .await
                .unwrap_or_else(|e| fail(&format!("cannot reach Redis at {shown}: {e}")));
            serve(app(store, cfg), &addr).await;
        }
        None => {
            println!(
                "store: embedded in-memory store, for this process only (budget {} cents per customer, lease {} ms, faults {})",
                cfg.budget_cents,
                cfg.lease.as_millis(),
                if cfg.faults { "on" } else { "off" }
            );
            serve(app(MemoryStore::new(), cfg), &addr).await;
        }
    }
}
