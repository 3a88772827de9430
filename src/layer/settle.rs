//! Settle: the handle a handler sees, and the guard that releases a hold on every path the
//! layer does not settle itself (a panic, a dropped future).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::{Claim, Error, Grant, HoldId, Settled, Store};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A store seen only through what settling needs, so that [`Hold`] is one type whatever the
/// store.
pub(crate) trait SettleStore: Send + Sync + 'static {
    fn commit(&self, id: HoldId) -> BoxFuture<Result<Settled, Error>>;
    fn release(&self, id: HoldId) -> BoxFuture<Result<Settled, Error>>;
    fn extend(&self, id: HoldId, lease: Duration) -> BoxFuture<Result<u64, Error>>;
}

impl<St: Store> SettleStore for St {
    fn commit(&self, id: HoldId) -> BoxFuture<Result<Settled, Error>> {
        let store = self.clone();
        Box::pin(async move { Store::commit(&store, &id).await })
    }

    fn release(&self, id: HoldId) -> BoxFuture<Result<Settled, Error>> {
        let store = self.clone();
        Box::pin(async move { Store::release(&store, &id).await })
    }

    fn extend(&self, id: HoldId, lease: Duration) -> BoxFuture<Result<u64, Error>> {
        let store = self.clone();
        Box::pin(async move { Store::extend(&store, &id, lease).await })
    }
}

/// The hold a request runs under, in the request's extensions (and an axum extractor with the
/// `axum` feature).
///
/// It tells the handler what was reserved and lets it steer settlement: [`Hold::defer`] to take
/// over (answer `202 Accepted`, then commit or release later by id), [`Hold::extend`] to renew
/// the lease of a long handler.
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use tower_reserve::Hold;
///
/// async fn handler(req: Request<()>) -> Response<String> {
///     let hold = req.extensions().get::<Hold>().expect("behind ReserveLayer").clone();
///     let remaining = hold.remaining()[0].unwrap_or(0);
///     Response::new(format!("hold {}, {remaining} left", hold.id()))
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
    pub(crate) fn new(grant: Grant, claims: Vec<Claim>, store: Arc<dyn SettleStore>) -> Self {
        Self {
            inner: Arc::new(HoldInner {
                id: grant.id,
                claims,
                remaining: grant.remaining,
                expires_at_ms: AtomicU64::new(grant.expires_at_ms),
                deferred: AtomicBool::new(false),
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

    /// For each claim: the budget left after this hold (spend claims), or `None`.
    pub fn remaining(&self) -> &[Option<u64>] {
        &self.inner.remaining
    }

    /// When the lease ends, in Unix milliseconds by the store's clock.
    pub fn expires_at_ms(&self) -> u64 {
        self.inner.expires_at_ms.load(Ordering::Acquire)
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

    /// Commits the hold now (idempotent).
    pub async fn commit(&self) -> Result<Settled, Error> {
        self.inner.store.commit(self.id().clone()).await
    }

    /// Releases the hold now (idempotent).
    pub async fn release(&self) -> Result<Settled, Error> {
        self.inner.store.release(self.id().clone()).await
    }

    pub(crate) fn commit_task(&self) -> BoxFuture<Result<Settled, Error>> {
        self.inner.store.commit(self.id().clone())
    }

    pub(crate) fn release_task(&self) -> BoxFuture<Result<Settled, Error>> {
        self.inner.store.release(self.id().clone())
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Hold {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Hold>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "no hold: the route is not behind a ReserveLayer that reserved claims",
        ))
    }
}

/// A commit or release of a hold. Polled in place by the response future, so the response
/// waits for it without a task switch; if the response future is dropped first (the client
/// went away mid-commit), the rest runs to completion in a task of its own.
pub(crate) struct Settle {
    task: Option<BoxFuture<Result<Settled, Error>>>,
    hold: Hold,
    commit: bool,
    /// Only taken when the outcome is logged with its timing.
    started: Option<std::time::Instant>,
}

impl Settle {
    /// `timed`: whether the request is traced, so the settlement's timing is worth taking.
    pub(crate) fn new(hold: &Hold, commit: bool, timed: bool) -> Self {
        let task = if commit {
            hold.commit_task()
        } else {
            hold.release_task()
        };
        Self {
            task: Some(task),
            hold: hold.clone(),
            commit,
            started: timed.then(std::time::Instant::now),
        }
    }

    /// Whether this settles by committing.
    pub(crate) fn commits(&self) -> bool {
        self.commit
    }

    /// Runs the settlement in a task of its own, for when nobody waits for its answer.
    pub(crate) fn detach(self) {
        drop(self);
    }
}

fn log(
    id: &HoldId,
    commit: bool,
    started: Option<std::time::Instant>,
    result: &Result<Settled, Error>,
) {
    let elapsed_us = started.map(|t| t.elapsed().as_micros() as u64);
    match result {
        Ok(settled) => tracing::debug!(hold = %id, commit, ?settled, elapsed_us, "settled"),
        Err(err) => {
            tracing::error!(hold = %id, commit, error = %err, elapsed_us, "settling failed")
        }
    }
}

impl Future for Settle {
    type Output = Result<Settled, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let task = self.task.as_mut().expect("Settle polled after completion");
        let result = std::task::ready!(task.as_mut().poll(cx));
        self.task = None;
        log(self.hold.id(), self.commit, self.started, &result);
        std::task::Poll::Ready(result)
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                use tracing::Instrument;
                let (hold, commit, started) = (self.hold.clone(), self.commit, self.started);
                let finish = async move { log(hold.id(), commit, started, &task.await) };
                tokio::spawn(finish.instrument(tracing::Span::current()));
            } else {
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
        tracing::debug!(hold = %hold.id(), "request dropped before it settled; releasing");
        // Dropping an unfinished settlement hands it to a task of its own.
        drop(Settle::new(&hold, false, false));
    }
}
