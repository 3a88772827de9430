//! Reserve what a command needs, atomically, before its handler runs; commit or release it by
//! the handler's outcome.
//!
//! Validation against an eventually consistent read model races: two $20 purchases that both
//! read "$480 of $500 spent" both pass, and two sign-ups that both read "address free" both take
//! it. `tower-reserve` makes the check and the claim one atomic step. A tower layer works out a
//! request's *claims* (spend an amount against a budget; own a value in a set), reserves them
//! all in one step (one Lua function on Redis), and only then runs the handler. A `2xx` commits the
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
//! // `TowerToHyperService` (examples/hyper_service/).
//! # let _ = service;
//! ```
//!
//! # A budget the route knows, shown to the client
//!
//! A [`BudgetOf`] decides a route's budget (its key, limit and window) from the request in one
//! place. The claims spend from it ([`BudgetOf::spend`]) and [`usage`] answers its state, so a
//! usage endpoint can never show another limit than the one the route enforces. A handler that
//! learns what the work really cost commits that much ([`Hold::set_actual`]); the rest of what
//! was held goes back in the same step. `examples/metered_api/` is the whole of it.
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
//!   default without Redis) and [`RedisStore`] (Redis Functions in `src/store/lua/`).
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
//!   has it in flight. One hold at a time has a value in flight, whatever it claims of it: an
//!   owner claiming its own value again, or releasing it, waits for no one but is refused
//!   (`Taken`) while another hold has it in flight. [`Store::remove`] frees the ownership, not a
//!   hold in flight: that hold's commit makes the value its owner's (again). A denial names the
//!   first claim that failed and why. The same id with the same claims (or, with a payload, the
//!   same payload) answers the same hold (`replayed`); with other claims,
//!   [`ErrorKind::Conflict`].
//! - **Commit** makes the hold permanent: held becomes spent, held values become owned,
//!   release-on-commit values are freed (an e-mail change swaps two addresses in one step).
//!   **Release** gives everything back. **Extend** renews the lease. All three are idempotent.
//! - **A partial commit** spends what was used, not what was held:
//!   [`Settlement::commit`]`().actual(&budget, used)` spends `used` of the hold's amount on that
//!   budget and gives the rest back in the same step (`0` spends nothing). More than was held is
//!   refused with [`ErrorKind::ExceedsHold`] and changes nothing: reserve the most a command may
//!   cost. In the layer, a handler reports its actual amount with [`Hold::set_actual`], an
//!   [`Actual`] response extension or the [`ACTUAL_HEADER`] response header.
//! - **A refund** gives an amount back after it was spent ([`Store::refund`], [`Refund`]): an order
//!   cancelled after its purchase committed. It is a movement of its own, as a reversing
//!   transfer is, never an undoing of the commit: the caller says how much, and its id makes a
//!   retried refund count once. It never takes `spent` below zero ([`ErrorKind::ExceedsSpent`],
//!   nothing changed); on a windowed budget it goes to the current window, or to the window of
//!   [`Refund::in_window_of`] (a window that has ended takes nothing back:
//!   [`ErrorKind::Expired`]). A refund id counts once for as long as its record is kept
//!   ([`Refund::retain`]), whatever window a retry lands in.
//! - **The lease** bounds every hold. When it ends the hold's capacity is back, with no
//!   background process and no caller: a budget counts its holds per 100 ms of lease ends, and
//!   the next call on that budget gives back every such bucket whose end has passed, so an
//!   expired hold's amount returns at most 100 ms after its lease (at most a bounded number of
//!   buckets per call, so every call's work is bounded; until cleared, capacity is counted as
//!   held, never as free). A held value's marker expires by itself. A commit after the lease is
//!   refused with [`ErrorKind::Expired`] instead of spending what may since have been granted to
//!   another. The layer cancels a handler that outlives its lease (less a margin).
//! - **Release before reserve** succeeds and leaves a tombstone that refuses the late reserve.
//! - **Retention follows who can ask again.** A settled hold's record is kept, with its memo
//!   (what its settler kept with it, such as the response an idempotency key replays), only if
//!   someone can ask for that id again: the store keeps it for the retention period
//!   ([`store::DEFAULT_RETAIN`], 10 minutes, or [`Settlement::retain`]) unless the settlement says
//!   [`Settlement::forget`]. The layer forgets the holds whose ids it generated at random (no one
//!   can name them again) and keeps those whose ids were named: ids given by the caller,
//!   idempotency keys (kept as long as [`Idempotency::keep_for`]), deferred holds. Memory follows
//!   what is in flight, and what may be asked again, not history. Tombstones and refunds' records
//!   are kept for their own retention.
//! - **Input** is checked before anything is written: amounts and limits are integer minor units,
//!   1 to 2^53 - 1 (exact in Lua's doubles); keys 1 to 512 bytes; at most 64 claims, two of which
//!   may not target one key.
//!
//! What the layer does on each path, once the claims are held:
//!
//! | the handler | the hold |
//! | --- | --- |
//! | answers `2xx` (or what [`ReserveLayer::commit_if`] accepts) | committed before the response leaves (or in the background, by option), with its actual amounts if it reported any; a failed commit becomes a `500` |
//! | answers anything else, or returns `Err` | released before the response leaves |
//! | panics | released: by the response of tower-http's `CatchPanic` placed inside this layer, or by the drop guard when the panic unwinds through it |
//! | its client goes away | [`Disconnect::Finish`] (the default): the handler runs on in a task of its own and its outcome settles the hold, so that work done is never undone by a dropped connection (nor is work got for free by hanging up just before the answer); [`Disconnect::Release`]: the handler is dropped and the hold released |
//! | is dropped by an outer timeout (tower-http's `TimeoutLayer` outside this layer) | the same as a client that went away: the layer cannot tell them apart. With [`Disconnect::Finish`] the client told `504` is charged if the handler then succeeds: give metered routes an [`Idempotency`] key, so that the retry gets the result instead of paying twice, or put the timeout inside the layer (then the handler is cancelled and released), or choose [`Disconnect::Release`] |
//! | outlives its lease | cancelled, released, `503` |
//! | calls [`Hold::defer`] | left alone: commit or release later by id |
//! | its process dies | nothing runs; the lease ends and the capacity is back |
//!
//! A request whose client leaves while its reservation is still on its way to the store is
//! handled too: the grant that arrives after it left is released.
//!
//! **Idempotency keys** ([`Idempotency`]): a retried request gets the first one's response
//! again, from the store, in every process that shares it; `409` while the first is in flight,
//! `422` for a key reused with another body. [`Idempotency`] lists the IETF draft's requirements
//! one by one against what the layer does.
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
//! # Redis
//!
//! [`RedisStore`] needs Redis 7.0 or later: its Lua is one library of Redis Functions
//! (`src/store/lua/`), loaded with `FUNCTION LOAD` at connect time and again by the first call
//! that finds it missing (a restarted node, a promoted replica, `FUNCTION FLUSH`); a node that
//! restarts from its append-only file has it already. Each operation is one run of one
//! function; the operations that requests ask of one node while a call is in flight there go
//! together in the next call. Keys must not be evicted: the store checks `maxmemory-policy` at
//! connect time and refuses any policy but `noeviction` (an evicted budget would grant its limit
//! again), unless [`RedisStoreBuilder::allow_eviction`] says otherwise. Keys that can end (holds,
//! settled records, windowed budgets) carry their own expiry; lifetime budgets and owned values
//! stay until removed.
//!
//! # Redis Cluster
//!
//! Every key of one budget or one unique value carries one hash tag, so it lives on one slot
//! (budget keys and namespaces may not contain braces for that reason). A hold's record lives in
//! its id's slot: an id may name its slot (`name@slot`), and the ids the layer generates are
//! placed at the slot of the reservation's first claim, so that a reservation whose claims share
//! a slot is one operation on one node, exactly as on one Redis.
//!
//! A reservation across slots pays for more. Its *home* record, in its id's slot, holds the
//! claims of that slot and lists the other *groups*; each group is held under a record of its
//! own in its own slot, with a lease 100 ms longer than the home's.
//!
//! - **Reserve**: the home first, then every other group at once, then the home is marked held.
//!   The home decides: a second attempt with the same id meanwhile is told the hold is in flight
//!   ([`ErrorKind::InFlight`]), never granted twice. When a group is denied (or fails), what this
//!   attempt held is given back and its records removed, so the caller sees all or nothing and
//!   may retry the same id. In between, another reader may see an earlier group's amounts as
//!   held for a few round trips; never as spent. If the process dies between groups, their leases
//!   give everything back.
//! - **Commit and release** are decided at the home, then carried to the other groups at once.
//!   Before the home accepts a commit, every group's lease is made to last at least 30 seconds
//!   more (a group that has ended already makes the commit expire, and the hold is released
//!   everywhere): so a commit the home accepted finds every group still held, however slow a
//!   group's node was until then. The bound this rests on: the commit reaches each group within
//!   those 30 seconds (a group node paused longer than that, between the two steps, loses its
//!   part, and the answer says so). A commit the home refused as expired releases the groups. A
//!   group that could not follow (its node unreachable) makes the answer an error that names
//!   the groups not yet settled; settling again finishes the job, each group being idempotent.
//!   A forgotten settlement ([`Settlement::forget`]) drops the home's record once every group
//!   has followed, as on one node.
//! - **Extend** renews the home first, then the groups, so that the home's lease always ends
//!   first.
//! - **Slots that move**: every operation reads each key it may write before its first write,
//!   so that a key its node no longer serves (a slot migrating) fails it before anything
//!   changed; it is sent again where the slot now lives.
//! - **Calls sent twice**: a call whose answer was lost (a timeout, a dropped connection, the
//!   Cluster client sending it again) can run twice. Reserves are idempotent by their call's
//!   nonce, settlements by the hold's id (and a forgotten one answers its own call again for a
//!   few seconds), refunds by their id, and the rest (`set_spent`, `remove`) by a nonce of their
//!   own. A reserve whose answer was lost is given back by the store, and a tombstone refuses
//!   that call should it still arrive, so that the id may be reserved again at once.
//! - **Failover**: Redis replicates asynchronously: a commit acknowledged by a primary that dies
//!   before replicating it is lost with it, and the budget grants that amount again.
//!   [`RedisStoreBuilder::wait_for_replicas`] makes each commit wait (Redis `WAIT`) until replicas
//!   acknowledge it: a commit answered after they did survives the primary's death. A `WAIT`
//!   that times out is logged, not turned into an error (the primary has applied the commit and
//!   cannot take it back), so under that option an `Ok` without a warning means replicated; an
//!   `Ok` with one means applied on the primary only.
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
    Budget, Claim, DigestKey, MAX_AMOUNT, MAX_KEY_LEN, MAX_WINDOW, Unique, Window, normalize_email,
};
pub use error::{Error, ErrorKind};
pub use layer::{
    ACTUAL_HEADER, Actual, BudgetOf, DEFAULT_BODY_LIMIT, Disconnect, ExtractClaims, Extracted,
    Hold, Idempotency, Rejection, RejectionKind, RequestBody, Reserve, ReserveLayer, ResponseBody,
    ResponseFuture, Routes, Spend, Usage, Validate, extract, usage,
};
pub use reservation::{
    BudgetStatus, Denial, DenialReason, Grant, HoldId, MAX_CLAIMS, MAX_LEASE, Reservation,
    ReservationBuilder, Reserved, Settled,
};
pub use settlement::{DEFAULT_REFUND_RETAIN, MAX_MEMO, MAX_RETAIN, Refund, Settlement};
pub use store::{BatchStats, MemoryStore, RedisStore, RedisStoreBuilder, Store};
