//! A policy against the axum router it guards: every policy route must be one of the router's
//! routes, or its limit would silently never apply.

use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use http::StatusCode;
use tower_service::Service;

use super::{Policy, PolicyError};
use crate::layer::extract::{is_wildcard, same_pattern};

/// What a probe request saw: `Some` once it reached a router route, with that route's pattern.
#[derive(Clone, Default)]
struct Probe(Arc<Mutex<Option<Option<String>>>>);

impl Policy {
    /// Checks, at start, that `router` has a route for every route of the policy, so that none
    /// of its limits is silently off: a policy route `/user` beside a router route `/users` is
    /// refused here, instead of letting every request through unlimited. Call it with the router
    /// the [`PolicyLayer`](super::PolicyLayer) is given to (`Router::layer` or `route_layer`),
    /// before serving, and again before a [reload](super::PolicyLayer::reload).
    ///
    /// On a router the layer matches by the router's own choice: a request takes the policy
    /// route whose pattern is the pattern of the router route that took it (parameters may be
    /// named otherwise). So each policy route must be a router route's pattern, or lie under a
    /// router route with a wildcard (`/{*rest}`: there the policy matches the path). The check
    /// sends one request per policy route through a copy of the router, answered before any
    /// handler or middleware of the router runs.
    ///
    /// The method is not checked: a request whose method its router route does not serve is
    /// answered `405` by the router and runs nothing, so no limit is missed. A router's
    /// `fallback` is not a route: a policy route that only a fallback serves is refused (give the
    /// fallback's paths a wildcard route instead).
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_reserve::MemoryStore;
    /// use tower_reserve::policy::{Policy, PolicyLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let sign_ups = |path: &str| {
    ///     Policy::from_toml(&format!(r#"
    ///         [[route]]
    ///         method = "POST"
    ///         path = "{path}"
    ///         [[route.unique]]
    ///         namespace = "accounts"
    ///         value = "{{body./email}}"
    ///         owner = "{{header.x-account-id}}"
    ///     "#))
    ///     .unwrap()
    /// };
    /// let app = Router::new().route("/users", post(|| async { "created" }));
    /// let err = sign_ups("/user").check_router(&app).await.unwrap_err();
    /// assert_eq!(err.field(), Some("route[0].path"));
    /// assert!(err.message().contains("no route of the router takes POST /user"));
    ///
    /// let policy = sign_ups("/users");
    /// policy.check_router(&app).await.unwrap();
    /// let app = app.layer(PolicyLayer::new(MemoryStore::new(), &policy).unwrap());
    /// # let _ = app;
    /// # }
    /// ```
    pub async fn check_router(&self, router: &axum::Router) -> Result<(), PolicyError> {
        self.validate()?;
        // Every route of the router answers a probe itself, before anything of the router's.
        let mut probed = router.has_routes().then(|| {
            router
                .clone()
                .route_layer(axum::middleware::from_fn(answer))
        });
        for (i, route) in self.routes().iter().enumerate() {
            let seen = match &mut probed {
                Some(router) => probe(router, route.method(), route.path()).await,
                None => None,
            };
            let at = format!("route[{i}].path");
            match seen {
                None => {
                    return Err(PolicyError::at(
                        at,
                        format!(
                            "no route of the router takes {} {}: requests to it would never be limited",
                            route.method(),
                            route.path()
                        ),
                    ));
                }
                Some(Some(pattern))
                    if !is_wildcard(&pattern) && !same_pattern(&pattern, route.path()) =>
                {
                    return Err(PolicyError::at(
                        at,
                        format!(
                            "the router takes {} {} with its route {pattern}, whose pattern is not this route's: requests to it would never be limited (name the router's pattern)",
                            route.method(),
                            route.path()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Sends `router` a probe for `method pattern`: the pattern of the router route that took it
/// (`Some(None)` for a route with no `MatchedPath`), or `None` when no route took it.
async fn probe(
    router: &mut axum::Router,
    method: &http::Method,
    pattern: &str,
) -> Option<Option<String>> {
    // Each parameter becomes a segment no static route spells.
    let path: Vec<String> = pattern
        .split('/')
        .map(|segment| match segment.strip_prefix('{') {
            Some(name) => format!("%7B{}", name.replace('}', "%7D")),
            None => segment.to_owned(),
        })
        .collect();
    let probe = Probe::default();
    let mut request = http::Request::builder()
        .method(method.clone())
        .uri(path.join("/"))
        .body(axum::body::Body::empty())
        .ok()?;
    request.extensions_mut().insert(probe.clone());
    std::future::poll_fn(|cx| Service::<Request>::poll_ready(router, cx))
        .await
        .ok()?;
    let _ = Service::<Request>::call(router, request).await;
    probe
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// The probe's answer, in place of the route's: it says which route took it, and runs nothing
/// of the route. Any other request goes on.
async fn answer(request: Request, next: Next) -> axum::response::Response {
    let Some(Probe(seen)) = request.extensions().get::<Probe>().cloned() else {
        return next.run(request).await;
    };
    let pattern = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    *seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(pattern);
    axum::response::IntoResponse::into_response(StatusCode::NO_CONTENT)
}
