//! A policy route's claims, worked out from a request: the same [`ExtractClaims`] a closure is.

use std::collections::BTreeMap;
use std::future::{Ready, ready};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use serde_json::Value;

use super::model::{BudgetRule, Normalize, Number, Table, UniqueRule};
use super::template::scalar_text;
use super::{Policy, PolicyError, Route};
use crate::{
    Budget, BudgetOf, Claim, DigestKey, ExtractClaims, Extracted, MAX_AMOUNT, Rejection, Unique,
};

/// The claims of one policy route, as an [`ExtractClaims`]: what [`PolicyLayer`](super::PolicyLayer)
/// puts behind each route, and what a [`Routes`](crate::Routes) table takes beside closures.
///
/// The route's path parameters are read from the pattern the request matched, so it expects
/// [`RoutePattern`](crate::extract::RoutePattern) (set by `PolicyLayer` and `Routes`) or axum's
/// `MatchedPath`.
///
/// ```
/// use http::Method;
/// use tower_reserve::Routes;
/// use tower_reserve::policy::Policy;
///
/// let policy = Policy::from_toml(r#"
///     [[route]]
///     method = "POST"
///     path = "/keys/{key}/calls"
///     [[route.budget]]
///     key = "calls:{path.key}"
///     amount = 1
///     limit = 1000
///     window = "day"
/// "#).unwrap();
/// let mut routes = Routes::new();
/// for (method, pattern, claims) in policy.route_claims().unwrap() {
///     routes = routes.route(method, &pattern, claims);
/// }
/// # let _ = routes;
/// ```
#[derive(Clone)]
pub struct RouteClaims {
    inner: Arc<Rules>,
}

struct Rules {
    /// The request header a fresh id is minted into, first.
    mint_id: Option<HeaderName>,
    budgets: Vec<BudgetRule>,
    uniques: Vec<UniqueRule>,
    tables: Arc<BTreeMap<String, Table>>,
    digest_key: Option<DigestKey>,
}

impl std::fmt::Debug for RouteClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteClaims")
            .field("budgets", &self.inner.budgets)
            .field("uniques", &self.inner.uniques)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Each route's method, pattern and claims, once the policy is [validated](Policy::validate).
    /// The route's options (lease, body limit, commit statuses...) are not part of its claims:
    /// [`PolicyLayer`](super::PolicyLayer) applies them; under a [`Routes`](crate::Routes) table,
    /// the table's layer's options apply.
    pub fn route_claims(&self) -> Result<Vec<(Method, String, RouteClaims)>, PolicyError> {
        self.validate()?;
        let tables = Arc::new(self.tables().clone());
        Ok(self
            .routes()
            .iter()
            .map(|route| {
                let claims =
                    RouteClaims::new(route, tables.clone(), self.digest_key_setting().cloned());
                (route.method().clone(), route.path().to_owned(), claims)
            })
            .collect())
    }

    /// The budgets the route `method pattern` spends from, each as a [`BudgetOf`], once the
    /// policy is [validated](Policy::validate): what a usage endpoint shows a client, from the
    /// very rules the route reserves by. Refused when the policy does not validate or has no
    /// such route (the error lists the routes it has).
    ///
    /// The key and the limit are read from the usage request as the route reads them from its
    /// own: a `{path.NAME}` placeholder needs a parameter of that name in the usage route's
    /// pattern, and a `{body./pointer}` cannot be read (a usage request has no body).
    ///
    /// ```
    /// use http::Method;
    /// use tower_reserve::{MemoryStore, usage};
    /// use tower_reserve::policy::Policy;
    ///
    /// let policy = Policy::from_toml(r#"
    ///     [[route]]
    ///     method = "POST"
    ///     path = "/keys/{key}/calls"
    ///     [[route.budget]]
    ///     key = "calls:{path.key}"
    ///     amount = 1
    ///     limit = 1000
    ///     window = "day"
    /// "#).unwrap();
    /// let calls = policy.budgets_of(&Method::POST, "/keys/{key}/calls").unwrap().remove(0);
    /// let app: axum::Router = axum::Router::new()
    ///     .route_service("/keys/{key}/usage", usage(MemoryStore::new(), calls));
    /// ```
    pub fn budgets_of(&self, method: &Method, pattern: &str) -> Result<Vec<BudgetOf>, PolicyError> {
        let routes = self.route_claims()?;
        let has: Vec<String> = routes.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
        routes
            .into_iter()
            .find(|(m, p, _)| m == method && p == pattern)
            .map(|(_, _, claims)| claims.budgets())
            .ok_or_else(|| {
                let has = match has.as_slice() {
                    [] => "it has no routes".to_owned(),
                    has => format!("its routes are {}", has.join(", ")),
                };
                PolicyError::new(format!("the policy has no route {method} {pattern}; {has}"))
            })
    }
}

impl RouteClaims {
    pub(crate) fn new(
        route: &Route,
        tables: Arc<BTreeMap<String, Table>>,
        digest_key: Option<DigestKey>,
    ) -> Self {
        Self {
            inner: Arc::new(Rules {
                mint_id: route.mint_id_header().cloned(),
                budgets: route.budgets().to_vec(),
                uniques: route.uniques().to_vec(),
                tables,
                digest_key,
            }),
        }
    }

    /// The budgets the route spends from, in the policy's order, each as a [`BudgetOf`]: its key,
    /// limit and window worked out from a request exactly as the route's claims work them out.
    /// For a usage read of the route's budget ([`usage`](crate::usage)), without writing the
    /// budget a second time; see [`Policy::budgets_of`].
    pub fn budgets(&self) -> Vec<BudgetOf> {
        (0..self.inner.budgets.len())
            .map(|i| {
                let rules = self.inner.clone();
                BudgetOf::new(move |request| rules.budget(&rules.budgets[i], request))
            })
            .collect()
    }

    /// The claims of `request`, budgets first, each in the policy's order.
    fn claims(&self, request: &Request<Bytes>) -> Result<Vec<Claim>, Rejection> {
        let rules = &*self.inner;
        let mut claims = Vec::with_capacity(rules.budgets.len() + rules.uniques.len());
        for rule in &rules.budgets {
            let budget = rules.budget(rule, request)?;
            let amount = rules.number(rule.amount(), request)?;
            claims.push(Claim::spend(budget, amount));
        }
        for rule in &rules.uniques {
            let value = rule.value().render(request)?;
            let owner = rule.owner().render(request)?;
            let value = match (rule.normalizer(), &rules.digest_key) {
                (Normalize::Exact, None) => Unique::new(rule.namespace(), &value),
                (Normalize::Email, None) => Unique::email(rule.namespace(), &value),
                (Normalize::Exact, Some(key)) => {
                    Unique::keyed(rule.namespace(), &value, std::borrow::Cow::Borrowed, key)
                }
                (Normalize::Email, Some(key)) => Unique::keyed_email(rule.namespace(), &value, key),
            }
            .described_as(rule.value().words());
            claims.push(if rule.releases() {
                Claim::release_on_commit(value, owner)
            } else {
                Claim::own(value, owner)
            });
        }
        Ok(claims)
    }
}

impl Rules {
    /// The budget `rule` names for `request`: key, limit and window.
    fn budget(&self, rule: &BudgetRule, request: &Request<Bytes>) -> Result<Budget, Rejection> {
        let key = rule.key().render(request)?;
        let limit = self.number(rule.limit(), request)?;
        Ok(Budget::new(key, limit).per(rule.window()))
    }

    fn table(&self, name: &str) -> &Table {
        // Validation made sure every table named exists.
        self.tables.get(name).expect("a validated policy's table")
    }

    fn number(&self, number: &Number, request: &Request<Bytes>) -> Result<u64, Rejection> {
        match number {
            Number::Fixed(n) => Ok(*n),
            Number::Read(source) => source.read_number(request),
            Number::Lookup {
                key,
                table,
                default,
            } => {
                let key = key.render(request)?;
                self.table(table)
                    .get(&key)
                    .copied()
                    .or(*default)
                    .ok_or_else(|| unknown(table, Value::String(key)))
            }
            Number::Sum { ids, table } => {
                let ids: Vec<Value> = crate::extract::json_pointer(request, ids)?;
                let entries = self.table(table);
                let mut sum: u64 = 0;
                for id in ids {
                    let Some(key) = scalar_text(&id) else {
                        return Err(Rejection::unprocessable(format!(
                            "an id is a string or a number, not {id}"
                        )));
                    };
                    let Some(&n) = entries.get(&key) else {
                        return Err(unknown(table, id));
                    };
                    sum = sum
                        .checked_add(n)
                        .filter(|&s| s <= MAX_AMOUNT)
                        .ok_or_else(|| {
                            Rejection::unprocessable(format!(
                                "the amount is above the largest amount, {MAX_AMOUNT}"
                            ))
                        })?;
                }
                Ok(sum)
            }
        }
    }
}

/// A fresh id minted for a request ([`Route::mint_id`]): in the request's extensions (an axum
/// `Extension<MintedId>`) and in the route's header, for the inner service to create what the
/// request claims values for (an account) under this id.
///
/// ```
/// use axum::Extension;
/// use tower_reserve::policy::MintedId;
///
/// // Behind a PolicyLayer whose sign-up route has `mint_id = "x-account-id"`.
/// async fn sign_up(Extension(MintedId(account_id)): Extension<MintedId>) -> String {
///     format!("created account {account_id}")
/// }
/// let _: axum::routing::MethodRouter = axum::routing::post(sign_up);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedId(pub String);

/// Mints a fresh id into header `name` of `request` (in place of any the client sent: an owner
/// is never the client's to choose) and its extensions.
fn mint(name: &HeaderName, request: &mut Request<Bytes>) {
    let id = fresh_id();
    let value = HeaderValue::from_str(&id).expect("hex and dashes");
    request.headers_mut().insert(name.clone(), value);
    request.extensions_mut().insert(MintedId(id));
}

/// A UUID, version 4 (random): the form an account id takes in most databases.
fn fresh_id() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = crate::claim::hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `422`: `id` is not in `table`.
fn unknown(table: &str, id: Value) -> Rejection {
    Rejection::unprocessable(format!("{id} is not in the table {table:?}"))
        .with("table", table.to_owned())
        .with("id", id)
}

impl ExtractClaims for RouteClaims {
    type Future = Ready<Extracted>;

    fn extract(&self, mut request: Request<Bytes>) -> Self::Future {
        if let Some(name) = &self.inner.mint_id {
            mint(name, &mut request);
        }
        ready(self.claims(&request).map(|claims| (request, claims)))
    }
}
