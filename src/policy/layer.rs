//! The layer: a policy's routes, each its own [`ReserveLayer`], and a policy that can be
//! replaced while requests flow.

use std::sync::{Arc, PoisonError, RwLock};

use tower_layer::Layer;

use super::service::PolicyService;
use super::{Policy, PolicyError, Route, RouteClaims};
use crate::layer::extract::RouteMatch;
use crate::{ReserveLayer, Store};

/// Customizes a route's layer beyond what the policy says (an error handler, a validator, an
/// idempotency header).
type Configure<St> =
    dyn Fn(&Route, ReserveLayer<St, RouteClaims>) -> ReserveLayer<St, RouteClaims> + Send + Sync;

/// A tower [`Layer`] that reserves by a [`Policy`]: a request whose method and path match one of
/// its routes goes through that route's own [`ReserveLayer`] (its claims, lease, body limit,
/// commit statuses, fail-open and shadow mode); any other request goes to the inner service
/// untouched, its body streamed and never read.
///
/// The inner service takes `Request<`[`PolicyBody`](super::PolicyBody)`>`. A matched request
/// carries its route's [`RoutePattern`](crate::extract::RoutePattern), so path parameters and
/// the metrics' `route` label work as under [`Routes`](crate::Routes).
///
/// On an axum router, a request takes the policy route of the router route that took it; check
/// the policy against the router at start with [`Policy::check_router`], so that a policy route
/// the router does not serve is refused rather than silently off.
///
/// Clones share one policy: [`PolicyLayer::reload`] on any of them replaces it for every
/// service they made, from the next request on (requests in flight finish under the policy
/// they started with).
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_reserve::MemoryStore;
/// use tower_reserve::policy::{Policy, PolicyBody, PolicyLayer};
///
/// let policy = Policy::from_toml(r#"
///     [[route]]
///     method = "POST"
///     path = "/customers/{customer_id}/purchases"
///     [[route.budget]]
///     key = "customer:{path.customer_id}"
///     amount = "{body./amount_cents}"
///     limit = 50000
/// "#).unwrap();
/// let layer = PolicyLayer::new(MemoryStore::new(), &policy).unwrap();
/// let service = ServiceBuilder::new()
///     .layer(layer.clone())
///     .service(service_fn(|_req: Request<PolicyBody>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
///     }));
/// // Later, e.g. on SIGHUP: a policy that does not validate is refused, the old one stays.
/// assert!(layer.reload(&Policy::from_toml("").unwrap()).is_ok());
/// # let _ = service;
/// ```
pub struct PolicyLayer<St> {
    shared: Arc<Shared<St>>,
}

impl<St> Clone for PolicyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> std::fmt::Debug for PolicyLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyLayer")
            .field("routes", &self.shared.current().routes)
            .finish_non_exhaustive()
    }
}

/// What a layer, its clones and the services they made share.
pub(crate) struct Shared<St> {
    store: St,
    configure: RwLock<Option<Arc<Configure<St>>>>,
    current: RwLock<Arc<Compiled<St>>>,
}

/// A policy made ready to serve: each route's matcher and layer.
pub(crate) struct Compiled<St> {
    policy: Arc<Policy>,
    pub(crate) routes: Vec<CompiledRoute<St>>,
}

pub(crate) struct CompiledRoute<St> {
    pub(crate) matcher: RouteMatch,
    pub(crate) layer: ReserveLayer<St, RouteClaims>,
}

impl<St> std::fmt::Debug for CompiledRoute<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.matcher.fmt(f)
    }
}

impl<St> Compiled<St> {
    /// The route a request takes.
    ///
    /// On an axum router (the layer given to `Router::layer` or `route_layer`), the router has
    /// chosen: the request takes the policy route whose pattern is the one of the router's route
    /// (parameters may be named otherwise), so that the router's rules decide (a static route
    /// beside a parameter, a trailing slash), and a policy route whose pattern no router route
    /// has takes nothing ([`Policy::check_router`] finds those at start). A router route with a
    /// wildcard (`/{*rest}`) hands a whole subtree to one service: there, and with no router
    /// (a plain hyper service, a gateway), the first route whose pattern matches the path.
    pub(crate) fn find<B>(&self, request: &http::Request<B>) -> Option<&CompiledRoute<St>> {
        let method = request.method();
        #[cfg(feature = "axum")]
        if let Some(pattern) = crate::layer::extract::router_pattern(request)
            && !crate::layer::extract::is_wildcard(pattern)
        {
            return self
                .routes
                .iter()
                .find(|r| r.matcher.is_route(method, pattern));
        }
        let path = request.uri().path();
        self.routes.iter().find(|r| r.matcher.matches(method, path))
    }
}

impl<St> Shared<St> {
    pub(crate) fn current(&self) -> Arc<Compiled<St>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<St: Store> Shared<St> {
    fn compile(&self, policy: &Policy) -> Result<Compiled<St>, PolicyError> {
        let configure = self
            .configure
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let routes = policy
            .route_claims()?
            .into_iter()
            .zip(policy.routes())
            .map(|((method, pattern, claims), route)| {
                let mut layer = route.configure(ReserveLayer::new(self.store.clone(), claims));
                if let Some(configure) = &configure {
                    layer = configure(route, layer);
                }
                CompiledRoute {
                    matcher: RouteMatch::new(method, &pattern),
                    layer,
                }
            })
            .collect();
        Ok(Compiled {
            policy: Arc::new(policy.clone()),
            routes,
        })
    }

    fn install(&self, compiled: Compiled<St>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(compiled);
    }
}

impl<St: Store> PolicyLayer<St> {
    /// A layer that reserves on `store` by `policy`, once the policy
    /// [validates](Policy::validate).
    pub fn new(store: St, policy: &Policy) -> Result<Self, PolicyError> {
        let shared = Shared {
            store,
            configure: RwLock::new(None),
            current: RwLock::new(Arc::new(Compiled {
                policy: Arc::new(Policy::new()),
                routes: Vec::new(),
            })),
        };
        let compiled = shared.compile(policy)?;
        shared.install(compiled);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// Customizes every route's [`ReserveLayer`] beyond what a policy can say: an
    /// [error handler](ReserveLayer::error_handler), a [validator](ReserveLayer::validate), an
    /// [idempotency header](ReserveLayer::idempotency_header). `configure` gets the route and its
    /// layer with the policy's options applied, now and at every reload.
    ///
    /// ```
    /// use tower_reserve::MemoryStore;
    /// use tower_reserve::policy::{Policy, PolicyLayer};
    ///
    /// let layer = PolicyLayer::new(MemoryStore::new(), &Policy::new())
    ///     .unwrap()
    ///     .configure(|_route, layer| {
    ///         layer.idempotency_header(http::HeaderName::from_static("idempotency-key"))
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn configure(
        self,
        configure: impl Fn(&Route, ReserveLayer<St, RouteClaims>) -> ReserveLayer<St, RouteClaims>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        *self
            .shared
            .configure
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(configure));
        let policy = self.policy();
        let compiled = self
            .shared
            .compile(&policy)
            .expect("the policy in force has validated");
        self.shared.install(compiled);
        self
    }

    /// Replaces the policy, for every service made by this layer or its clones, from the next
    /// request on. A policy that does not [validate](Policy::validate) is refused and the one in
    /// force stays.
    pub fn reload(&self, policy: &Policy) -> Result<(), PolicyError> {
        let compiled = self.shared.compile(policy)?;
        self.shared.install(compiled);
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.current().policy.clone()
    }
}

impl<S, St> Layer<S> for PolicyLayer<St> {
    type Service = PolicyService<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        PolicyService::new(inner, self.shared.clone())
    }
}
