//! The shop: a customer may not buy more than a fixed amount in total, and an e-mail address
//! belongs to one account at a time. It is the crate's scenario end to end, its end-to-end test
//! target and its load-test target; this page is its whole HTTP contract.
//!
//! # Starting it
//!
//! ```text
//! cargo run --release -p shop
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release -p shop
//! ```
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `SHOP_ADDR` | address to listen on | `127.0.0.1:3000` |
//! | `REDIS_URL` | one Redis node, e.g. `redis://127.0.0.1:6379/` | unset |
//! | `REDIS_CLUSTER_URLS` | comma-separated Redis Cluster seed nodes | unset |
//! | `SHOP_BUDGET_CENTS` | every customer's lifetime spend limit, in cents | `50000` ($500) |
//! | `SHOP_LEASE_MS` | how long a hold lives if nobody commits or releases it | `30000` |
//! | `SHOP_FAULTS` | `1` turns on the `X-Simulate` request header (below) | off |
//! | `SHOP_HEADER_TIMEOUT` | a connection that has not sent a whole request head by then is closed (from its start, or from the previous answer: also the keep-alive idle timeout); a body that pauses this long is `408` (`"500ms"`, `"2s"`, `"1m"`) | `10s` |
//! | `SHOP_MAX_CONNECTIONS` | connections served at once; more wait in the listen queue until one ends, never crash the shop | half the open-file limit, 16 to 4096 |
//! | `SHOP_DIGEST_KEY` | a secret (16 bytes or more) that keys the digests of e-mail addresses in the store, so that whoever reads Redis or the logs cannot test a guessed address against them; recommended (changing it frees every address claimed under the old one) | unset: unkeyed SHA-256 |
//! | `SHOP_CANCEL_WINDOW` | how long after a purchase it can be cancelled (at most 29 days: see *What the shop keeps*) | `696h` (29 days) |
//! | `SHOP_BENCH_WITHOUT` | for benchmarks only, never in service: `layer` runs purchases with the middleware taken out (the body read and the claims worked out as the layer would, then the handler, with nothing reserved and no budget enforced); `metrics` installs no metrics recorder; both, comma-separated. `scripts/bench` compares these rows to tell where a purchase's CPU goes | unset |
//! | `RUST_LOG` | what is logged (to stderr; colour only when it is a terminal): a level, and `target=level` pairs (`warn,tower_reserve=debug`) | `info` |
//!
//! With neither Redis variable set it runs on the embedded in-memory store and says so in its
//! first line. With one set it uses Redis and fails fast, with a clear message, when Redis cannot
//! be reached at start-up. It prints the address it listens on once it accepts connections.
//! Ctrl-C or SIGTERM stops it: it stops accepting and lets the requests in flight finish.
//!
//! # Catalogue
//!
//! Product `n`, for `n` in `1..=10000`, costs `n * 100` cents. Any other id is unknown. The price
//! lookup is asynchronous, as a product repository would be, and happens in the middleware's
//! claims extractor before the handler runs: the amount is fixed when it is reserved.
//!
//! # Endpoints
//!
//! All request and response bodies are JSON. Every error is `application/problem+json`
//! (RFC 9457) with at least `type`, `title`, `status` and `detail`; a detail never carries an
//! internal error's text (that goes to the log).
//!
//! | method and path | body | success | errors |
//! | --- | --- | --- | --- |
//! | `POST /customers/{customer_id}/purchases` | `{"product_ids": [u64, ...]}` (1 to 100 ids, repeats allowed) | `201` `{"purchase_id", "customer_id", "amount_cents", "remaining_cents"}` | `403` over budget, the body also holding `requested_cents` and `remaining_cents`; `422` unknown product or empty/oversized list; `400` malformed JSON; `415` not JSON; `413` body over 64 KiB; `503` store unavailable, with `Retry-After` |
//! | `GET /customers/{customer_id}/budget` | | `200` `{"limit_cents", "spent_cents", "held_cents", "remaining_cents"}` | `503` |
//! | `DELETE /customers/{customer_id}/purchases/{purchase_id}` | | `200` `{"purchase_id", "customer_id", "refunded_cents", "remaining_cents"}`: the purchase is cancelled and its amount is back in the budget, once; a repeat answers `200` with the same `refunded_cents` and gives nothing back again | `404` unknown purchase, or a purchase of another customer; `410` a purchase older than `SHOP_CANCEL_WINDOW`; `503` |
//! | `POST /accounts` | `{"email", "name"}` | `201` `{"account_id", "email", "name"}`, `email` as normalized | `409` e-mail taken; `422` not an e-mail address; `400`, `415`, `413`, `503` as above |
//! | `GET /accounts/{account_id}` | | `200` `{"account_id", "email", "name"}` | `404` |
//! | `PUT /accounts/{account_id}/email` | `{"email"}` | `200` the account | `409` taken (the old address stays the account's); `404`; `422` |
//! | `DELETE /accounts/{account_id}` | | `204`, and its address is free again | `404` |
//! | `GET /healthz` | | `200` while the process serves (liveness) | |
//! | `GET /readyz` | | `200` when the store answers within 2 s (readiness) | `503` |
//! | `GET /metrics` | | `200`, the middleware's counters and latencies in the Prometheus text format | |
//!
//! `customer_id` is 1 to 64 characters of `[A-Za-z0-9_-]`; anything else is `422`.
//!
//! E-mail addresses are normalized before they are claimed: surrounding white space trimmed,
//! the whole address lower-cased. `" Ann@Example.COM"` and `"ann@example.com"` are the same
//! address. Changing an account's address claims the new one and frees the old one only if the
//! change succeeds.
//!
//! A purchase's amount is held while the handler runs and becomes spent only when the handler
//! succeeds. On every other outcome the hold is released: the handler fails, panics, the client
//! goes away, or the server dies (then the lease runs out). `held_cents` returns to `0` once
//! nothing is in flight.
//!
//! A cancelled purchase's amount goes back to the budget as a refund of its own (the purchase is
//! not undone): once, however many times and from however many shops the cancellation is sent.
//!
//! # `X-Simulate` (only with `SHOP_FAULTS=1`)
//!
//! On `POST /customers/{customer_id}/purchases` and `POST /accounts`, after the reservation is
//! made and inside the handler:
//!
//! | value | the handler |
//! | --- | --- |
//! | `decline` | answers `402` (payment declined): the hold is released |
//! | `panic` | panics: the response is `500`, the hold is released |
//! | `sleep=MS` | waits `MS` milliseconds, then succeeds |
//!
//! # `Idempotency-Key`
//!
//! `POST /customers/{customer_id}/purchases` and `POST /accounts` accept an optional
//! `Idempotency-Key` request header (1 to 255 visible ASCII characters, bare or as a quoted
//! Structured Field string; anything else is `400`), as in the IETF draft *The Idempotency-Key
//! HTTP Header Field*:
//!
//! - A retry with the same key and the same body, after the first request finished, gets the
//!   first request's response again (same status, same body: the same `purchase_id` or
//!   `account_id`), with the response header `Idempotency-Replayed: true`. Nothing is reserved,
//!   spent or claimed again. A failed first request (a declined payment, say) is replayed as
//!   failed. This holds across restarts of the shop when it runs on Redis.
//! - While the first request with that key is still being handled: `409`, with `Retry-After`.
//! - The same key with another body: `422`.
//! - A key is kept for 24 hours.
//!
//! Keys of one customer's purchases and keys of sign-ups are separate: the same key on two
//! different paths names two different requests.
//!
//! # What the shop keeps
//!
//! Claims live in the store; the shop keeps no record per purchase. A purchase id carries the
//! purchase's amount and when it was made, signed (HMAC-SHA256) together with the customer's id
//! by a key that the shops sharing a store share through it: a cancellation checks the id
//! instead of looking it up, and an id of another customer, or one made up, is `404`. A
//! cancellation is a refund whose id comes from the purchase's, so that it counts once while the
//! refund's record is kept (30 days); a purchase can be cancelled only within 29 days (a day less,
//! for the clocks of several shops to differ), so no cancellation can come after that record
//! went. Everything a client can make the shop write in the store expires (holds, idempotency
//! records, refunds) or is one entry per customer (the budget), except accounts' addresses,
//! which are the accounts' data. Accounts live in the process, as an aggregate would in the
//! application's own database; only their addresses' claims are in the store.
//!
//! # At the edge
//!
//! The shop is served by hyper's connection builder, not `axum::serve` (which sets no timeout
//! and no limit; `examples/common/server.rs`, shared with the gateway): a head must arrive within
//! `SHOP_HEADER_TIMEOUT` (closed otherwise, as a connection with no request in flight is, HTTP/2
//! included), a head above 32 KiB or 100 headers is `431`, a body that pauses that long is `408`,
//! a client that leaves its answer unread that long is disconnected, and at most
//! `SHOP_MAX_CONNECTIONS` connections are served at once. Before routing, a
//! request is refused with `400` for a second `Host` (or none, on HTTP/1.1), a second
//! `Content-Length` or `Idempotency-Key`; `501` for a transfer coding other than `chunked`; `413`
//! at once, before `100 Continue`, for a declared body above 64 KiB. Paths are matched as sent:
//! another spelling of a path (`/customers/%61nn/purchases`, `//accounts`) is no route of the
//! shop's (`404`) or no valid customer id (`422`), never a purchase.

#[path = "../../common/server.rs"]
mod server;

use std::any::Any;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;
use tower_http::catch_panic::CatchPanicLayer;
use tower_reserve::{
    Budget, BudgetOf, Claim, DigestKey, Disconnect, ExtractClaims, Extracted, Hold, HoldId,
    Idempotency, MAX_RETAIN, MemoryStore, RedisStore, Refund, Rejection, RejectionKind,
    Reservation, ReserveLayer, Reserved, Store, Unique, extract, normalize_email,
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
    /// How long a connection may take to send a request's head, and the longest pause in a body.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long after a purchase it can be cancelled: at most [`REFUND_RETAIN`] less
    /// [`CLOCK_MARGIN`].
    pub cancel_window: Duration,
    /// Keys the digests of e-mail addresses in the store.
    pub digest_key: Option<DigestKey>,
    /// For benchmarks only: purchases without the middleware (nothing reserved).
    pub bench_without_layer: bool,
    /// For benchmarks only: no metrics recorder.
    pub bench_without_metrics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            budget_cents: 50_000,
            lease: Duration::from_secs(30),
            faults: false,
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            cancel_window: REFUND_RETAIN - CLOCK_MARGIN,
            digest_key: None,
            bench_without_layer: false,
            bench_without_metrics: false,
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

// Handlers answer `Result<Response, Rejection>`: a `Rejection` is an axum response, the same
// problem document the layer answers with.

fn not_found(detail: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::NOT_FOUND, "Not found", detail.into())
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
    rejection.into_problem_response()
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
    .into_problem_response()
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

async fn fallback() -> Rejection {
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
// Purchase ids: signed, so that a cancellation needs no record of the purchase

/// Issues and checks purchase ids: 12 random bytes, the amount, when it was issued (Unix
/// milliseconds), and an HMAC-SHA256 tag (16 bytes) over all three and the customer's id, in
/// URL-safe base64.
#[derive(Clone)]
struct PurchaseIds {
    /// The HMAC keyed once: each id clones it rather than hash the key again.
    keyed: Hmac<Sha256>,
}

/// Bytes of an id before its tag: the nonce, the amount and the time of issue.
const ID_BODY: usize = 12 + 8 + 8;
/// Bytes of the tag kept in an id.
const ID_TAG: usize = 16;

/// What a purchase id says about its purchase.
struct Issued {
    amount_cents: u64,
    at_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PurchaseIds {
    fn new(key: &[u8; 32]) -> Self {
        Self {
            keyed: Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key"),
        }
    }

    fn mac(&self, customer_id: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(&(customer_id.len() as u64).to_be_bytes());
        mac.update(customer_id.as_bytes());
        mac.update(body);
        mac
    }

    /// A new purchase id for `amount_cents` bought by `customer_id`, now.
    fn issue(&self, customer_id: &str, amount_cents: u64) -> String {
        let mut raw = Vec::with_capacity(ID_BODY + ID_TAG);
        raw.extend_from_slice(&rand::random::<[u8; 12]>());
        raw.extend_from_slice(&amount_cents.to_be_bytes());
        raw.extend_from_slice(&now_ms().to_be_bytes());
        let tag = self.mac(customer_id, &raw).finalize().into_bytes();
        raw.extend_from_slice(&tag[..ID_TAG]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The amount and time of a purchase id this shop issued to `customer_id`; `None` for any
    /// other text.
    fn read(&self, customer_id: &str, purchase_id: &str) -> Option<Issued> {
        let raw = URL_SAFE_NO_PAD.decode(purchase_id).ok()?;
        if raw.len() != ID_BODY + ID_TAG {
            return None;
        }
        let (body, tag) = raw.split_at(ID_BODY);
        self.mac(customer_id, body)
            .verify_truncated_left(tag)
            .ok()?;
        Some(Issued {
            amount_cents: u64::from_be_bytes(body[12..20].try_into().ok()?),
            at_ms: u64::from_be_bytes(body[20..28].try_into().ok()?),
        })
    }
}

/// The key purchase ids are signed with, kept in the store as the owner of a unique value: the
/// first shop to start on a store makes it, and every shop sharing the store (and every restart)
/// reads the same one.
async fn signing_key<St: Store>(store: &St) -> Result<[u8; 32], String> {
    let slot = Unique::new("shop", "purchase-id-key");
    for _ in 0..100 {
        if let Some(text) = store.owner(&slot).await.map_err(|e| e.to_string())? {
            return URL_SAFE_NO_PAD
                .decode(&text)
                .ok()
                .and_then(|raw| raw.try_into().ok())
                .ok_or_else(|| "the stored purchase id key is malformed".to_owned());
        }
        let key: [u8; 32] = rand::random();
        let claim = Claim::own(slot.clone(), URL_SAFE_NO_PAD.encode(key));
        let reservation = Reservation::builder()
            .claim(claim)
            .build()
            .map_err(|e| e.to_string())?;
        match store
            .reserve(&reservation)
            .await
            .map_err(|e| e.to_string())?
        {
            Reserved::Granted(grant) => {
                store.commit(&grant.id).await.map_err(|e| e.to_string())?;
                return Ok(key);
            }
            // Another shop is making it right now: read it once it is there.
            Reserved::Denied(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Err("no purchase id key could be made or read".to_owned())
}

/// The longest a refund's record can be kept, and so the longest after a purchase that it can
/// be cancelled: a cancellation counts once while its refund's record is there, and none is
/// accepted after the record of an earlier one could have gone.
const REFUND_RETAIN: Duration = MAX_RETAIN;
/// What is left of [`REFUND_RETAIN`] at most, once the window closes: room for the clocks of
/// the shops sharing a store to differ.
const CLOCK_MARGIN: Duration = Duration::from_secs(86_400);

/// Gives a purchase's amount back to its customer's budget, once: a refund whose id comes from
/// the purchase's, so that a retry, or a cancellation racing it from another shop, counts once
/// while the refund's record is kept. Cancellations are accepted only while that is so (see
/// [`Config::cancel_window`]), so nothing else is written, and everything expires.
async fn cancel_once<St: Store>(
    store: &St,
    budget: &Budget,
    purchase_id: &str,
    amount_cents: u64,
) -> Result<(), tower_reserve::Error> {
    let refund_id = HoldId::new(format!("cancel:{purchase_id}"))?;
    let refund = Refund::new(refund_id, budget.clone(), amount_cents).retain(REFUND_RETAIN);
    store.refund(&refund).await?;
    Ok(())
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

/// A customer's budget, from the `{customer_id}` of the request's path: the one place it is
/// built, for the purchases that spend from it, the budget read and cancellations.
fn customer_budgets(cfg: &Config) -> BudgetOf {
    let limit = cfg.budget_cents;
    BudgetOf::new(move |req: &Request<Bytes>| {
        let customer_id = extract::path_param(req, "customer_id")?;
        if !valid_customer_id(customer_id) {
            return Err(Rejection::unprocessable(
                "a customer id is 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        Ok(Budget::new(format!("customer:{customer_id}"), limit))
    })
}

/// The budget the head of a request names (a read or a cancellation has no body to give).
fn budget_of_head(budgets: &BudgetOf, head: http::request::Parts) -> Result<Budget, Rejection> {
    budgets.budget(&Request::from_parts(head, Bytes::new()))
}

/// What the purchase extractor worked out, for the handler.
#[derive(Debug, Clone)]
struct Purchase {
    customer_id: String,
    budget: Budget,
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

/// How an address is claimed: its digest keyed by `SHOP_DIGEST_KEY` when that is set, so that
/// whoever reads the store or the logs cannot test a guessed address against it.
#[derive(Clone)]
struct Addresses(Option<DigestKey>);

impl Addresses {
    /// The unique value of a normalized address among the accounts' addresses.
    fn of(&self, email: &str) -> Unique {
        match &self.0 {
            Some(key) => Unique::keyed_email(EMAILS, email, key),
            None => Unique::email(EMAILS, email),
        }
    }
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
    not_found(format!("there is no account {id:?}"))
}

// ---------------------------------------------------------------------------------------------
// The app

/// What the handlers share, behind one `Arc`: a request's `State` is one reference count.
type AppState<St> = Arc<App<St>>;

struct App<St> {
    store: St,
    cfg: Arc<Config>,
    budgets: BudgetOf,
    accounts: Accounts,
    purchase_ids: PurchaseIds,
}

/// The shop's router, on any store; `purchase_id_key` signs purchase ids (see
/// [`signing_key`]).
fn app<St: Store>(store: St, cfg: Config, purchase_id_key: [u8; 32]) -> Router {
    let cfg = Arc::new(cfg);
    let accounts: Accounts = Arc::default();

    let budgets = customer_budgets(&cfg);

    // A purchase's claim: its customer's budget, the sum of its products' prices.
    let purchase_claims = {
        let budgets = budgets.clone();
        move |mut req: Request<Bytes>| {
            let budget = budgets.budget(&req);
            async move {
                let budget = budget?;
                let customer_id = param(&req, "customer_id");
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
                let claim = Claim::spend(budget.clone(), amount);
                req.extensions_mut().insert(Purchase {
                    customer_id,
                    budget,
                    amount_cents: amount,
                });
                Extracted::Ok((req, vec![claim]))
            }
        }
    };
    let purchase_layer = {
        ReserveLayer::new(store.clone(), purchase_claims.clone())
            .lease(cfg.lease)
            // The contract: a request whose client went away leaves nothing behind.
            .on_disconnect(Disconnect::Release)
            .idempotency(Idempotency::new())
            .error_handler(render_rejection)
    };

    let addresses = Addresses(cfg.digest_key.clone());

    let sign_up_layer = {
        let addresses = addresses.clone();
        ReserveLayer::new(store.clone(), move |mut req: Request<Bytes>| {
            let addresses = addresses.clone();
            async move {
                let body: SignUpBody = extract::json(&req)?;
                let email = checked_email(&body.email)?;
                if body.name.chars().count() > 200 {
                    return Err(Rejection::unprocessable("a name is at most 200 characters"));
                }
                let account_id = uuid::Uuid::new_v4().simple().to_string();
                let claim = Claim::own(addresses.of(&email), account_id.clone());
                req.extensions_mut().insert(SignUp {
                    account_id,
                    email,
                    name: body.name,
                });
                Extracted::Ok((req, vec![claim]))
            }
        })
        .lease(cfg.lease)
        .on_disconnect(Disconnect::Release)
        .idempotency(Idempotency::new())
        .error_handler(render_rejection)
    };

    let change_layer = {
        let (accounts, addresses) = (accounts.clone(), addresses.clone());
        ReserveLayer::new(store.clone(), move |mut req: Request<Bytes>| {
            let (accounts, addresses) = (accounts.clone(), addresses.clone());
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
                let mut claims = vec![Claim::own(addresses.of(&email), account_id.clone())];
                if email != old {
                    claims.push(Claim::release_on_commit(
                        addresses.of(&old),
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
            let (accounts, addresses) = (accounts.clone(), addresses.clone());
            async move {
                let account_id = param(&req, "account_id");
                let old = accounts
                    .lock()
                    .expect("accounts lock")
                    .get(&account_id)
                    .map(|a| a.email.clone())
                    .ok_or_else(|| account_missing(&account_id))?;
                let claim = Claim::release_on_commit(addresses.of(&old), account_id);
                Extracted::Ok((req, vec![claim]))
            }
        })
        .lease(cfg.lease)
        // The contract: a request whose client went away leaves nothing behind.
        .on_disconnect(Disconnect::Release)
        .error_handler(render_rejection)
    };

    let bench_without_layer = cfg.bench_without_layer;
    let state: AppState<St> = Arc::new(App {
        store,
        cfg,
        budgets,
        accounts,
        purchase_ids: PurchaseIds::new(&purchase_id_key),
    });
    let catch_panic = CatchPanicLayer::custom(panic_response);

    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<St>))
        .route(
            "/customers/{customer_id}/purchases",
            if bench_without_layer {
                post(purchase::<St>)
                    .layer::<_, Infallible>(catch_panic)
                    .route_layer(axum::middleware::from_fn(move |req, next| {
                        unreserved(purchase_claims.clone(), req, next)
                    }))
            } else {
                post(purchase::<St>)
                    .layer::<_, Infallible>(catch_panic)
                    .route_layer(purchase_layer)
            },
        )
        .route(
            "/customers/{customer_id}/purchases/{purchase_id}",
            delete(cancel::<St>),
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

/// What the claims' extractor left in the request's extensions for the handler, taken out
/// rather than copied as axum's `Extension` would.
struct Taken<T>(T);

impl<S: Sync, T: Send + Sync + 'static> axum::extract::FromRequestParts<S> for Taken<T> {
    type Rejection = Rejection;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Rejection> {
        parts.extensions.remove::<T>().map(Self).ok_or_else(|| {
            tracing::error!(
                what = std::any::type_name::<T>(),
                "the claims' extractor left nothing for the handler"
            );
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error",
                "the request could not be completed",
            )
        })
    }
}

/// The request's `X-Simulate` header, if it has one (in text): read alone, without a copy of
/// every other header as the `HeaderMap` extractor would make.
struct XSimulate(Option<String>);

impl<S: Sync> axum::extract::FromRequestParts<S> for XSimulate {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Infallible> {
        let value = parts
            .headers
            .get("x-simulate")
            .and_then(|v| v.to_str().ok());
        Ok(Self(value.map(|v| v.trim().to_owned())))
    }
}

/// Acts on `X-Simulate` (when faults are on): `Err` when the handler must answer so.
async fn simulate(cfg: &Config, XSimulate(value): XSimulate) -> Result<(), Rejection> {
    let value = match value {
        Some(value) if cfg.faults => value,
        _ => return Ok(()),
    };
    if value == "decline" {
        return Err(Rejection::new(
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
                return Err(Rejection::bad_request(format!(
                    "X-Simulate: sleep={ms} is not a number of milliseconds"
                )));
            }
        }
        return Ok(());
    }
    Err(Rejection::bad_request(format!(
        "unknown X-Simulate value {value:?}: use decline, panic or sleep=MS"
    )))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// `200` when the store answers within 2 s, `503` otherwise: readiness, beside `/healthz`'s
/// liveness.
async fn readyz<St: Store>(State(state): State<AppState<St>>) -> Result<Response, Rejection> {
    let probe = Unique::new("shop", "readiness-probe");
    match tokio::time::timeout(Duration::from_secs(2), state.store.owner(&probe)).await {
        Ok(Ok(_)) => Ok(Json(json!({ "status": "ready" })).into_response()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store is unavailable");
            Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "the store is unavailable",
            ))
        }
        Err(_) => Err(Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not ready",
            "the store did not answer within 2s",
        )),
    }
}

/// For benchmarks only (`SHOP_BENCH_WITHOUT=layer`): the purchase route with the middleware
/// taken out. The body is read and the claims worked out as the layer would, so that the
/// handler runs as it does behind the layer; nothing is reserved.
async fn unreserved<E: ExtractClaims>(
    claims: E,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, BODY_LIMIT as usize).await else {
        return IntoResponse::into_response(Rejection::bad_request("the body could not be read"));
    };
    match claims.extract(Request::from_parts(parts, body)).await {
        Ok((request, _claims)) => next.run(request.map(Body::from)).await,
        Err(rejection) => IntoResponse::into_response(rejection),
    }
}

async fn purchase<St: Store>(
    State(state): State<AppState<St>>,
    // Always there behind the layer; `None` only in the benchmarks' row without it.
    hold: Option<Hold>,
    Taken(purchase): Taken<Purchase>,
    x_simulate: XSimulate,
) -> Result<Response, Rejection> {
    simulate(&state.cfg, x_simulate).await?;
    let remaining = hold
        .and_then(|hold| hold.remaining_of(&purchase.budget))
        .unwrap_or(0);
    let purchase_id = state
        .purchase_ids
        .issue(&purchase.customer_id, purchase.amount_cents);
    let body = PurchaseAnswer {
        amount_cents: purchase.amount_cents,
        customer_id: &purchase.customer_id,
        purchase_id: &purchase_id,
        remaining_cents: remaining,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A purchase's `201` body, written straight from its fields (in the order `json!` would sort
/// them).
#[derive(Serialize)]
struct PurchaseAnswer<'a> {
    amount_cents: u64,
    customer_id: &'a str,
    purchase_id: &'a str,
    remaining_cents: u64,
}

async fn budget<St: Store>(
    State(state): State<AppState<St>>,
    head: http::request::Parts,
) -> Result<Response, Rejection> {
    let budget = budget_of_head(&state.budgets, head)?;
    let status = state.store.budget(&budget).await.map_err(store_failed)?;
    Ok(Json(json!({
        "limit_cents": status.limit,
        "spent_cents": status.spent,
        "held_cents": status.held,
        "remaining_cents": status.remaining,
    }))
    .into_response())
}

/// A store error as a problem: `503` with `Retry-After` when the store could not be reached, `500`
/// otherwise; the error's own text goes to the log only.
fn store_failed(err: tower_reserve::Error) -> Rejection {
    if err.is_unavailable() {
        tracing::warn!(error = %err, "the store is unavailable");
        return Rejection::unavailable(1);
    }
    tracing::error!(error = %err, "the store refused a call");
    Rejection::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error",
        "the request could not be completed",
    )
}

/// Cancels a purchase: its amount goes back to the budget, once.
async fn cancel<St: Store>(
    State(state): State<AppState<St>>,
    Path((customer_id, purchase_id)): Path<(String, String)>,
    head: http::request::Parts,
) -> Result<Response, Rejection> {
    let budget = budget_of_head(&state.budgets, head)?;
    let issued = state
        .purchase_ids
        .read(&customer_id, &purchase_id)
        .ok_or_else(|| {
            not_found(format!(
                "customer {customer_id:?} has no purchase {purchase_id:?}"
            ))
        })?;
    let window = state.cfg.cancel_window;
    if now_ms().saturating_sub(issued.at_ms) > window.as_millis() as u64 {
        return Err(Rejection::new(
            StatusCode::GONE,
            "Gone",
            format!(
                "a purchase can be cancelled for {} hours after it was made; this one is older",
                window.as_secs() / 3600
            ),
        ));
    }
    let amount_cents = issued.amount_cents;
    cancel_once(&state.store, &budget, &purchase_id, amount_cents)
        .await
        .map_err(store_failed)?;
    let status = state.store.budget(&budget).await.map_err(store_failed)?;
    Ok(Json(json!({
        "purchase_id": purchase_id,
        "customer_id": customer_id,
        "refunded_cents": amount_cents,
        "remaining_cents": status.remaining,
    }))
    .into_response())
}

async fn sign_up<St: Store>(
    State(state): State<AppState<St>>,
    Taken(sign_up): Taken<SignUp>,
    x_simulate: XSimulate,
) -> Result<Response, Rejection> {
    simulate(&state.cfg, x_simulate).await?;
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
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn get_account<St: Store>(
    State(state): State<AppState<St>>,
    Path(account_id): Path<String>,
) -> Result<Response, Rejection> {
    let accounts = state.accounts.lock().expect("accounts lock");
    let account = accounts
        .get(&account_id)
        .ok_or_else(|| account_missing(&account_id))?;
    Ok(Json(account_json(&account_id, account)).into_response())
}

async fn change_email<St: Store>(
    State(state): State<AppState<St>>,
    Taken(change): Taken<EmailChange>,
) -> Result<Response, Rejection> {
    let mut accounts = state.accounts.lock().expect("accounts lock");
    let account = accounts
        .get_mut(&change.account_id)
        .ok_or_else(|| account_missing(&change.account_id))?;
    account.email = change.email;
    Ok(Json(account_json(&change.account_id, account)).into_response())
}

async fn delete_account<St: Store>(
    State(state): State<AppState<St>>,
    Path(account_id): Path<String>,
) -> Result<StatusCode, Rejection> {
    state
        .accounts
        .lock()
        .expect("accounts lock")
        .remove(&account_id)
        .ok_or_else(|| account_missing(&account_id))?;
    Ok(StatusCode::NO_CONTENT)
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
    let header_timeout = match std::env::var("SHOP_HEADER_TIMEOUT") {
        Ok(text) if !text.trim().is_empty() => server::parse_duration(&text)
            .unwrap_or_else(|e| fail(&format!("SHOP_HEADER_TIMEOUT: {e}"))),
        _ => Duration::from_secs(10),
    };
    let max_connections = match std::env::var("SHOP_MAX_CONNECTIONS") {
        Ok(text) if !text.trim().is_empty() => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => fail(&format!(
                "SHOP_MAX_CONNECTIONS={text:?} is not a positive number"
            )),
        },
        // A half: Redis connections and the logs take some.
        _ => server::default_max_connections(2),
    };
    let longest = REFUND_RETAIN - CLOCK_MARGIN;
    let cancel_window = match std::env::var("SHOP_CANCEL_WINDOW") {
        Ok(text) if !text.trim().is_empty() => server::parse_duration(&text)
            .ok()
            .filter(|d| *d <= longest)
            .unwrap_or_else(|| {
                fail(&format!(
                    "SHOP_CANCEL_WINDOW={text:?} must be a duration of at most {}h",
                    longest.as_secs() / 3600
                ))
            }),
        _ => longest,
    };
    let digest_key = match std::env::var("SHOP_DIGEST_KEY") {
        Ok(secret) if !secret.is_empty() => Some(
            DigestKey::new(secret.as_bytes())
                .unwrap_or_else(|e| fail(&format!("SHOP_DIGEST_KEY: {e}"))),
        ),
        _ => None,
    };
    let bench_without = std::env::var("SHOP_BENCH_WITHOUT").unwrap_or_default();
    let (mut bench_without_layer, mut bench_without_metrics) = (false, false);
    for part in bench_without
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part {
            "layer" => bench_without_layer = true,
            "metrics" => bench_without_metrics = true,
            other => fail(&format!(
                "SHOP_BENCH_WITHOUT: {other:?} is not one of layer, metrics"
            )),
        }
    }
    Config {
        budget_cents: env_u64("SHOP_BUDGET_CENTS", 50_000),
        lease: Duration::from_millis(lease_ms),
        faults: std::env::var("SHOP_FAULTS").is_ok_and(|v| v.trim() == "1"),
        header_timeout,
        max_connections,
        cancel_window,
        digest_key,
        bench_without_layer,
        bench_without_metrics,
    }
}

/// Serves the shop on `store` until Ctrl-C or SIGTERM.
async fn serve<St: Store>(store: St, cfg: Config, addr: &str, metrics: PrometheusHandle) {
    let key = signing_key(&store).await.unwrap_or_else(|e| {
        fail(&format!(
            "cannot read the purchase id key from the store: {e}"
        ))
    });
    let render = metrics.clone();
    let (header_timeout, max_connections) = (cfg.header_timeout, cfg.max_connections);
    let router =
        app(store, cfg, key).route("/metrics", get(move || std::future::ready(render.render())));
    // Histograms' samples are counted into their buckets here, not on each request: on a thread
    // of its own, so that the work never delays a request.
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            metrics.run_upkeep();
        }
    });

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
    let local: SocketAddr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("cannot read the listening address: {e}")));
    println!("listening on http://{local}");

    // `axum::serve` sets no timeout and no limit: `server::serve` does.
    let limits = server::Limits {
        head_timeout: header_timeout,
        max_connections,
        grace: Duration::from_secs(30),
    };
    let handler = move |request, _peer| handle(router.clone(), request, header_timeout);
    server::serve(listener, limits, handler, shutdown_signal()).await;
    println!("shut down");
}

/// One request: checked at the edge ([`admit`]), its body bounded in time, then the router. A
/// body that stalls is `408`, not the layer's "could not be read".
async fn handle(
    router: Router,
    request: Request<hyper::body::Incoming>,
    body_timeout: Duration,
) -> Result<Response, Infallible> {
    let (parts, body) = request.into_parts();
    if let Err(rejection) = admit(&parts) {
        return Ok(IntoResponse::into_response(rejection));
    }
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = Stalls {
        body: tower_http::timeout::TimeoutBody::new(body_timeout, body),
        stalled: stalled.clone(),
    };
    let response =
        tower::ServiceExt::oneshot(router, Request::from_parts(parts, Body::new(body))).await?;
    if response.status() == StatusCode::BAD_REQUEST
        && stalled.load(std::sync::atomic::Ordering::Acquire)
    {
        let stalled = Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "Request timeout",
            "the request's body stopped arriving",
        );
        return Ok(IntoResponse::into_response(stalled));
    }
    Ok(response)
}

pin_project_lite::pin_project! {
    /// A request body that notes whether it failed by pausing too long.
    struct Stalls<B> {
        #[pin]
        body: B,
        stalled: Arc<std::sync::atomic::AtomicBool>,
    }
}

impl<B> http_body::Body for Stalls<B>
where
    B: http_body::Body<Error = Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled
            && e.is::<tower_http::timeout::TimeoutError>()
        {
            this.stalled
                .store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The shop's largest body: a purchase or a sign-up.
const BODY_LIMIT: u64 = 64 * 1024;

/// What the shop refuses before routing, as RFC 9110 and 9112 ask of a server: a second `Host`
/// or none on HTTP/1.1, a second `Content-Length` or `Idempotency-Key` (each would be read one
/// way here and perhaps another elsewhere), a transfer coding other than `chunked` (`501`), and
/// a body declared above the limit by a client that waits for `100 Continue` (`413` at once).
fn admit(parts: &http::request::Parts) -> Result<(), Rejection> {
    let count = |name: header::HeaderName| parts.headers.get_all(name).iter().count();
    if count(header::HOST) > 1 {
        return Err(Rejection::bad_request(
            "the host header is sent more than once",
        ));
    }
    if count(header::HOST) == 0
        && parts.uri.authority().is_none()
        && parts.version == http::Version::HTTP_11
    {
        return Err(Rejection::bad_request(
            "an HTTP/1.1 request without a Host header",
        ));
    }
    if count(header::CONTENT_LENGTH) > 1 {
        return Err(Rejection::bad_request(
            "the content-length header is sent more than once",
        ));
    }
    if count(header::HeaderName::from_static("idempotency-key")) > 1 {
        return Err(Rejection::bad_request(
            "the idempotency-key header is sent more than once",
        ));
    }
    for value in parts.headers.get_all(header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("?");
        if text
            .split(',')
            .map(str::trim)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
        {
            return Err(Rejection::new(
                StatusCode::NOT_IMPLEMENTED,
                "Not implemented",
                format!("the transfer coding {text:?} is not supported, only chunked"),
            ));
        }
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(expect), Some(length)) = (parts.headers.get(header::EXPECT), declared)
        && expect.as_bytes().eq_ignore_ascii_case(b"100-continue")
        && length > BODY_LIMIT
    {
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!("the body declared ({length} bytes) is above the limit of {BODY_LIMIT} bytes"),
        ));
    }
    Ok(())
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

/// mimalloc rather than glibc's allocator. Under load on Redis, glibc's `malloc` and `free` took
/// about a sixth of the shop's CPU, much of it on their slow path (`malloc_consolidate`): hyper
/// grows a fresh 8 KiB read buffer for every request with a body, past what glibc serves from its
/// per-thread cache. mimalloc serves such sizes from per-thread pages: a purchase cost the shop
/// 14 % less CPU with it on one Redis node, 19 % less on the embedded store.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    server::init_logging();
    let cfg = config();
    let addr = std::env::var("SHOP_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let redis_url = std::env::var("REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let cluster = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let settings = format!(
        "budget {} cents per customer, lease {} ms, faults {}",
        cfg.budget_cents,
        cfg.lease.as_millis(),
        if cfg.faults { "on" } else { "off" }
    );
    let metrics = if cfg.bench_without_metrics {
        // Not installed: the middleware's metrics go nowhere, and `/metrics` stays empty.
        server::prometheus().build_recorder().handle()
    } else {
        server::prometheus()
            .install_recorder()
            .unwrap_or_else(|e| fail(&format!("cannot install the metrics recorder: {e}")))
    };
    if cfg.bench_without_layer || cfg.bench_without_metrics {
        eprintln!("shop: SHOP_BENCH_WITHOUT is set: a benchmark's configuration, not for service");
    }

    match (redis_url, cluster) {
        (Some(_), Some(_)) => {
            fail("set REDIS_URL (one node) or REDIS_CLUSTER_URLS (a Cluster), not both")
        }
        (None, Some(urls)) => {
            let seeds: Vec<String> = urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            let shown = seeds
                .iter()
                .map(|u| redact(u))
                .collect::<Vec<_>>()
                .join(",");
            println!("store: Redis Cluster via {shown} ({settings})");
            let store = RedisStore::builder()
                .prefix("shop")
                .connect_cluster(&seeds)
                .await
                .unwrap_or_else(|e| {
                    fail(&format!("cannot reach the Redis Cluster at {shown}: {e}"))
                });
            serve(store, cfg, &addr, metrics).await;
        }
        (Some(url), None) => {
            let shown = redact(&url);
            println!("store: Redis at {shown} ({settings})");
            let store = RedisStore::builder()
                .prefix("shop")
                .connect(&url)
                .await
                .unwrap_or_else(|e| fail(&format!("cannot reach Redis at {shown}: {e}")));
            serve(store, cfg, &addr, metrics).await;
        }
        (None, None) => {
            println!("store: embedded in-memory store, for this process only ({settings})");
            serve(MemoryStore::new(), cfg, &addr, metrics).await;
        }
    }
}
