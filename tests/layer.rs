//! The layer end to end, against every store: settle paths, disconnects, concurrency, body
//! limits, rejections, per-route policies and idempotency keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use rand::RngExt;
use support::fresh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_reserve::{
    Budget, Claim, Disconnect, ExtractClaims, Extracted, Hold, HoldId, Rejection, RejectionKind,
    RequestBody, ReserveLayer, Routes, Store, Unique, Window, extract,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

macro_rules! layer_suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(tower_reserve::MemoryStore::new()).await;
                }
            )*
        }
        mod redis {
            use support::redis_server::RedisServer;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = RedisServer::start();
                    let store = tower_reserve::RedisStore::connect(&server.url()).await.unwrap();
                    super::$case(store).await;
                    drop(server);
                }
            )*
        }
    };
}

layer_suite!(
    success_commits,
    client_error_releases,
    server_error_releases,
    inner_error_releases,
    caught_panic_releases,
    uncaught_panic_releases,
    dropped_future_releases,
    dropped_future_finishes_the_handler,
    outer_timeout_releases,
    panic_inside_call_releases,
    dropped_while_reserving_releases_on_grant,
    lease_timer_leaves_a_deferred_hold_alone,
    lease_bounds_the_handler,
    extend_keeps_a_long_handler_alive,
    deferred_hold_is_committed_later,
    settling_by_the_handler_itself,
    commit_in_background_answers_first,
    client_disconnect_releases,
    client_disconnect_finishes_the_handler,
    concurrent_requests_never_overspend,
    body_limit_is_enforced,
    over_budget_is_a_403_problem,
    taken_unique_is_a_409_problem,
    json_extraction_errors,
    custom_validator_reserves_nothing,
    custom_error_handler_reshapes,
    axum_routes_keep_their_own_policies,
    routes_table_keeps_its_own_policies,
    idempotency_keys,
    idempotency_options,
    racing_sends_of_one_key_run_once,
    actual_amounts_commit_what_was_used,
    bad_actual_reports_release_the_hold,
    remaining_headers_tell_what_is_left,
    over_a_window_the_answer_can_be_429_with_retry_after,
    shadow_mode_holds_nothing_and_lets_all_through,
    the_layer_forgets_the_holds_it_named,
);

// ---------------------------------------------------------------------------------------------
// Helpers

const LIMIT: u64 = 1_000;

#[derive(Clone, Default)]
struct Ctl {
    started: Arc<Notify>,
    go: Arc<Notify>,
    calls: Arc<AtomicUsize>,
}

impl Ctl {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn reply(
    status: u16,
    held: bool,
    body: impl Into<Bytes>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    Ok(Response::builder()
        .status(status)
        .header("x-held", if held { "yes" } else { "no" })
        .body(Full::new(body.into()))
        .unwrap())
}

/// The inner service: what it does is steered by the `x-mode` header.
async fn handle(ctl: Ctl, req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, BoxError> {
    ctl.calls.fetch_add(1, Ordering::SeqCst);
    let hold = req.extensions().get::<Hold>().cloned();
    let held = hold.is_some();
    let mode = req
        .headers()
        .get("x-mode")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    match mode.as_str() {
        "ok" => reply(200, held, "ok"),
        "bad" => reply(400, held, "bad"),
        "fail" => reply(500, held, "fail"),
        "err" => Err("the inner service failed".into()),
        "panic" => panic!("the handler panicked (on purpose)"),
        "hang" => {
            ctl.started.notify_one();
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(200, held, "late")
        }
        "wait" => {
            ctl.started.notify_one();
            ctl.go.notified().await;
            reply(200, held, "waited")
        }
        "extend" => {
            let hold = hold.expect("a hold");
            // Four extensions, each 400 ms into a 1 s lease: 1.6 s in all, past the first
            // lease, with 600 ms to spare for each on a loaded machine.
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                hold.extend(Duration::from_secs(1)).await?;
            }
            reply(200, held, "extended")
        }
        "defer" => {
            let hold = hold.expect("a hold").defer();
            reply(202, held, hold.id().as_str().to_owned())
        }
        "release-self" => {
            hold.expect("a hold").release().await?;
            reply(200, held, "released myself")
        }
        "defer-late" => {
            // Takes settlement over, then runs past the layer's time for a handler (the lease
            // less its margin) but not past the lease, and commits the hold itself.
            let hold = hold.expect("a hold").defer();
            tokio::time::sleep(Duration::from_millis(950)).await;
            hold.commit().await?;
            reply(202, held, "committed late")
        }
        // Actual amounts, from the request's `x-actual`: through the hold, a response
        // extension, or the response header.
        "actual-hold" => {
            let hold = hold.expect("a hold");
            let (budget, _) = hold.budgets().next().expect("a budget claim");
            let budget = budget.clone();
            hold.set_actual(&budget, actual_of(&req))?;
            let left = hold
                .remaining_after_commit(&budget)
                .expect("spends from it");
            reply(200, held, format!("used less; {left} left"))
        }
        "actual-ext" => {
            let mut response = reply(200, held, "used less")?;
            response
                .extensions_mut()
                .insert(tower_reserve::Actual::amount(actual_of(&req)));
            Ok(response)
        }
        "actual-header" => {
            let mut response = reply(200, held, "used less")?;
            let value = req.headers()["x-actual"].clone();
            response
                .headers_mut()
                .insert(tower_reserve::ACTUAL_HEADER, value);
            Ok(response)
        }
        "waited-long" => reply(200, held, "a body longer than four bytes"),
        "hold-id" => {
            let id = hold.expect("a hold").id().to_string();
            reply(200, held, id)
        }
        "commit-self" => {
            hold.expect("a hold").commit().await?;
            reply(200, held, "committed myself")
        }
        "echo" => {
            let body = req.into_body().collect().await?.to_bytes();
            reply(200, held, body)
        }
        other => panic!("unknown mode {other}"),
    }
}

fn actual_of<B>(req: &Request<B>) -> u64 {
    req.headers()["x-actual"].to_str().unwrap().parse().unwrap()
}

fn handler(
    ctl: Ctl,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |req| handle(ctl.clone(), req))
}

fn bad(detail: &str) -> Rejection {
    Rejection::bad_request(detail.to_owned())
}

/// Spends `x-amount` (a header) on `budget`; no header, no claims.
fn spend_claims(budget: Budget) -> impl ExtractClaims + Clone {
    move |req: Request<Bytes>| {
        let budget = budget.clone();
        async move {
            let Some(amount) = req.headers().get("x-amount") else {
                return Extracted::Ok((req, Vec::new()));
            };
            let amount: u64 = amount
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("x-amount is not a number"))?;
            Extracted::Ok((req, vec![Claim::spend(budget, amount)]))
        }
    }
}

fn request(mode: &str, amount: u64) -> Request<Full<Bytes>> {
    Request::post("/")
        .header("x-mode", mode)
        .header("x-amount", amount.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Checks the problem document's shape and answers it.
    fn problem(&self, status: u16, title: &str) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(
            self.headers[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        let json = self.json();
        // No type URI that would not resolve: the title names the problem.
        assert_eq!(json["type"], "about:blank", "{json}");
        assert_eq!(json["title"], title, "{json}");
        assert_eq!(json["status"], status, "{json}");
        assert!(
            json["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{json}"
        );
        json
    }

    fn held(&self) -> bool {
        self.headers.get("x-held").is_some_and(|v| v == "yes")
    }
}

async fn answer<B>(response: Response<B>) -> Answer
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("the body").to_bytes(),
    }
}

async fn call<S, ReqB, B>(svc: S, req: Request<ReqB>) -> Answer
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    answer(svc.oneshot(req).await.expect("a response")).await
}

async fn assert_budget<St: Store>(store: &St, budget: &Budget, spent: u64, held: u64) {
    let s = store.budget(budget).await.expect("budget");
    assert_eq!((s.spent, s.held), (spent, held), "spent, held of {s:?}");
}

/// Waits (at most 3 s) until nothing is held on `budget`, then checks what was spent.
async fn settles_to<St: Store>(store: &St, budget: &Budget, spent: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = store.budget(budget).await.expect("budget");
        if s.held == 0 {
            assert_eq!(s.spent, spent, "{s:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the hold was not released in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn new_budget(limit: u64) -> Budget {
    Budget::new(fresh("budget"), limit)
}

// ---------------------------------------------------------------------------------------------
// 1. Settle paths

async fn success_commits<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc =
        ReserveLayer::new(store.clone(), spend_claims(budget.clone())).layer(handler(ctl.clone()));
    let a = call(svc.clone(), request("ok", 300)).await;
    assert_eq!(a.status, 200);
    assert!(a.held(), "the handler saw its hold");
    assert_budget(&store, &budget, 300, 0).await;
    let a = call(svc, request("ok", 700)).await;
    assert_eq!(a.status, 200);
    assert_budget(&store, &budget, 1000, 0).await;
}

async fn client_error_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let a = call(svc, request("bad", 300)).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body, "bad");
    assert_budget(&store, &budget, 0, 0).await;
}

async fn server_error_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let a = call(svc, request("fail", 300)).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.body, "fail");
    assert_budget(&store, &budget, 0, 0).await;
}

async fn inner_error_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let err = svc
        .oneshot(request("err", 300))
        .await
        .expect_err("the inner error comes through");
    assert_eq!(err.to_string(), "the inner service failed");
    assert_budget(&store, &budget, 0, 0).await;
}

async fn caught_panic_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ServiceBuilder::new()
        .layer(ReserveLayer::new(
            store.clone(),
            spend_claims(budget.clone()),
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(handler(Ctl::default()));
    let a = call(svc.clone(), request("panic", 300)).await;
    assert_eq!(a.status, 500);
    assert_budget(&store, &budget, 0, 0).await;
    // The service still works afterwards.
    assert_eq!(call(svc, request("ok", 5)).await.status, 200);
    assert_budget(&store, &budget, 5, 0).await;
}

async fn uncaught_panic_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let task = tokio::spawn(svc.oneshot(request("panic", 300)));
    let join = task.await.expect_err("the task panicked");
    assert!(join.is_panic());
    settles_to(&store, &budget, 0).await;
}

async fn dropped_future_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .on_disconnect(Disconnect::Release)
        .layer(handler(ctl.clone()));
    let mut future = Box::pin(svc.oneshot(request("hang", 300)));
    tokio::select! {
        _ = &mut future => panic!("the handler hangs"),
        _ = ctl.started.notified() => {}
    }
    assert_budget(&store, &budget, 0, 300).await;
    drop(future);
    settles_to(&store, &budget, 0).await;
}

async fn dropped_future_finishes_the_handler<St: Store>(store: St) {
    // The default: a handler whose request went away runs to its end, and its own outcome
    // settles the hold. A success commits...
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc =
        ReserveLayer::new(store.clone(), spend_claims(budget.clone())).layer(handler(ctl.clone()));
    let mut future = Box::pin(svc.clone().oneshot(request("wait", 300)));
    tokio::select! {
        _ = &mut future => panic!("the handler waits"),
        _ = ctl.started.notified() => {}
    }
    drop(future);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_budget(&store, &budget, 0, 300).await;
    ctl.go.notify_one();
    settles_to(&store, &budget, 300).await;
    assert_eq!(ctl.calls(), 1);

    // ...a panic releases...
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_secs(60))
        .layer(tower::service_fn(
            move |req: Request<RequestBody>| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if req.headers().contains_key("x-amount") {
                    panic!("the handler panicked after its client left (on purpose)");
                }
                reply(200, true, "unreachable")
            },
        ));
    let future = tokio::time::timeout(Duration::from_millis(20), svc.oneshot(request("ok", 40)));
    assert!(future.await.is_err(), "gone before the handler answers");
    assert_budget(&store, &budget, 0, 40).await;
    settles_to(&store, &budget, 0).await;

    // ...and the lease still bounds it.
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_millis(300))
        .layer(handler(Ctl::default()));
    let future = tokio::time::timeout(Duration::from_millis(50), svc.oneshot(request("hang", 70)));
    assert!(future.await.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_budget(&store, &budget, 0, 0).await;
}

async fn outer_timeout_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .layer(
            ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
                .on_disconnect(Disconnect::Release),
        )
        .service(handler(ctl.clone()));
    let started = Instant::now();
    let err = svc
        .oneshot(request("hang", 300))
        .await
        .expect_err("timed out");
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    settles_to(&store, &budget, 0).await;

    // And tokio's timeout around a call.
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .on_disconnect(Disconnect::Release)
        .layer(handler(ctl.clone()));
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        svc.oneshot(request("hang", 200)),
    )
    .await;
    assert!(r.is_err());
    settles_to(&store, &budget, 0).await;
}

/// An inner service whose `call` itself panics, before it returns a future.
#[derive(Clone)]
struct PanicsInCall;

impl Service<Request<RequestBody>> for PanicsInCall {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<RequestBody>) -> Self::Future {
        panic!("the inner service's call panicked (on purpose)")
    }
}

async fn panic_inside_call_releases<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_secs(60))
        .layer(PanicsInCall);
    let join = tokio::spawn(svc.oneshot(request("ok", 300)))
        .await
        .expect_err("the call panicked");
    assert!(join.is_panic());
    // Released at once, not after the 60 s lease.
    settles_to(&store, &budget, 0).await;
}

/// A store whose reserve is applied at once but answered only after a delay, as over a slow
/// network.
#[derive(Clone)]
struct SlowReserve<St>(St, Duration);

impl<St: Store> Store for SlowReserve<St> {
    async fn reserve(
        &self,
        r: &tower_reserve::Reservation,
    ) -> Result<tower_reserve::Reserved, tower_reserve::Error> {
        let answer = self.0.reserve(r).await;
        tokio::time::sleep(self.1).await;
        answer
    }
    async fn check(
        &self,
        r: &tower_reserve::Reservation,
    ) -> Result<tower_reserve::Reserved, tower_reserve::Error> {
        self.0.check(r).await
    }
    async fn settle(
        &self,
        id: &HoldId,
        s: &tower_reserve::Settlement,
    ) -> Result<tower_reserve::Settled, tower_reserve::Error> {
        self.0.settle(id, s).await
    }
    async fn refund(
        &self,
        r: &tower_reserve::Refund,
    ) -> Result<tower_reserve::Settled, tower_reserve::Error> {
        self.0.refund(r).await
    }
    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, tower_reserve::Error> {
        self.0.extend(id, lease).await
    }
    async fn budget(
        &self,
        b: &Budget,
    ) -> Result<tower_reserve::BudgetStatus, tower_reserve::Error> {
        self.0.budget(b).await
    }
    async fn set_spent(&self, b: &Budget, spent: u64) -> Result<(), tower_reserve::Error> {
        self.0.set_spent(b, spent).await
    }
    async fn owner(&self, v: &Unique) -> Result<Option<String>, tower_reserve::Error> {
        self.0.owner(v).await
    }
    async fn remove(&self, v: &Unique) -> Result<bool, tower_reserve::Error> {
        self.0.remove(v).await
    }
}

async fn dropped_while_reserving_releases_on_grant<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let slow = SlowReserve(store.clone(), Duration::from_millis(200));
    let svc = ReserveLayer::new(slow, spend_claims(budget.clone()))
        .lease(Duration::from_secs(60))
        .layer(handler(ctl.clone()));
    let gone = tokio::time::timeout(Duration::from_millis(50), svc.oneshot(request("ok", 300)));
    assert!(
        gone.await.is_err(),
        "dropped while the reserve is in flight"
    );
    // The reserve has landed; its grant is released as soon as it arrives, not after 60 s.
    assert_budget(&store, &budget, 0, 300).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_budget(&store, &budget, 0, 0).await;
    assert_eq!(ctl.calls(), 0, "the handler never ran");
}

async fn lease_timer_leaves_a_deferred_hold_alone<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_millis(1_000))
        .layer(handler(Ctl::default()));
    let a = call(svc, request("defer-late", 300)).await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    assert_eq!(a.body, "committed late");
    assert_budget(&store, &budget, 300, 0).await;
}

async fn lease_bounds_the_handler<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_millis(200))
        .layer(handler(Ctl::default()));
    let started = Instant::now();
    let a = call(svc, request("hang", 300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    a.problem(503, "Handler ran out of time");
    assert_eq!(a.headers[http::header::RETRY_AFTER], "1");
    assert_budget(&store, &budget, 0, 0).await;
}

async fn extend_keeps_a_long_handler_alive<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .lease(Duration::from_secs(1))
        .layer(handler(Ctl::default()));
    let started = Instant::now();
    let a = call(svc, request("extend", 250)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body, "extended");
    assert!(started.elapsed() >= Duration::from_millis(1600));
    assert_budget(&store, &budget, 250, 0).await;
}

async fn deferred_hold_is_committed_later<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let a = call(svc, request("defer", 400)).await;
    assert_eq!(a.status, 202);
    // Neither committed nor released by the layer.
    assert_budget(&store, &budget, 0, 400).await;
    let id = HoldId::new(String::from_utf8(a.body.to_vec()).unwrap()).unwrap();
    store.commit(&id).await.expect("commit by id");
    assert_budget(&store, &budget, 400, 0).await;
}

async fn settling_by_the_handler_itself<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    // Committed by the handler: the layer's commit is a replay, spent once.
    let a = call(svc.clone(), request("commit-self", 70)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_budget(&store, &budget, 70, 0).await;
    // Released by the handler, then a 2xx: the layer's commit fails, and says so.
    let a = call(svc, request("release-self", 30)).await;
    let json = a.problem(500, "Commit failed");
    assert!(
        json["detail"]
            .as_str()
            .unwrap()
            .contains("could not be committed")
    );
    assert_budget(&store, &budget, 70, 0).await;
}

async fn commit_in_background_answers_first<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .commit_in_background(true)
        .layer(handler(Ctl::default()));
    for amount in [10, 20, 30] {
        assert_eq!(call(svc.clone(), request("ok", amount)).await.status, 200);
    }
    // A 4xx still releases, and a failed background commit cannot change the 200.
    assert_eq!(call(svc.clone(), request("bad", 500)).await.status, 400);
    let a = call(svc, request("release-self", 40)).await;
    assert_eq!(a.status, 200);
    settles_to(&store, &budget, 60).await;
}

// ---------------------------------------------------------------------------------------------
// 2. A client that goes away

async fn client_disconnect_releases<St: Store>(store: St) {
    client_disconnect(store, Disconnect::Release).await;
}

async fn client_disconnect_finishes_the_handler<St: Store>(store: St) {
    client_disconnect(store, Disconnect::Finish).await;
}

/// A client over real TCP starts a purchase and hangs up while the handler runs.
async fn client_disconnect<St: Store>(store: St, mode: Disconnect) {
    let budget = new_budget(LIMIT);
    let started = Arc::new(Notify::new());
    let entered = started.clone();
    let app = axum::Router::new()
        .route(
            "/slow",
            axum::routing::post(move |hold: Hold| {
                let entered = entered.clone();
                async move {
                    let _ = hold;
                    entered.notify_one();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "done"
                }
            }),
        )
        .route_layer(
            ReserveLayer::new(store.clone(), spend_claims(budget.clone())).on_disconnect(mode),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /slow HTTP/1.1\r\nhost: localhost\r\nx-amount: 123\r\ncontent-length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("the handler runs");
    assert_budget(&store, &budget, 0, 123).await;
    drop(stream);
    match mode {
        // Cancelled where it stood: nothing spent.
        Disconnect::Release => settles_to(&store, &budget, 0).await,
        // Finished: the handler's success commits, as if the client had stayed.
        _ => settles_to(&store, &budget, 123).await,
    }

    // The server still answers.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /missing HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 404"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency

async fn concurrent_requests_never_overspend<St: Store>(store: St) {
    let limit = 10_000;
    let budget = new_budget(limit);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    let mut rng = rand::rng();
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let amount: u64 = rng.random_range(1..=100);
        // Every seventh amount gets a 4xx from the handler, which releases.
        let mode = if amount.is_multiple_of(7) {
            "bad"
        } else {
            "ok"
        };
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let a = call(svc, request(mode, amount)).await;
            (amount, a.status)
        }));
    }
    let mut committed = 0;
    let (mut ok, mut denied, mut released) = (0, 0, 0);
    for task in tasks {
        let (amount, status) = task.await.unwrap();
        match status.as_u16() {
            200 => {
                committed += amount;
                ok += 1;
            }
            400 => released += 1,
            403 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(committed <= limit, "{committed} > {limit}");
    assert!(
        ok > 0 && denied > 0,
        "ok {ok}, denied {denied}, released {released}"
    );
    assert_budget(&store, &budget, committed, 0).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Body limit

async fn body_limit_is_enforced<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc =
        ReserveLayer::new(store.clone(), spend_claims(budget.clone())).layer(handler(ctl.clone()));
    let limit = tower_reserve::DEFAULT_BODY_LIMIT;
    assert_eq!(limit, 64 * 1024);

    let big = Bytes::from(vec![b'x'; limit + 1]);
    // Declared by Content-Length.
    let req = Request::post("/")
        .header("x-mode", "echo")
        .header("x-amount", "10")
        .header(http::header::CONTENT_LENGTH, big.len())
        .body(Full::new(big.clone()))
        .unwrap();
    let a = call(svc.clone(), req).await;
    let json = a.problem(413, "Payload too large");
    assert!(json["detail"].as_str().unwrap().contains("65536"), "{json}");
    // Not declared: found while reading.
    let req = Request::post("/")
        .header("x-mode", "echo")
        .header("x-amount", "10")
        .body(Full::new(big))
        .unwrap();
    call(svc.clone(), req)
        .await
        .problem(413, "Payload too large");
    assert_eq!(ctl.calls(), 0, "the handler never ran");
    assert_budget(&store, &budget, 0, 0).await;

    // At and under the limit, the body arrives byte for byte.
    let mut rng = rand::rng();
    for len in [limit, limit - 1, 1000, 0] {
        let mut body = vec![0u8; len];
        rng.fill(&mut body[..]);
        let body = Bytes::from(body);
        let req = Request::post("/")
            .header("x-mode", "echo")
            .header("x-amount", "1")
            .body(Full::new(body.clone()))
            .unwrap();
        let a = call(svc.clone(), req).await;
        assert_eq!(a.status, 200);
        assert!(a.body == body, "the body of {len} bytes changed");
    }
    assert_budget(&store, &budget, 4, 0).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Rejections

async fn over_budget_is_a_403_problem<St: Store>(store: St) {
    let budget = new_budget(100);
    let ctl = Ctl::default();
    let svc =
        ReserveLayer::new(store.clone(), spend_claims(budget.clone())).layer(handler(ctl.clone()));
    assert_eq!(call(svc.clone(), request("ok", 30)).await.status, 200);
    let a = call(svc, request("ok", 150)).await;
    let json = a.problem(403, "Over budget");
    assert_eq!(json["requested"], 150);
    assert_eq!(json["remaining"], 70);
    assert_eq!(ctl.calls(), 1);
    assert_budget(&store, &budget, 30, 0).await;
}

fn name_claims() -> impl ExtractClaims + Clone {
    |req: Request<Bytes>| async move {
        let name = extract::header(&req, "x-name")?.to_owned();
        let owner = extract::header(&req, "x-owner")?.to_owned();
        let name = Unique::new("names", &name).described_as("the header x-name");
        let mut claims = vec![Claim::own(name, owner)];
        if let Some(amount) = req.headers().get("x-amount") {
            let amount: u64 = amount.to_str().unwrap().parse().unwrap();
            let key = extract::header(&req, "x-budget")?.to_owned();
            claims.push(Claim::spend(Budget::new(key, LIMIT), amount));
        }
        Extracted::Ok((req, claims))
    }
}

fn name_request(name: &str, owner: &str) -> Request<Full<Bytes>> {
    Request::post("/")
        .header("x-name", name)
        .header("x-owner", owner)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn taken_unique_is_a_409_problem<St: Store>(store: St) {
    let name = fresh("name");
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), name_claims()).layer(handler(Ctl::default()));
    assert_eq!(
        call(svc.clone(), name_request(&name, "alice")).await.status,
        200
    );
    assert_eq!(
        store
            .owner(&Unique::new("names", &name))
            .await
            .unwrap()
            .as_deref(),
        Some("alice")
    );
    let mut req = name_request(&name, "bob");
    req.headers_mut().insert("x-amount", "10".parse().unwrap());
    req.headers_mut()
        .insert("x-budget", budget.key().parse().unwrap());
    let a = call(svc, req).await;
    let json = a.problem(409, "Already taken");
    // Which value, in the client's own words.
    assert_eq!(json["detail"], "the header x-name is already taken");
    // A denial holds none of the request's claims.
    assert_budget(&store, &budget, 0, 0).await;
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Order {
    amount: u64,
    sku: String,
}

async fn json_extraction_errors<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let b = budget.clone();
    let svc = ReserveLayer::new(store.clone(), move |req: Request<Bytes>| {
        let budget = b.clone();
        async move {
            let amount: u64 = if req.uri().path() == "/typed" {
                extract::json::<Order>(&req)?.amount
            } else {
                extract::json_pointer(&req, "/order/amount")?
            };
            Extracted::Ok((req, vec![Claim::spend(budget, amount)]))
        }
    })
    .layer(handler(ctl.clone()));
    let json_req = |path: &str, content_type: Option<&str>, body: &'static str| {
        let mut b = Request::post(path).header("x-mode", "ok");
        if let Some(ct) = content_type {
            b = b.header(http::header::CONTENT_TYPE, ct);
        }
        b.body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let ct = Some("application/json");
    let cases: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
        (
            json_req("/", None, r#"{"order":{"amount":1}}"#),
            415,
            "Unsupported media type",
        ),
        (
            json_req("/", Some("text/plain"), r#"{"order":{"amount":1}}"#),
            415,
            "Unsupported media type",
        ),
        (json_req("/", ct, r#"{"order":"#), 400, "Bad request"),
        (json_req("/", ct, "not json"), 400, "Bad request"),
        (
            json_req("/", ct, r#"{"order":{}}"#),
            422,
            "Unprocessable content",
        ),
        (
            json_req("/", ct, r#"{"order":{"amount":"7"}}"#),
            422,
            "Unprocessable content",
        ),
        (
            json_req("/", ct, r#"{"order":{"amount":0}}"#),
            422,
            "Unprocessable content",
        ),
        (
            json_req("/typed", ct, r#"{"amount":5}"#),
            422,
            "Unprocessable content",
        ),
        (json_req("/typed", ct, r#"{"amount":"#), 400, "Bad request"),
        (
            json_req("/typed", None, r#"{"amount":5,"sku":"a"}"#),
            415,
            "Unsupported media type",
        ),
    ];
    for (req, status, title) in cases {
        call(svc.clone(), req).await.problem(status, title);
    }
    assert_eq!(ctl.calls(), 0);
    assert_budget(&store, &budget, 0, 0).await;
    // The happy paths, including a +json media type.
    let a = call(
        svc.clone(),
        json_req(
            "/",
            Some("application/vnd.api+json; charset=utf-8"),
            r#"{"order":{"amount":9}}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = call(svc, json_req("/typed", ct, r#"{"amount":11,"sku":"a"}"#)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_budget(&store, &budget, 20, 0).await;
}

async fn custom_validator_reserves_nothing<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .validate(|req: Request<Bytes>| async move {
            if req.headers().contains_key("x-deny") {
                Err(
                    Rejection::new(StatusCode::FORBIDDEN, "Not allowed", "the policy says no")
                        .with("policy", "deny-header"),
                )
            } else {
                Ok(req)
            }
        })
        .layer(handler(ctl.clone()));
    let mut req = request("ok", 50);
    req.headers_mut().insert("x-deny", "1".parse().unwrap());
    let json = call(svc.clone(), req).await.problem(403, "Not allowed");
    assert_eq!(json["policy"], "deny-header");
    assert_eq!(json["detail"], "the policy says no");
    assert_eq!(ctl.calls(), 0);
    assert_budget(&store, &budget, 0, 0).await;
    assert_eq!(call(svc, request("ok", 50)).await.status, 200);
    assert_budget(&store, &budget, 50, 0).await;
}

async fn custom_error_handler_reshapes<St: Store>(store: St) {
    let budget = new_budget(100);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<RejectionKind>::new()));
    let record = seen.clone();
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .error_handler(move |r: Rejection| {
            record.lock().unwrap().push(r.kind().clone());
            Response::builder()
                .status(if r.status() == 403 {
                    402
                } else {
                    r.status().as_u16()
                })
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from(format!("nope: {}", r.title()))))
                .unwrap()
        })
        .layer(handler(Ctl::default()));
    let a = call(svc.clone(), request("ok", 101)).await;
    assert_eq!(a.status, 402);
    assert_eq!(a.headers["content-type"], "text/plain");
    assert_eq!(a.body, "nope: Over budget");
    let mut req = request("ok", 1);
    req.headers_mut()
        .insert("x-amount", "lots".parse().unwrap());
    let a = call(svc, req).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body, "nope: Bad request");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            RejectionKind::OverBudget {
                key: budget.key().to_owned(),
                requested: 101,
                remaining: 100,
                resets_at_ms: None,
            },
            RejectionKind::BadRequest,
        ]
    );
    assert_budget(&store, &budget, 0, 0).await;
}

/// Redis only: a store that cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_store_is_a_503_and_fail_open_lets_budgets_through() {
    let mut server = support::redis_server::RedisServer::start();
    let store = tower_reserve::RedisStore::builder()
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let closed = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .retry_after(7)
        .layer(handler(ctl.clone()));
    let open = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .fail_open(true)
        .layer(handler(ctl.clone()));
    let open_names = ReserveLayer::new(store.clone(), name_claims())
        .fail_open(true)
        .layer(handler(ctl.clone()));
    assert_eq!(call(closed.clone(), request("ok", 1)).await.status, 200);
    server.stop();

    let started = Instant::now();
    let a = call(closed, request("ok", 1)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    a.problem(503, "Reservation store unavailable");
    assert_eq!(a.headers[http::header::RETRY_AFTER], "7");
    assert_eq!(ctl.calls(), 1);

    let a = call(open, request("ok", 1)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(!a.held(), "failing open runs the handler without a hold");
    assert_eq!(ctl.calls(), 2);

    let a = call(open_names, name_request("carol", "carol")).await;
    a.problem(503, "Reservation store unavailable");
    assert_eq!(a.headers[http::header::RETRY_AFTER], "1");
    assert_eq!(ctl.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// 6. Per-route policies

async fn hold_echo(req: axum::extract::Request) -> Response<axum::body::Body> {
    let held = match req.extensions().get::<Hold>() {
        Some(hold) => format!("held {}", hold.claims().len()),
        None => "unheld".to_owned(),
    };
    Response::new(axum::body::Body::from(held))
}

async fn axum_routes_keep_their_own_policies<St: Store>(store: St) {
    let a_budget = new_budget(100);
    let b_budget = new_budget(50);
    let prefix = fresh("acct");
    let p = prefix.clone();
    let per_account = ReserveLayer::new(store.clone(), move |req: Request<Bytes>| {
        let prefix = p.clone();
        async move {
            let id = extract::path_param(&req, "id")?;
            let budget = Budget::new(format!("{prefix}-{id}"), 30);
            Extracted::Ok((req, vec![Claim::spend(budget, 20)]))
        }
    });
    let b_router = axum::Router::new()
        .route("/b", axum::routing::post(hold_echo))
        .route_layer(ReserveLayer::new(
            store.clone(),
            spend_claims(b_budget.clone()),
        ));
    let app = axum::Router::new()
        .route(
            "/a",
            axum::routing::post(hold_echo).layer(ReserveLayer::new(
                store.clone(),
                spend_claims(a_budget.clone()),
            )),
        )
        .route(
            "/acct/{id}/spend",
            axum::routing::post(hold_echo).layer(per_account),
        )
        .route("/free", axum::routing::post(hold_echo))
        .merge(b_router);
    let req = |path: &str, amount: u64| {
        Request::post(path)
            .header("x-amount", amount.to_string())
            .body(axum::body::Body::empty())
            .unwrap()
    };

    let a = call(app.clone(), req("/a", 80)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"held 1"[..]));
    let a = call(app.clone(), req("/b", 80)).await;
    assert_eq!(a.problem(403, "Over budget")["remaining"], 50);
    let a = call(app.clone(), req("/b", 40)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"held 1"[..]));
    let a = call(app.clone(), req("/a", 30)).await;
    assert_eq!(a.problem(403, "Over budget")["remaining"], 20);
    let a = call(app.clone(), req("/free", 1_000_000)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"unheld"[..]));
    // A path parameter from axum's matched path.
    for (account, expect) in [("x", 200), ("x", 403), ("y", 200)] {
        let a = call(app.clone(), req(&format!("/acct/{account}/spend"), 0)).await;
        assert_eq!(a.status.as_u16(), expect, "{account}: {:?}", a.body);
    }
    assert_budget(&store, &a_budget, 80, 0).await;
    assert_budget(&store, &b_budget, 40, 0).await;
    for (account, spent) in [("x", 20), ("y", 20)] {
        let budget = Budget::new(format!("{prefix}-{account}"), 30);
        assert_budget(&store, &budget, spent, 0).await;
    }

    // In a nested router, whose handlers see paths without the prefix, a path parameter is read
    // at its place in that path (the matched path has the prefix).
    let p = prefix.clone();
    let nested = axum::Router::new().route(
        "/acct/{id}/spend",
        axum::routing::post(hold_echo).layer(ReserveLayer::new(
            store.clone(),
            move |req: Request<Bytes>| {
                let prefix = p.clone();
                async move {
                    let id = extract::path_param(&req, "id")?;
                    let budget = Budget::new(format!("{prefix}-nested-{id}"), 30);
                    Extracted::Ok((req, vec![Claim::spend(budget, 20)]))
                }
            },
        )),
    );
    let app = axum::Router::new().nest("/v1/{tenant}", nested);
    for (account, expect) in [("x", 200), ("x", 403), ("y", 200)] {
        let a = call(app.clone(), req(&format!("/v1/t/acct/{account}/spend"), 0)).await;
        assert_eq!(a.status.as_u16(), expect, "{account}: {:?}", a.body);
    }
    for account in ["x", "y"] {
        let budget = Budget::new(format!("{prefix}-nested-{account}"), 30);
        assert_budget(&store, &budget, 20, 0).await;
    }
}

async fn routes_table_keeps_its_own_policies<St: Store>(store: St) {
    let prefix = fresh("cust");
    let other = new_budget(10);
    let p = prefix.clone();
    let routes = Routes::new()
        .route(
            Method::POST,
            "/customers/{customer_id}/purchases",
            move |req: Request<Bytes>| {
                let prefix = p.clone();
                async move {
                    let id = extract::path_param(&req, "customer_id")?;
                    let amount: u64 = extract::query(&req, "amount")?
                        .parse()
                        .map_err(|_| bad("amount"))?;
                    let budget = Budget::new(format!("{prefix}-{id}"), 100);
                    Extracted::Ok((req, vec![Claim::spend(budget, amount)]))
                }
            },
        )
        .route(Method::POST, "/other", spend_claims(other.clone()));
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), routes).layer(handler(ctl.clone()));
    let req = |method: Method, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("x-amount", "10")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let a = call(
        svc.clone(),
        req(Method::POST, "/customers/c1/purchases?amount=60"),
    )
    .await;
    assert!(a.status == 200 && a.held());
    let a = call(
        svc.clone(),
        req(Method::POST, "/customers/c1/purchases?amount=60"),
    )
    .await;
    a.problem(403, "Over budget");
    let a = call(
        svc.clone(),
        req(Method::POST, "/customers/c2/purchases?amount=60"),
    )
    .await;
    assert!(a.status == 200 && a.held());
    let a = call(svc.clone(), req(Method::POST, "/customers/c2/purchases")).await;
    a.problem(400, "Bad request");
    let a = call(svc.clone(), req(Method::POST, "/other")).await;
    assert!(a.status == 200 && a.held());
    let a = call(svc.clone(), req(Method::POST, "/other")).await;
    a.problem(403, "Over budget");
    // No route: unreserved, even with claims-looking headers.
    for (method, uri) in [
        (Method::GET, "/customers/c1/purchases?amount=60"),
        (Method::POST, "/customers//purchases?amount=60"),
        (Method::POST, "/healthz"),
        (Method::POST, "/other/more"),
    ] {
        let a = call(svc.clone(), req(method.clone(), uri)).await;
        assert!(a.status == 200 && !a.held(), "{method} {uri}");
    }
    for (c, spent) in [("c1", 60), ("c2", 60)] {
        let budget = Budget::new(format!("{prefix}-{c}"), 100);
        assert_budget(&store, &budget, spent, 0).await;
    }
    assert_budget(&store, &other, 10, 0).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Idempotency keys

fn keyed(key: &str, mode: &str, amount: u64) -> Request<Full<Bytes>> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .header("x-mode", mode)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(r#"{{"amount":{amount}}}"#))))
        .unwrap()
}

fn json_amount_claims(budget: Budget) -> impl ExtractClaims + Clone {
    move |req: Request<Bytes>| {
        let budget = budget.clone();
        async move {
            let amount: u64 = extract::json_pointer(&req, "/amount")?;
            Extracted::Ok((req, vec![Claim::spend(budget, amount)]))
        }
    }
}

async fn idempotency_keys<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), json_amount_claims(budget.clone()))
        .idempotency(tower_reserve::Idempotency::new())
        .layer(handler(ctl.clone()));
    let key = fresh("key");

    let first = tokio::spawn(call(svc.clone(), keyed(&key, "wait", 100)));
    tokio::time::timeout(Duration::from_secs(5), ctl.started.notified())
        .await
        .expect("the first request runs");
    // In flight: the same request is refused for now, another payload is a reused key.
    let a = call(svc.clone(), keyed(&key, "ok", 100)).await;
    a.problem(409, "Request in flight");
    assert_eq!(a.headers[http::header::RETRY_AFTER], "1");
    call(svc.clone(), keyed(&key, "ok", 55))
        .await
        .problem(422, "Idempotency-Key is already used");
    assert_budget(&store, &budget, 0, 100).await;
    ctl.go.notify_one();
    let a = first.await.unwrap();
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"waited"[..]));
    assert!(!a.headers.contains_key("idempotency-replayed"));
    assert_budget(&store, &budget, 100, 0).await;

    // Done: the same request gets the first response again, nothing runs or is spent again.
    let a = call(svc.clone(), keyed(&key, "ok", 100)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"waited"[..]));
    assert_eq!(a.headers["idempotency-replayed"], "true");
    assert_eq!(a.headers["x-held"], "yes", "its headers too");
    // The key as a Structured Field string is the same key.
    let a = call(svc.clone(), keyed(&format!("\"{key}\""), "ok", 100)).await;
    assert_eq!(a.headers["idempotency-replayed"], "true");
    // Another body under the same key is another request: refused.
    call(svc.clone(), keyed(&key, "ok", 55))
        .await
        .problem(422, "Idempotency-Key is already used");
    assert_eq!(ctl.calls(), 1);
    assert_budget(&store, &budget, 100, 0).await;

    // Another key, or none, is another request.
    assert_eq!(
        call(svc.clone(), keyed(&fresh("key"), "ok", 100))
            .await
            .status,
        200
    );
    let no_key = Request::post("/pay")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"amount":1}"#)))
        .unwrap();
    assert_eq!(call(svc.clone(), no_key).await.status, 200);
    assert_budget(&store, &budget, 201, 0).await;

    // A failure is replayed too: the client learns it failed, and nothing is held.
    let failed = fresh("key");
    let a = call(svc.clone(), keyed(&failed, "bad", 5)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (400, &b"bad"[..]));
    let a = call(svc.clone(), keyed(&failed, "ok", 5)).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (400, &b"bad"[..]));
    assert_eq!(a.headers["idempotency-replayed"], "true");
    // A handler that answered nothing (an error of the inner service) left nothing to replay:
    // the key may be used again.
    let errored = fresh("key");
    assert!(
        svc.clone()
            .oneshot(keyed(&errored, "err", 5))
            .await
            .is_err()
    );
    assert_eq!(
        call(svc.clone(), keyed(&errored, "ok", 5)).await.status,
        200
    );
    // Malformed keys.
    for bad in ["has space", "\"open", ""] {
        call(svc.clone(), keyed(bad, "ok", 1))
            .await
            .problem(400, "Idempotency-Key is not valid");
    }
    assert_budget(&store, &budget, 206, 0).await;
}

async fn idempotency_options<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), json_amount_claims(budget.clone()))
        .idempotency(
            tower_reserve::Idempotency::new()
                .required(true)
                .replay_failures(false)
                .max_body(4)
                .scope(|parts| {
                    parts
                        .headers
                        .get("x-tenant")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                }),
        )
        .layer(handler(ctl.clone()));
    // Required.
    let none = Request::post("/pay")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"amount":1}"#)))
        .unwrap();
    call(svc.clone(), none)
        .await
        .problem(400, "Idempotency-Key is missing");
    // Failures may be retried: the retry runs again.
    let key = fresh("key");
    assert_eq!(call(svc.clone(), keyed(&key, "bad", 5)).await.status, 400);
    assert_eq!(call(svc.clone(), keyed(&key, "ok", 5)).await.status, 200);
    // A response larger than what is kept reaches its client whole; a retry is told it cannot
    // be replayed, with its status.
    let key = fresh("key");
    let a = call(svc.clone(), keyed(&key, "waited-long", 7)).await;
    assert_eq!(
        (a.status.as_u16(), &a.body[..]),
        (200, &b"a body longer than four bytes"[..])
    );
    let a = call(svc.clone(), keyed(&key, "waited-long", 7)).await;
    let json = a.problem(409, "Response not available");
    assert_eq!(json["original_status"], 200);
    // Two callers who pick one key never see each other's responses.
    let key = fresh("key");
    let mut x = keyed(&key, "hold-id", 1);
    x.headers_mut()
        .insert("x-tenant", "tenant-x".parse().unwrap());
    let mut y = keyed(&key, "hold-id", 1);
    y.headers_mut()
        .insert("x-tenant", "tenant-y".parse().unwrap());
    let (x, y) = (call(svc.clone(), x).await, call(svc.clone(), y).await);
    assert_eq!((x.status, y.status), (StatusCode::OK, StatusCode::OK));
    assert_ne!(x.body, y.body, "two requests, two holds");
    assert!(!y.headers.contains_key("idempotency-replayed"));
    assert_budget(&store, &budget, 14, 0).await;
}

async fn racing_sends_of_one_key_run_once<St: Store>(store: St) {
    // 50 sends of one request with one key at once: one runs and is charged; every answer is
    // either 409 (in flight) or that one response, replayed.
    let budget = new_budget(LIMIT);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), json_amount_claims(budget.clone()))
        .idempotency(tower_reserve::Idempotency::new())
        .layer(handler(ctl.clone()));
    let key = fresh("key");
    let answers: Vec<Answer> = futures_util::future::join_all(
        (0..50).map(|_| call(svc.clone(), keyed(&key, "hold-id", 30))),
    )
    .await;
    assert_eq!(ctl.calls(), 1);
    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert!(!ok.is_empty());
    assert!(ok.iter().all(|a| a.body == ok[0].body), "one response");
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 409));
    // After it ended, every retry gets that response.
    let again = call(svc, keyed(&key, "hold-id", 30)).await;
    assert_eq!(again.body, ok[0].body);
    assert_budget(&store, &budget, 30, 0).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Tracing: each request in a span of its own, with its hold id; unique values digested

#[tokio::test(flavor = "current_thread")]
async fn requests_are_traced_with_their_hold_and_no_raw_values() {
    let (logs, _capturing) = support::capture_logs();

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

    let logs = logs.text();
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

/// The route's pattern is a field of the request's span; denials can be logged at `INFO`, with
/// the route and without the claims, rather than at `DEBUG` in the span.
#[tokio::test(flavor = "current_thread")]
async fn denials_are_logged_with_their_route_at_the_level_asked() {
    let budget = new_budget(10);
    let routes = |budget: &Budget| {
        Routes::new().route(
            http::Method::POST,
            "/teams/{team}/completions",
            spend_claims(budget.clone()),
        )
    };
    let over = || {
        let mut req = request("ok", 11);
        *req.uri_mut() = "/teams/t-7/completions".parse().unwrap();
        req
    };

    let (logs, capturing) = support::capture_logs_at(tracing::Level::INFO);
    let quiet = ReserveLayer::new(tower_reserve::MemoryStore::new(), routes(&budget))
        .layer(handler(Ctl::default()));
    assert_eq!(call(quiet, over()).await.status, 403);
    assert!(
        !logs.text().contains("denied"),
        "at DEBUG by default: {}",
        logs.text()
    );
    let told = ReserveLayer::new(tower_reserve::MemoryStore::new(), routes(&budget))
        .log_denials(tracing::Level::INFO)
        .layer(handler(Ctl::default()));
    assert_eq!(call(told, over()).await.status, 403);
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("denied"))
        .unwrap_or_else(|| panic!("a denial at INFO: {text}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains(r#"route="/teams/{team}/completions""#),
        "{line}"
    );
    assert!(line.contains("reason=\"over_budget\""), "{line}");
    assert!(
        !line.contains(budget.key()),
        "no budget key at INFO: {line}"
    );
    drop(capturing);

    // At DEBUG, the request's span names the route.
    let (logs, _capturing) = support::capture_logs();
    let svc = ReserveLayer::new(tower_reserve::MemoryStore::new(), routes(&budget))
        .layer(handler(Ctl::default()));
    assert_eq!(call(svc, over()).await.status, 403);
    let text = logs.text();
    assert!(
        text.contains(
            r#"reserve{method=POST path="/teams/t-7/completions" route="/teams/{team}/completions""#
        ),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Actual amounts, remaining headers, shadow mode, retention

fn actual_request(mode: &str, amount: u64, actual: &str) -> Request<Full<Bytes>> {
    let mut req = request(mode, amount);
    req.headers_mut()
        .insert("x-actual", actual.parse().unwrap());
    req
}

async fn actual_amounts_commit_what_was_used<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    // Each holds 300 and spends less; the rest goes back in the same step.
    for (mode, used) in [
        ("actual-hold", 120),
        ("actual-ext", 45),
        ("actual-header", 0),
    ] {
        let spent_before = store.budget(&budget).await.unwrap().spent;
        let a = call(svc.clone(), actual_request(mode, 300, &used.to_string())).await;
        assert_eq!(a.status, 200, "{mode}: {:?}", a.body);
        if mode == "actual-hold" {
            // What the handler said would be left is what is left once it committed.
            let left = LIMIT - spent_before - used;
            assert_eq!(a.body, format!("used less; {left} left"));
            assert_budget(&store, &budget, spent_before + used, 0).await;
        }
        assert!(
            !a.headers.contains_key(tower_reserve::ACTUAL_HEADER),
            "the report never leaves"
        );
    }
    assert_budget(&store, &budget, 165, 0).await;
    // Above what was held, in the hold itself: refused at once with a typed error (here the
    // handler passes it on as its own error, which releases).
    let err = svc
        .oneshot(actual_request("actual-hold", 100, "101"))
        .await
        .expect_err("the handler's error");
    let err = err
        .downcast::<tower_reserve::Error>()
        .expect("a tower_reserve::Error");
    assert_eq!(err.kind(), tower_reserve::ErrorKind::ExceedsHold);
    assert_budget(&store, &budget, 165, 0).await;
}

async fn bad_actual_reports_release_the_hold<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    for bad in ["301", "12, 13", "-4", "lots"] {
        let a = call(svc.clone(), actual_request("actual-header", 300, bad)).await;
        a.problem(500, "Invalid actual amount");
        assert!(!a.headers.contains_key(tower_reserve::ACTUAL_HEADER));
        assert_budget(&store, &budget, 0, 0).await;
    }
    let a = call(svc, actual_request("actual-ext", 300, "400")).await;
    a.problem(500, "Invalid actual amount");
    assert_budget(&store, &budget, 0, 0).await;
}

async fn remaining_headers_tell_what_is_left<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let key = budget.key().to_owned();
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .remaining_headers(true)
        .layer(handler(Ctl::default()));
    let a = call(svc.clone(), actual_request("actual-header", 300, "100")).await;
    assert_eq!(a.status, 200);
    // Named after the route (none here: "budget"), the key only as a digest (`pk`).
    let policy = a.headers["ratelimit-policy"].to_str().unwrap().to_owned();
    let pk = policy
        .split_once(";pk=")
        .map(|(_, pk)| pk.to_owned())
        .expect("a partition key");
    assert_eq!(policy, format!("\"budget\";q={LIMIT};qu=\"units\";pk={pk}"));
    assert!(pk.starts_with(':') && pk.ends_with(':') && !pk.contains(&key));
    assert_eq!(
        a.headers["ratelimit"],
        format!("\"budget\";r=900;pk={pk}").as_str()
    );
    // A release gives everything back, and says so.
    let a = call(svc.clone(), request("bad", 500)).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.headers["ratelimit"],
        format!("\"budget\";r=900;pk={pk}").as_str()
    );
    // Off by default.
    let plain = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    assert!(
        !call(plain, request("ok", 1))
            .await
            .headers
            .contains_key("ratelimit")
    );
    assert_budget(&store, &budget, 101, 0).await;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn over_a_window_the_answer_can_be_429_with_retry_after<St: Store>(store: St) {
    const HOUR_MS: u64 = 3_600_000;
    let hourly = Budget::new(fresh("budget"), 100).per(Window::Every(Duration::from_secs(3600)));
    let lifetime = new_budget(100);
    let layer = |budget: &Budget| {
        ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
            .too_many_requests(true)
            .remaining_headers(true)
            .layer(handler(Ctl::default()))
    };
    let svc = layer(&hourly);
    assert_eq!(call(svc.clone(), request("ok", 100)).await.status, 200);
    // The seconds left in the hour, read before and after the refusal.
    let left = |now: u64| ((now / HOUR_MS + 1) * HOUR_MS - now).div_ceil(1000);
    let before = left(unix_ms());
    let a = call(svc.clone(), request("ok", 1)).await;
    let after = left(unix_ms());
    let json = a.problem(429, "Over budget");
    assert_eq!(
        (json["requested"].as_u64(), json["remaining"].as_u64()),
        (Some(1), Some(0))
    );
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (after.min(before)..=before.max(after)).contains(&retry),
        "Retry-After {retry}, the hour ends in {before} to {after} s"
    );
    // The budget that refused, in the remaining fields: nothing left, back in `t` seconds.
    let pk = a.headers["ratelimit-policy"]
        .to_str()
        .unwrap()
        .split_once(";pk=")
        .map(|(_, pk)| pk.to_owned())
        .expect("a partition key");
    assert_eq!(
        a.headers["ratelimit-policy"],
        format!("\"budget\";q=100;qu=\"units\";w=3600;pk={pk}").as_str()
    );
    assert_eq!(
        a.headers["ratelimit"],
        format!("\"budget\";r=0;t={retry};pk={pk}").as_str()
    );
    assert_budget(&store, &hourly, 100, 0).await;

    // A lifetime budget never resets: 403, no Retry-After, its remaining fields all the same.
    let svc = layer(&lifetime);
    assert_eq!(call(svc.clone(), request("ok", 60)).await.status, 200);
    let a = call(svc, request("ok", 41)).await;
    a.problem(403, "Over budget");
    assert!(!a.headers.contains_key("retry-after"));
    assert!(
        a.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"budget\";r=40;pk=")
    );

    // Off by default: over the hour is 403, and says nothing of when.
    let plain = ReserveLayer::new(store.clone(), spend_claims(hourly.clone()))
        .layer(handler(Ctl::default()));
    let a = call(plain, request("ok", 1)).await;
    a.problem(403, "Over budget");
    assert!(!a.headers.contains_key("retry-after"));
    assert!(!a.headers.contains_key("ratelimit"));
}

async fn shadow_mode_holds_nothing_and_lets_all_through<St: Store>(store: St) {
    let budget = new_budget(100);
    let ctl = Ctl::default();
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .shadow(true)
        .layer(handler(ctl.clone()));
    // Within the limit and far above it: both go through, the handler sees no hold.
    for amount in [50, 5_000] {
        let a = call(svc.clone(), request("ok", amount)).await;
        assert_eq!(a.status, 200);
        assert!(!a.held());
    }
    assert_eq!(ctl.calls(), 2);
    assert_budget(&store, &budget, 0, 0).await;
    // A request whose claims cannot be read is still refused.
    let mut bad = request("ok", 1);
    bad.headers_mut()
        .insert("x-amount", "many".parse().unwrap());
    assert_eq!(call(svc, bad).await.status, 400);
}

async fn the_layer_forgets_the_holds_it_named<St: Store>(store: St) {
    let budget = new_budget(LIMIT);
    let svc = ReserveLayer::new(store.clone(), spend_claims(budget.clone()))
        .layer(handler(Ctl::default()));
    // `echo` answers the hold's id: the layer generated it, so nobody else can know it, and its
    // record goes as soon as the layer settles it.
    let mut req = request("hold-id", 10);
    req.headers_mut()
        .insert("x-mode", "hold-id".parse().unwrap());
    let a = call(svc.clone(), req).await;
    assert_eq!(a.status, 200);
    let id = HoldId::new(String::from_utf8(a.body.to_vec()).unwrap()).unwrap();
    assert_eq!(
        store.commit(&id).await.unwrap_err().kind(),
        tower_reserve::ErrorKind::UnknownHold,
        "its record is gone"
    );
    // A deferred hold keeps its record: it is settled later by id, and a retry is answered.
    let a = call(svc, request("defer", 20)).await;
    let id = HoldId::new(String::from_utf8(a.body.to_vec()).unwrap()).unwrap();
    store.commit(&id).await.unwrap();
    assert_eq!(
        store.commit(&id).await.unwrap(),
        tower_reserve::Settled::Replayed
    );
    assert_budget(&store, &budget, 30, 0).await;
}
