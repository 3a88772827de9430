//! Settle: the handle a handler sees, and the guard that releases a hold on every path the
//! layer does not settle itself (a panic, a dropped future).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::BoxFuture;
use super::metrics::{Op, RouteMetrics, Settling};
use crate::settlement::same_budget;
use crate::store::embedded;
use crate::{Budget, Claim, Error, ErrorKind, Grant, HoldId, Settled, Settlement, Store};

/// A store seen only through what settling needs, so that [`Hold`] is one type whatever the
/// store.
pub(crate) trait SettleStore: Send + Sync + 'static {
    fn settle(&self, id: HoldId, settlement: Settlement) -> BoxFuture<Result<Settled, Error>>;
    /// The settlement made in place by a store that never waits ([`embedded`]); `None` from one
    /// that does, whose future [`SettleStore::settle`] gives.
    fn settle_now(&self, id: &HoldId, settlement: &Settlement) -> Option<Result<Settled, Error>>;
    fn extend(&self, id: HoldId, lease: Duration) -> BoxFuture<Result<u64, Error>>;
}

impl<St: Store> SettleStore for St {
    fn settle(&self, id: HoldId, settlement: Settlement) -> BoxFuture<Result<Settled, Error>> {
        let store = self.clone();
        Box::pin(async move { Store::settle(&store, &id, &settlement).await })
    }

    fn settle_now(&self, id: &HoldId, settlement: &Settlement) -> Option<Result<Settled, Error>> {
        embedded(self).map(|memory| memory.settle_sync(id, settlement))
    }

    fn extend(&self, id: HoldId, lease: Duration) -> BoxFuture<Result<u64, Error>> {
        let store = self.clone();
        Box::pin(async move { Store::extend(&store, &id, lease).await })
    }
}

/// The hold a request runs under, in the request's extensions (and an axum extractor with the
/// `axum` feature).
///
/// It tells the handler what was reserved and lets it steer settlement: [`Hold::set_actual`] to
/// commit what the command really used rather than all that was held, [`Hold::defer`] to take
/// over (answer `202 Accepted`, then commit or release later by id), [`Hold::extend`] to renew
/// the lease of a long handler.
///
/// ```
/// use http::{Request, Response};
/// use tower_reserve::{Budget, Hold};
///
/// async fn handler(req: Request<()>) -> Response<String> {
///     let hold = req.extensions().get::<Hold>().expect("behind ReserveLayer").clone();
///     let budget = Budget::new("api-key-7", 1_000_000);
///     let left = hold.remaining_of(&budget).unwrap_or(0);
///     // The job reserved the most it may cost; it used 1 234 credits.
///     hold.set_actual(&budget, 1_234).expect("at most what was held");
///     Response::new(format!("hold {}, {left} left", hold.id()))
/// }
/// ```
#[derive(Clone)]
pub struct Hold {
    inner: Arc<HoldInner>,
}

struct HoldInner {
    id: HoldId,
    claims: Vec<Claim>,
    remaining: Vec<Option<u64>>,
    expires_at_ms: AtomicU64,
    deferred: AtomicBool,
    /// Whether the id is the caller's (an idempotency key): then its record is kept after the
    /// layer settles it, so that a retry gets the same answer. The layer's own random ids are
    /// forgotten at once: nobody can ask for them again.
    named: bool,
    /// Actual amounts the handler reported, by budget.
    actual: Mutex<Vec<(Budget, u64)>>,
    /// The route's metrics.
    metrics: Arc<RouteMetrics>,
    store: Arc<dyn SettleStore>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("id", &self.inner.id)
            .field("remaining", &self.inner.remaining)
            .field("expires_at_ms", &self.expires_at_ms())
            .field("deferred", &self.is_deferred())
            .finish()
    }
}

impl Hold {
    pub(crate) fn new(
        grant: Grant,
        claims: Vec<Claim>,
        named: bool,
        metrics: Arc<RouteMetrics>,
        store: Arc<dyn SettleStore>,
    ) -> Self {
        Self {
            inner: Arc::new(HoldInner {
                id: grant.id,
                claims,
                remaining: grant.remaining,
                expires_at_ms: AtomicU64::new(grant.expires_at_ms),
                deferred: AtomicBool::new(false),
                named,
                actual: Mutex::default(),
                metrics,
                store,
            }),
        }
    }

    /// The hold's id.
    pub fn id(&self) -> &HoldId {
        &self.inner.id
    }

    /// The claims held, in order.
    pub fn claims(&self) -> &[Claim] {
        &self.inner.claims
    }

    /// For each claim in order: the budget left after this hold (spend claims), or `None`.
    pub fn remaining(&self) -> &[Option<u64>] {
        &self.inner.remaining
    }

    /// What `budget` had left once this hold was placed, if the hold spends from it.
    pub fn remaining_of(&self, budget: &Budget) -> Option<u64> {
        self.spend_index(budget)
            .and_then(|i| self.inner.remaining[i])
    }

    /// What `budget` will have left once this hold commits, if the hold spends from it: what it
    /// had left once the hold was placed ([`Hold::remaining_of`]) and what the commit gives back
    /// of the amount held, the actual amount set with [`Hold::set_actual`] being spent (all that
    /// was held, if none was set). For the handler's answer (`"remaining": ...`) before the layer
    /// commits; like `remaining_of`, it is as of the reserve: what other requests spent or held
    /// since is not in it.
    ///
    /// ```
    /// use http::{Request, Response};
    /// use tower_reserve::{Budget, Hold};
    ///
    /// async fn handler(req: Request<()>) -> Response<String> {
    ///     let hold = req.extensions().get::<Hold>().expect("behind ReserveLayer").clone();
    ///     let tokens = Budget::new("team-7", 1_000_000);
    ///     // Reserved max_tokens; the completion used 1 234 of them.
    ///     hold.set_actual(&tokens, 1_234).expect("at most what was held");
    ///     let left = hold.remaining_after_commit(&tokens).unwrap_or(0);
    ///     Response::new(format!(r#"{{"tokens_left": {left}}}"#))
    /// }
    /// ```
    pub fn remaining_after_commit(&self, budget: &Budget) -> Option<u64> {
        let i = self.spend_index(budget)?;
        let actual = self
            .inner
            .actual
            .lock()
            .expect("actual amounts lock")
            .iter()
            .find(|(b, _)| same_budget(b, budget))
            .map(|(_, amount)| *amount);
        self.remaining_after(i, actual)
    }

    /// What the budget of claim `i` has left once this hold settles with `spent` of it (`None`:
    /// all it holds): the rest of what it holds goes back.
    pub(crate) fn remaining_after(&self, i: usize, spent: Option<u64>) -> Option<u64> {
        let (Claim::Spend { budget, amount }, Some(left)) =
            (&self.inner.claims[i], self.inner.remaining[i])
        else {
            return None;
        };
        let spent = spent.unwrap_or(*amount).min(*amount);
        Some((left + (amount - spent)).min(budget.limit()))
    }

    /// The budgets this hold spends from, with the amounts held, in claim order.
    pub fn budgets(&self) -> impl Iterator<Item = (&Budget, u64)> {
        self.inner.claims.iter().filter_map(|c| match c {
            Claim::Spend { budget, amount } => Some((budget, *amount)),
            _ => None,
        })
    }

    fn spend_index(&self, budget: &Budget) -> Option<usize> {
        self.inner
            .claims
            .iter()
            .position(|c| matches!(c, Claim::Spend { budget: b, .. } if same_budget(b, budget)))
    }

    /// The route's label (its pattern, or `unmatched`), as the metrics have it.
    pub(crate) fn route(&self) -> &str {
        self.inner.metrics.route()
    }

    /// When the lease ends, in Unix milliseconds by the store's clock.
    pub fn expires_at_ms(&self) -> u64 {
        self.inner.expires_at_ms.load(Ordering::Acquire)
    }

    /// Commits only `amount` of this hold's claim on `budget` when the hold is committed (by the
    /// layer, or by [`Hold::commit`]): what the command really used. The rest goes back in the
    /// same step; `0` spends nothing of that budget. Refused at once, and nothing recorded, when
    /// the hold does not spend from `budget`
    /// ([`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput)) or `amount` is above what it
    /// holds there ([`ErrorKind::ExceedsHold`](crate::ErrorKind::ExceedsHold)): a command that
    /// needs more reserves the difference as a hold of its own.
    pub fn set_actual(&self, budget: &Budget, amount: u64) -> Result<(), Error> {
        let Some(i) = self.spend_index(budget) else {
            return Err(Error::invalid(format!(
                "hold {} does not spend from budget {:?}",
                self.id(),
                budget.key()
            )));
        };
        let Claim::Spend { amount: held, .. } = self.inner.claims[i] else {
            unreachable!("spend_index finds spend claims");
        };
        if amount > held {
            return Err(Error::refused(ErrorKind::ExceedsHold, self.id()));
        }
        let mut actual = self.inner.actual.lock().expect("actual amounts lock");
        actual.retain(|(b, _)| !same_budget(b, budget));
        actual.push((budget.clone(), amount));
        Ok(())
    }

    /// Takes settlement over from the layer: whatever the handler answers, the layer neither
    /// commits nor releases. Commit or release later with [`Hold::commit`] / [`Hold::release`]
    /// (or the store, by id) before the lease ends; past it the hold gives itself back.
    pub fn defer(&self) -> Hold {
        self.inner.deferred.store(true, Ordering::Release);
        self.clone()
    }

    /// Whether [`Hold::defer`] was called.
    pub fn is_deferred(&self) -> bool {
        self.inner.deferred.load(Ordering::Acquire)
    }

    /// Renews the lease to `lease` from now. The layer's bound on the handler's time moves with
    /// it.
    pub async fn extend(&self, lease: Duration) -> Result<u64, Error> {
        let until = self.inner.store.extend(self.id().clone(), lease).await?;
        self.inner.expires_at_ms.store(until, Ordering::Release);
        Ok(until)
    }

    /// Commits the hold now, with the actual amounts set so far (idempotent).
    pub async fn commit(&self) -> Result<Settled, Error> {
        let settlement = self.with_actual(Settlement::commit());
        self.inner.store.settle(self.id().clone(), settlement).await
    }

    /// Releases the hold now (idempotent).
    pub async fn release(&self) -> Result<Settled, Error> {
        self.inner
            .store
            .settle(self.id().clone(), Settlement::release())
            .await
    }

    /// `settlement` with the actual amounts the handler set.
    pub(crate) fn with_actual(&self, mut settlement: Settlement) -> Settlement {
        if settlement.is_commit() {
            for (budget, amount) in self
                .inner
                .actual
                .lock()
                .expect("actual amounts lock")
                .iter()
            {
                settlement = settlement.actual(budget, *amount);
            }
        }
        settlement
    }

    /// How the layer settles this hold: its record is forgotten unless the id is the caller's or
    /// the handler deferred (then someone may ask for it again).
    pub(crate) fn settlement(&self, commit: bool) -> Settlement {
        self.settlement_with(commit, &[])
    }

    /// As [`Hold::settlement`], with actual amounts reported in the response (`reported`), which
    /// take the place of any the handler set on the hold for the same budget.
    pub(crate) fn settlement_with(&self, commit: bool, reported: &[(Budget, u64)]) -> Settlement {
        let mut settlement = if commit {
            let set = self.inner.actual.lock().expect("actual amounts lock");
            let mut settlement = Settlement::commit();
            for (budget, amount) in set.iter() {
                if !reported.iter().any(|(b, _)| same_budget(b, budget)) {
                    settlement = settlement.actual(budget, *amount);
                }
            }
            for (budget, amount) in reported {
                settlement = settlement.actual(budget, *amount);
            }
            settlement
        } else {
            Settlement::release()
        };
        // Who can ask for this hold again: the caller, by a deferred hold's id; a retry with the
        // idempotency key that names it, after a commit (a key's response is kept by the
        // capture that settles it). A release of a named hold with no response to keep leaves
        // nothing to replay: its key may be used again.
        let kept = self.is_deferred() || (commit && self.inner.named);
        if !kept {
            settlement = settlement.forget();
        }
        settlement
    }

    /// Whether the hold's id is the caller's (an idempotency key).
    pub(crate) fn is_named(&self) -> bool {
        self.inner.named
    }

    /// Resolves what a response reported (an [`Actual`] or the actual-amount header's values) to
    /// budgets of this hold, checked like [`Hold::set_actual`].
    pub(crate) fn resolve(&self, report: &Actual) -> Result<Vec<(Budget, u64)>, Error> {
        let budgets: Vec<(&Budget, u64)> = self.budgets().collect();
        let mut out = Vec::with_capacity(report.amounts.len());
        for (i, (budget, amount)) in report.amounts.iter().enumerate() {
            let (budget, held) = match budget {
                Some(budget) => {
                    let Some((b, held)) = budgets.iter().find(|(b, _)| same_budget(b, budget))
                    else {
                        return Err(Error::invalid(format!(
                            "an actual amount names budget {:?}, which hold {} does not spend from",
                            budget.key(),
                            self.id()
                        )));
                    };
                    (*b, *held)
                }
                // Unnamed amounts go to the budget claims in order; they must match in number.
                None if report.amounts.len() == budgets.len() => budgets[i],
                None => {
                    return Err(Error::invalid(format!(
                        "{} actual amounts for the {} budget claims of hold {}",
                        report.amounts.len(),
                        budgets.len(),
                        self.id()
                    )));
                }
            };
            if *amount > held {
                return Err(Error::refused(ErrorKind::ExceedsHold, self.id()));
            }
            out.push((budget.clone(), *amount));
        }
        Ok(out)
    }

    pub(crate) fn settle_task(&self, settlement: Settlement) -> BoxFuture<Result<Settled, Error>> {
        self.inner.store.settle(self.id().clone(), settlement)
    }
}

/// What a command actually used of the budgets its hold spends from, reported in its response:
/// the layer commits these amounts instead of all that was held (the rest goes back in the same
/// step). For a service behind the layer that reports without touching the [`Hold`]; a service in
/// another language (behind a gateway) sends the [`ACTUAL_HEADER`] response header instead, which
/// the layer reads and strips.
///
/// ```
/// use http::Response;
/// use tower_reserve::{Actual, Budget};
///
/// let mut response = Response::new("done");
/// // The request's one budget claim: 1 234 of what was held.
/// response.extensions_mut().insert(Actual::amount(1_234));
/// // Or by budget, for a hold with several.
/// let credits = Budget::new("api-key-7", 1_000_000);
/// response.extensions_mut().insert(Actual::new().of(&credits, 1_234));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    /// By budget; `None` for amounts given in the order of the hold's budget claims.
    amounts: Vec<(Option<Budget>, u64)>,
}

/// The response header that reports actual amounts: one non-negative integer per budget claim
/// of the hold, in claim order, separated by commas (one integer for the usual one budget). The
/// layer strips it before the response leaves.
pub const ACTUAL_HEADER: &str = "reserve-actual";

impl Actual {
    /// Nothing reported yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `amount` of the hold's only budget claim.
    pub fn amount(amount: u64) -> Self {
        Self {
            amounts: vec![(None, amount)],
        }
    }

    /// `amount` of `budget`.
    pub fn of(mut self, budget: &Budget, amount: u64) -> Self {
        self.amounts.push((Some(budget.clone()), amount));
        self
    }

    /// The header's value: integers, one per budget claim in order.
    pub(crate) fn parse_header(value: &http::HeaderValue) -> Option<Self> {
        let text = value.to_str().ok()?;
        let amounts = text
            .split(',')
            .map(|part| part.trim().parse::<u64>().ok().map(|a| (None, a)))
            .collect::<Option<Vec<_>>>()?;
        (!amounts.is_empty()).then_some(Self { amounts })
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Hold {
    type Rejection = super::Rejection;

    /// A `500` when the request has no hold: the route is not behind a `ReserveLayer` that
    /// reserved claims (the server's mistake; the cause goes to the logs, not to the client).
    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Hold>().cloned().ok_or_else(|| {
            tracing::error!(
                path = parts.uri.path(),
                "no hold: the route is not behind a ReserveLayer that reserved claims"
            );
            super::Rejection::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error",
                "the request could not be completed",
            )
        })
    }
}

/// `Option<Hold>`: `None` on a request the layer reserved nothing for (no claims, shadow mode,
/// failing open), so that a handler that serves both says so in its signature rather than
/// finding out at run time.
#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for Hold {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Hold>().cloned())
    }
}

/// A commit or release of a hold. Polled in place by the response future, so the response
/// waits for it without a task switch; if the response future is dropped first (the client
/// went away mid-commit), the rest runs to completion in a task of its own. A store that never
/// waits settles at once, when this is made.
pub(crate) struct Settle {
    progress: Progress,
    hold: Hold,
    commit: bool,
    /// Why the layer settles this way, for the metrics.
    cause: Cause,
    started: std::time::Instant,
    /// Whether the outcome is logged with its timing.
    timed: bool,
}

/// How far a [`Settle`] has come.
enum Progress {
    /// On its way to the store.
    Sent(BoxFuture<Result<Settled, Error>>),
    /// The store's answer, settled in place, not yet taken.
    Answered(Result<Settled, Error>),
    /// Answered, and the answer taken (and recorded).
    Taken,
}

/// Why a hold is settled the way it is: a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The handler succeeded (commit).
    Success,
    /// The handler answered an error response.
    ErrorResponse,
    /// The inner service answered `Err`.
    HandlerError,
    /// The handler panicked.
    Panic,
    /// The request went away.
    Dropped,
    /// The handler outlived its lease.
    Lease,
    /// The handler reported actual amounts that do not fit its hold.
    InvalidActual,
}

impl Cause {
    /// Every cause, in declaration order (`cause as usize` indexes this).
    pub(crate) const ALL: [Cause; 7] = [
        Cause::Success,
        Cause::ErrorResponse,
        Cause::HandlerError,
        Cause::Panic,
        Cause::Dropped,
        Cause::Lease,
        Cause::InvalidActual,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Cause::Success => "success",
            Cause::ErrorResponse => "error_response",
            Cause::HandlerError => "handler_error",
            Cause::Panic => "panic",
            Cause::Dropped => "dropped",
            Cause::Lease => "lease",
            Cause::InvalidActual => "invalid_actual",
        }
    }
}

impl Settle {
    /// `timed`: whether the request is traced, so the settlement's timing is worth logging.
    pub(crate) fn new(hold: &Hold, settlement: Settlement, cause: Cause, timed: bool) -> Self {
        let commit = settlement.is_commit();
        let started = std::time::Instant::now();
        let progress = match hold.inner.store.settle_now(hold.id(), &settlement) {
            Some(answer) => Progress::Answered(answer),
            None => Progress::Sent(hold.settle_task(settlement)),
        };
        Self {
            progress,
            hold: hold.clone(),
            commit,
            cause,
            started,
            timed,
        }
    }

    /// The layer's own settlement of `hold`.
    pub(crate) fn layer(hold: &Hold, commit: bool, cause: Cause, timed: bool) -> Self {
        Self::new(hold, hold.settlement(commit), cause, timed)
    }

    /// Whether this settles by committing.
    pub(crate) fn commits(&self) -> bool {
        self.commit
    }

    /// Lets the settlement finish on its own (in a task, unless it is made already), for when
    /// nobody waits for its answer.
    pub(crate) fn detach(self) {
        drop(self);
    }
}

/// Logs and counts how a settlement went.
fn record(
    hold: &Hold,
    commit: bool,
    cause: Cause,
    started: std::time::Instant,
    timed: bool,
    result: &Result<Settled, Error>,
) {
    let took = started.elapsed();
    let metrics = &hold.inner.metrics;
    let op = if commit { Op::Commit } else { Op::Release };
    metrics.store_call(op, took, result.is_ok());
    let outcome = match result {
        Ok(_) if commit => Settling::Committed,
        Ok(_) => Settling::Released,
        Err(err) if err.is_expired() => Settling::Expired,
        Err(_) => Settling::Failed,
    };
    metrics.settlement(outcome, cause);
    let elapsed_us = timed.then_some(took.as_micros() as u64);
    match result {
        Ok(settled) => {
            tracing::debug!(hold = %hold.id(), commit, ?settled, elapsed_us, "settled")
        }
        Err(err) => {
            tracing::error!(hold = %hold.id(), route = hold.route(), commit, error = %err, elapsed_us, "settling failed")
        }
    }
}

impl Future for Settle {
    type Output = Result<Settled, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let result = match std::mem::replace(&mut self.progress, Progress::Taken) {
            Progress::Answered(result) => result,
            Progress::Sent(mut task) => match task.as_mut().poll(cx) {
                std::task::Poll::Ready(result) => result,
                std::task::Poll::Pending => {
                    self.progress = Progress::Sent(task);
                    return std::task::Poll::Pending;
                }
            },
            Progress::Taken => panic!("Settle polled after completion"),
        };
        record(
            &self.hold,
            self.commit,
            self.cause,
            self.started,
            self.timed,
            &result,
        );
        std::task::Poll::Ready(result)
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.progress, Progress::Taken) {
            Progress::Taken => {}
            Progress::Answered(result) => record(
                &self.hold,
                self.commit,
                self.cause,
                self.started,
                self.timed,
                &result,
            ),
            Progress::Sent(task) if tokio::runtime::Handle::try_current().is_ok() => {
                use tracing::Instrument;
                let (hold, commit, cause, started, timed) = (
                    self.hold.clone(),
                    self.commit,
                    self.cause,
                    self.started,
                    self.timed,
                );
                let finish =
                    async move { record(&hold, commit, cause, started, timed, &task.await) };
                tokio::spawn(finish.instrument(tracing::Span::current()));
            }
            Progress::Sent(_) => {
                tracing::warn!(hold = %self.hold.id(), "no tokio runtime to settle on; the hold ends with its lease");
            }
        }
    }
}

/// Releases the hold when dropped, unless [`SettleGuard::disarm`] was called: the path of a
/// panic, a client that went away, an outer timeout.
pub(crate) struct SettleGuard {
    hold: Option<Hold>,
}

impl SettleGuard {
    pub(crate) fn new(hold: Hold) -> Self {
        Self { hold: Some(hold) }
    }

    pub(crate) fn none() -> Self {
        Self { hold: None }
    }

    pub(crate) fn hold(&self) -> Option<&Hold> {
        self.hold.as_ref()
    }

    pub(crate) fn disarm(&mut self) -> Option<Hold> {
        self.hold.take()
    }
}

impl Drop for SettleGuard {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        if hold.is_deferred() {
            return;
        }
        let cause = if std::thread::panicking() {
            Cause::Panic
        } else {
            Cause::Dropped
        };
        tracing::debug!(hold = %hold.id(), ?cause, "request ended before it settled; releasing");
        // A settlement dropped unfinished goes on in a task of its own (a store that never
        // waits has made it already).
        drop(Settle::layer(&hold, false, cause, false));
    }
}
