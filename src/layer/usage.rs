//! A route's budget as one value ([`BudgetOf`]), shared by the claims and by a usage read
//! ([`usage`]), so that the two can never disagree on a key, a limit or a window.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use tower_service::Service;

use super::Rejection;
use super::extract::{ExtractClaims, Extracted};
use crate::claim::civil_from_days;
use crate::{Budget, BudgetStatus, Claim, Store};

type BudgetFn = dyn Fn(&Request<Bytes>) -> Result<Budget, Rejection> + Send + Sync;
type AmountFn = dyn Fn(&Request<Bytes>) -> Result<u64, Rejection> + Send + Sync;

/// How a route finds the [`Budget`] a request spends from: its key, its limit and its window,
/// decided in one place.
///
/// A budget's limit is not stored: it travels with each claim (see the
/// [crate docs](crate#what-a-limit-belongs-to)). Build it with one `BudgetOf` and use that
/// everywhere the budget is named (the claims with [`BudgetOf::spend`] or
/// [`BudgetOf::budget`], the usage read with [`usage`]) and no other code can build it with
/// another limit.
///
/// The function reads the request as the layer's extractors do, so [`extract`](crate::extract)'s
/// helpers work in it. For a usage read the body is empty: a budget that a usage endpoint shows
/// reads only the request's head (its path, headers, query). It is synchronous: a limit that
/// takes a call to another service to find is looked up in an extractor closure of its own (or
/// kept in a table the function reads).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, StatusCode};
/// use tower_reserve::{Budget, BudgetOf, MemoryStore, ReserveLayer, Window, extract, usage};
///
/// // Each API key has 10 000 credits a month.
/// let credits = BudgetOf::new(|req: &Request<Bytes>| {
///     let key = extract::header(req, "x-api-key")
///         .map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?;
///     Ok(Budget::new(format!("credits:{key}"), 10_000).per(Window::Month))
/// });
/// let store = MemoryStore::new();
/// // A job spends its `cost` from the body...
/// let jobs = ReserveLayer::new(
///     store.clone(),
///     credits.spend(|req: &Request<Bytes>| extract::json_pointer(req, "/cost")),
/// );
/// // ...and `GET /usage` shows the very same budget.
/// let usage = usage(store, credits);
/// # let _ = (jobs, usage);
/// ```
#[derive(Clone)]
pub struct BudgetOf(Arc<BudgetFn>);

impl std::fmt::Debug for BudgetOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetOf(..)")
    }
}

impl BudgetOf {
    /// The budget `f` works out from a request; its rejection (say, `401` without an API key) is
    /// what the client gets.
    pub fn new(
        f: impl Fn(&Request<Bytes>) -> Result<Budget, Rejection> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(f))
    }

    /// The budget of `request`: for an extractor of its own that spends from it beside other
    /// claims.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::Request;
    /// use tower_reserve::{Budget, BudgetOf, Claim, Extracted, MemoryStore, ReserveLayer, extract};
    ///
    /// let wallet = BudgetOf::new(|req: &Request<Bytes>| {
    ///     Ok(Budget::new(extract::header(req, "x-wallet")?.to_owned(), 1_000))
    /// });
    /// let layer = ReserveLayer::new(MemoryStore::new(), move |req: Request<Bytes>| {
    ///     let wallet = wallet.clone();
    ///     async move {
    ///         let budget = wallet.budget(&req)?;
    ///         let cents: u64 = extract::json_pointer(&req, "/cents")?;
    ///         Extracted::Ok((req, vec![Claim::spend(budget, cents)]))
    ///     }
    /// });
    /// # let _ = layer;
    /// ```
    pub fn budget(&self, request: &Request<Bytes>) -> Result<Budget, Rejection> {
        (self.0)(request)
    }

    /// Claims that spend `amount` (worked out from the request) from this budget: an
    /// [`ExtractClaims`] for [`ReserveLayer::new`](crate::ReserveLayer::new).
    pub fn spend(
        &self,
        amount: impl Fn(&Request<Bytes>) -> Result<u64, Rejection> + Send + Sync + 'static,
    ) -> Spend {
        Spend {
            budget: self.clone(),
            amount: Arc::new(amount),
        }
    }
}

/// Claims that spend an amount from a [`BudgetOf`]; see [`BudgetOf::spend`].
#[derive(Clone)]
pub struct Spend {
    budget: BudgetOf,
    amount: Arc<AmountFn>,
}

impl std::fmt::Debug for Spend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spend").finish_non_exhaustive()
    }
}

impl Spend {
    fn claims(&self, request: &Request<Bytes>) -> Result<Vec<Claim>, Rejection> {
        let budget = self.budget.budget(request)?;
        let amount = (self.amount)(request)?;
        Ok(vec![Claim::spend(budget, amount)])
    }
}

impl ExtractClaims for Spend {
    type Future = Ready<Extracted>;

    fn extract(&self, request: Request<Bytes>) -> Self::Future {
        ready(self.claims(&request).map(|claims| (request, claims)))
    }
}

/// A service that answers a request with the state of its budget, as `budget` works it out:
/// `200` with `application/json`
///
/// ```json
/// {"limit": 10000, "spent": 1234, "held": 300, "remaining": 8466, "resets_at": "2025-07-01T00:00:00Z"}
/// ```
///
/// in the budget's minor units: `held` by requests in flight, `remaining` what a new request may
/// still take, `resets_at` when the window ends (RFC 3339, UTC; `null` for a lifetime budget).
/// Whatever `budget` refuses is its rejection (problem+json, e.g. `401`); a store that cannot
/// be reached is `503` with `Retry-After: 1` (the cause goes to the logs). The request's body is
/// not read.
///
/// It is a tower [`Service`]: mount it on axum with `Router::route_service("/usage", ..)` (or
/// `get_service`), or call it from a hyper service.
///
/// ```
/// use axum::Router;
/// use bytes::Bytes;
/// use http::Request;
/// use tower_reserve::{Budget, BudgetOf, MemoryStore, extract, usage};
///
/// let wallet = BudgetOf::new(|req: &Request<Bytes>| {
///     Ok(Budget::new(extract::path_param(req, "wallet")?.to_owned(), 1_000))
/// });
/// let app: Router = Router::new()
///     .route_service("/wallets/{wallet}/usage", usage(MemoryStore::new(), wallet));
/// ```
pub fn usage<St: Store>(store: St, budget: BudgetOf) -> Usage<St> {
    Usage { store, budget }
}

/// The usage read; see [`usage`].
#[derive(Clone)]
pub struct Usage<St> {
    store: St,
    budget: BudgetOf,
}

impl<St> std::fmt::Debug for Usage<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").finish_non_exhaustive()
    }
}

type UsageFuture =
    Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static>>;

impl<St: Store, B> Service<Request<B>> for Usage<St> {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = UsageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request = request.map(|_| Bytes::new());
        let budget = match self.budget.budget(&request) {
            Ok(budget) => budget,
            Err(rejection) => return Box::pin(ready(Ok(rejection.into_problem_response()))),
        };
        let store = self.store.clone();
        Box::pin(async move {
            Ok(match store.budget(&budget).await {
                Ok(status) => usage_response(&status),
                Err(err) if err.is_invalid_input() => {
                    Rejection::invalid_claims(&err).into_problem_response()
                }
                Err(err) => {
                    tracing::warn!(error = %err, "usage: the store could not read the budget");
                    Rejection::unavailable(1).into_problem_response()
                }
            })
        })
    }
}

fn usage_response(status: &BudgetStatus) -> Response<Full<Bytes>> {
    /// The members in the order a reader expects them.
    #[derive(serde::Serialize)]
    struct Body {
        limit: u64,
        spent: u64,
        held: u64,
        remaining: u64,
        resets_at: Option<String>,
    }
    let body = serde_json::to_vec(&Body {
        limit: status.limit,
        spent: status.spent,
        held: status.held,
        remaining: status.remaining,
        resets_at: status.resets_at_ms.map(rfc3339),
    })
    .expect("a usage document serializes");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Unix milliseconds as RFC 3339 in UTC, to the second (windows end on whole seconds).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn times_in_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_751_328_000_000), "2025-07-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000 + 3_723_000), "2000-02-29T01:02:03Z");
    }
}
