//! Reserve what a command needs, atomically, before its handler runs; commit or release it by
//! the handler's outcome.
//!
//! Validation against an eventually consistent read model races: two $20 purchases that both
//! read "$480 of $500 spent" both pass, and two sign-ups that both read "address free" both take
//! it. `tower-reserve` makes the check and the claim one atomic step. A tower layer works out a
//! request's *claims* (spend an amount against a budget; own a value in a set), reserves them
//! all in one step (one Lua script on Redis), and only then runs the handler. A `2xx` commits the
//! *hold*; anything else releases it: an error, a panic, a client that went away, a timeout. A
//! process that dies leaves holds that end with their lease.
//!
//! # With axum
//!
//! ```
//! use axum::{Router, routing::post};
//! use bytes::Bytes;
//! use http::Request;
//! use tower_reserve::{Budget, Claim, Extracted, MemoryStore, ReserveLayer, extract};
//!
//! let spend = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
//!     let customer = extract::path_param(&req, "customer")?.to_owned();
//!     let cents: u64 = extract::json_pointer(&req, "/amount_cents")?;
//!     Extracted::Ok((req, vec![Claim::spend(Budget::new(customer, 50_000), cents)]))
//! });
//! let app: Router = Router::new()
//!     .route("/customers/{customer}/purchases", post(|| async { "bought" }))
//!     .route_layer(spend);
//! ```
//!
//! Apply it with `route_layer` (on a `Router`, or on one route's `post(h).route_layer(..)`): then
//! only requests that matched a route are reserved, and another method on the same path still
//! gets axum's `405`. (A plain `.layer(..)` also wraps the fallback.)
//!
//! # With a plain hyper service
//!
//! ```
//! use bytes::Bytes;
//! use http::{Method, Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, service_fn};
//! use tower_reserve::{
//!     Claim, Extracted, MemoryStore, RequestBody, ReserveLayer, Routes, Unique, extract,
//! };
//!
//! let routes = Routes::new().route(Method::POST, "/accounts", |req: Request<Bytes>| async move {
//!     let email: String = extract::json_pointer(&req, "/email")?;
//!     let id = extract::header(&req, "x-account-id")?.to_owned();
//!     Extracted::Ok((req, vec![Claim::own(Unique::email("accounts", &email), id)]))
//! });
//! let service = ServiceBuilder::new()
//!     .layer(ReserveLayer::new(MemoryStore::new(), routes))
//!     .service(service_fn(|_req: Request<RequestBody>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("created"))))
//!     }));
//! // It takes any request body, hyper's `Incoming` included: serve it with hyper-util's
//! // `TowerToHyperService` (examples/hyper_service.rs).
//! # let _ = service;
//! ```
//!
//! # A budget the route knows, shown to the client
//!
//! A [`BudgetOf`] decides a route's budget (its key, limit and window) from the request in one
//! place. The claims spend from it ([`BudgetOf::spend`]) and [`usage`] answers its state, so a
//! usage endpoint can never show another limit than the one the route enforces. A handler that
//! learns what the work really cost commits that much ([`Hold::set_actual`]); the rest of what
//! was held goes back in the same step. `examples/metered_api.rs` is the whole of it.
//!
//! ```
//! use axum::{Json, Router, routing::{get_service, post}};
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use tower_reserve::{
//!     Budget, BudgetOf, Hold, MemoryStore, Rejection, ReserveLayer, Window, extract, usage,
//! };
//!
//! // Each API key has 10 000 credits a month; no key is `401`.
//! let credits = BudgetOf::new(|req: &Request<Bytes>| {
//!     let key = extract::header(req, "x-api-key")
//!         .map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?;
//!     Ok(Budget::new(format!("credits:{key}"), 10_000).per(Window::Month))
//! });
//! let store = MemoryStore::new();
//! // A job reserves the most it may cost...
//! let jobs = ReserveLayer::new(
//!     store.clone(),
//!     credits.spend(|req: &Request<Bytes>| extract::json_pointer(req, "/max_cost")),
//! )
//! .remaining_headers(true);
//! // ...and commits what it used.
//! async fn run(hold: Hold, Json(job): Json<serde_json::Value>) -> Result<String, Rejection> {
//!     let used = job["used"].as_u64().unwrap_or(0);
//!     let (budget, held) = hold.budgets().next().expect("one budget");
//!     hold.set_actual(budget, used).map_err(|_| {
//!         Rejection::unprocessable(format!("used {used}, more than the {held} reserved"))
//!     })?;
//!     Ok(format!("{used} credits"))
//! }
//! let app: Router = Router::new()
//!     .route("/jobs", post(run).route_layer(jobs))
//!     .route("/usage", get_service(usage(store, credits)));
//! ```
//!
//! # What clients are told
//!
//! Every refusal is a [`Rejection`], rendered as `application/problem+json` (RFC 9457) with a
//! stable, plain `detail`. What the client sent is named (a missing header, the JSON pointer
//! that found nothing, serde's description of the client's own JSON: `invalid type: string "x",
//! expected u64 at line 1 column 12`), and nothing else: never a store's error (`redis: broken
//! pipe`), which claim of the extractor's failed and why (`claim 0: an amount must be at least
//! 1`), or a hold's id. Those go to the logs, through `tracing`, inside the request's span: a
//! store that cannot be reached is a `503` with `Retry-After` and a warning, a commit that fails
//! a `500` and a warning, claims that cannot be reserved a `422` and a debug line. A route that
//! cannot read a path parameter its pattern does not have is the server's mistake: `500`.
//!
//! A helper's status is a default: [`Rejection::with_status`] gives a route its own (`401` for a
//! missing API key, above). With the `axum` feature a `Rejection` is an axum response too, so
//! `Result<_, Rejection>` is a handler's return type.
//!
//! # Layout
//!
//! The folders follow a request: request → claims → store → handler → settle.
//!
//! - [`claim`](Claim), [`reservation`](Reservation): what a command needs ([`Budget`],
//!   [`Unique`], [`Claim`]) and how they are grouped ([`Reservation`]) and answered ([`Reserved`],
//!   [`Grant`], [`Denial`], [`Settled`]). All input is checked here, before any store sees it.
//! - [`store`]: the [`Store`] trait and its two implementations, [`MemoryStore`] (embedded, the
//!   default without Redis) and [`RedisStore`] (Lua scripts in `src/store/lua/`).
//! - `layer/`: [`extract`] (request → claims, [`ExtractClaims`], [`Routes`]), [`ReserveLayer`] and
//!   [`Reserve`] (body within a limit, checks, reserve), [`ResponseFuture`] (the handler under
//!   its lease, then settle), [`Hold`] (what the handler sees; the guard that releases on drop),
//!   [`Rejection`] (every refusal as `application/problem+json`), [`BudgetOf`] and [`usage`] (a
//!   route's budget in one place, and the read that shows it).
//! - [`Error`]: one opaque error type with [`ErrorKind`] and `is_*` predicates.
//! - [`policy`] (feature `policy`, on by default): limits as data; a policy file's routes turned
//!   into the same [`ExtractClaims`], served by [`PolicyLayer`](policy::PolicyLayer).
//!
//! # Semantics
//!
//! A **claim** is one thing a command needs: *spend* `amount` against a [`Budget`] (a limit on a
//! key, for all time or per [`Window`] by the store's clock), *own* a [`Unique`] value on behalf
//! of an owner (only a digest of the normalized value is stored), or *release on commit* a value
//! its owner holds. A **reservation** is all the claims of one command with an id and a lease. A
//! **hold** is a granted reservation.
//!
//! - **Reserve** checks every claim and holds them all, or none: a budget grants when
//!   `spent + held + amount <= limit`; a value grants when nobody else owns it and no other hold
//!   has it in flight (the owner claiming its own value again succeeds). A denial names the first
//!   claim that failed and why. The same id with the same claims answers the same hold
//!   (`replayed`); with other claims, [`ErrorKind::Conflict`].
//! - **Commit** makes the hold permanent: held becomes spent, held values become owned,
//!   release-on-commit values are freed (an e-mail change swaps two addresses in one step).
//!   **Release** gives everything back. **Extend** renews the lease. All three are idempotent.
//! - **The lease** bounds every hold. When it ends the hold's capacity is back, with no
//!   background process and no caller: a budget counts its holds per 100 ms of lease ends, and
//!   the next call on that budget gives back every such bucket whose end has passed, so an
//!   expired hold's amount returns at most 100 ms after its lease (at most a bounded number of
//!   buckets per call, so every call's work is bounded; until cleared, capacity is counted as
//!   held, never as free). A held value's marker expires by itself. A commit after the lease is
//!   refused with [`ErrorKind::Expired`] instead of spending what may since have been granted to
//!   another. The layer cancels a handler that outlives its lease (less a margin).
//! - **Release before reserve** succeeds and leaves a tombstone that refuses the late reserve.
//!   Settled records and tombstones expire after a retention period (10 minutes by default), so
//!   memory follows what is in flight, not history.
//! - **Input** is checked before anything is written: amounts and limits are integer minor units,
//!   1 to 2^53 - 1 (exact in Lua's doubles); keys 1 to 512 bytes; at most 64 claims, two of which
//!   may not target one key.
//!
//! ## What a limit belongs to
//!
//! A budget's limit is not stored: it travels with each claim, and each reserve checks the
//! claim's own limit against what is spent and held on the budget's key and window. So two
//! routes that name one key (and window) with different limits share one counter, and each
//! checks its own limit against it: with `Budget::new("acme", 500)` on one route and
//! `Budget::new("acme", 1_000)` on another, after 600 spent the first refuses everything and the
//! second grants up to 400 more. That is what lets a limit change (a plan upgraded) take effect
//! on the next request with nothing to migrate; it is a surprise when two places build the same
//! key's budget differently. Build each key's budget in one place: one function (or one
//! [`BudgetOf`], or one [`policy`] rule) used by every route that spends from it and by whatever
//! shows it ([`usage`], [`policy::Policy::budgets_of`]). The windows are part of the budget's
//! identity: `acme` per day and `acme` for all time are two counters.
//!
//! ```
//! use tower_reserve::{Budget, Claim, MemoryStore, Reservation, Reserved, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_reserve::Error> {
//! let store = MemoryStore::new();
//! let spend = |limit, amount| {
//!     Reservation::builder()
//!         .claim(Claim::spend(Budget::new("acme", limit), amount))
//!         .build()
//! };
//! let held = store.reserve(&spend(1_000, 600)?).await?;
//! let Reserved::Granted(grant) = held else { unreachable!() };
//! store.commit(&grant.id).await?;
//! // One counter, each claim's own limit.
//! assert!(matches!(store.reserve(&spend(500, 1)?).await?, Reserved::Denied(_)));
//! assert!(matches!(store.reserve(&spend(1_000, 400)?).await?, Reserved::Granted(_)));
//! # Ok(())
//! # }
//! ```
//!
//! What the layer does on each path, once the claims are held:
//!
//! | the handler | the hold |
//! | --- | --- |
//! | answers `2xx` (or what [`ReserveLayer::commit_if`] accepts) | committed before the response leaves (or in the background, by option); a failed commit becomes a `500` |
//! | answers anything else, or returns `Err` | released before the response leaves |
//! | panics | released: by the response of tower-http's `CatchPanic` placed inside this layer, or by the drop guard when the panic unwinds through it |
//! | is dropped (client gone, outer timeout) | released by the drop guard, in a spawned task |
//! | outlives its lease | cancelled, released, `503` |
//! | calls [`Hold::defer`] | left alone: commit or release later by id |
//! | its process dies | nothing runs; the lease ends and the capacity is back |
//!
//! # Redis Cluster
//!
//! Every key of one budget or one unique value carries one hash tag, so it lives on one slot
//! (budget keys and namespaces may not contain braces for that reason). A reservation whose
//! claims all share a slot would fit one script, but its hold must also be found by id alone, so
//! on a Cluster each reservation writes a small *manifest* in its id's own slot, listing its
//! *slot groups*; each group is reserved by the same script as on one node, with a hold record
//! of its own.
//!
//! - **Reserve** opens the manifest, then reserves the groups in order. When a later group is
//!   denied (or fails), the groups already held are given back and the manifest removed, so the
//!   caller sees all or nothing and may retry the same id. In between, another reader may see an
//!   earlier group's amounts as held for the time of a few round trips; it never sees them as
//!   spent. If the process dies between groups, their leases give everything back.
//! - **Commit** and **release** read the manifest and fan out to every group, each idempotent,
//!   then record the outcome on the manifest; a retry after a crash finishes the job. A reader
//!   may see one group committed before the next. The manifest's lease ends first (it is written
//!   first), so a commit that starts within it commits every group unless a group's lease ends
//!   during the fan-out itself; those groups are refused and released, and the commit answers
//!   [`ErrorKind::Expired`].
//! - **Failover and restarts**: a script missing on a node (a restart, a promoted replica,
//!   `SCRIPT FLUSH`) costs one `SCRIPT LOAD` and a retry. Redis replicates asynchronously: a
//!   commit acknowledged by a primary that dies before replicating it is lost with it, and the
//!   budget grants that amount again. [`RedisStoreBuilder::wait_for_replicas`] makes each commit
//!   wait (Redis `WAIT`) until replicas acknowledge it: a commit answered after they did survives
//!   the primary's death. A `WAIT` that times out is logged, not turned into an error (the
//!   primary has applied the commit and cannot take it back), so under that option an `Ok`
//!   without a warning means replicated; an `Ok` with one means applied on the primary only.
#![deny(unsafe_code)]
#![warn(missing_docs)]

// The README's Rust blocks are compiled with the doc tests, so what it shows keeps building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod claim;
mod error;
mod layer;
#[cfg(feature = "policy")]
pub mod policy;
mod reservation;
mod settlement;
pub mod store;

pub use claim::{
    Budget, Claim, MAX_AMOUNT, MAX_KEY_LEN, MAX_WINDOW, Unique, Window, normalize_email,
};
pub use error::{Error, ErrorKind};
pub use layer::{
    ACTUAL_HEADER, Actual, BudgetOf, DEFAULT_BODY_LIMIT, Disconnect, ExtractClaims, Extracted,
    Hold, PROBLEM_TYPES, Rejection, RejectionKind, RequestBody, Reserve, ReserveLayer,
    ResponseBody, ResponseFuture, Routes, Spend, Usage, Validate, extract, usage,
};
pub use reservation::{
    BudgetStatus, Denial, DenialReason, Grant, HoldId, MAX_CLAIMS, MAX_LEASE, Reservation,
    ReservationBuilder, Reserved, Settled,
};
pub use settlement::{DEFAULT_REFUND_RETAIN, MAX_MEMO, MAX_RETAIN, Refund, Settlement};
pub use store::{BatchStats, MemoryStore, RedisStore, RedisStoreBuilder, Store};
