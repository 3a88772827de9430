//! The policy model: routes and what each reserves, as plain values. Read from a file or built
//! in Rust, it is checked by [`Policy::validate`] before anything uses it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::PolicyError;
use super::template::{Source, Template};
use crate::layer::extract::pattern_params;
use crate::{
    Budget, DigestKey, Disconnect, MAX_AMOUNT, MAX_CLAIMS, MAX_KEY_LEN, MAX_LEASE, Window,
};

/// A table of whole numbers by key: prices by product id, limits by plan.
pub type Table = BTreeMap<String, u64>;

/// Routes and what each reserves, with the tables they look numbers up in. See the
/// [module docs](super) for the file format.
///
/// ```
/// use http::Method;
/// use tower_reserve::policy::{BudgetRule, Number, Policy, Route, UniqueRule, Normalize};
///
/// let policy = Policy::new()
///     .table("products", (1..=100).map(|n| (n.to_string(), n * 100)))
///     .route(
///         Route::new(Method::POST, "/customers/{customer_id}/purchases").budget(BudgetRule::new(
///             "customer:{path.customer_id}".parse().unwrap(),
///             Number::sum("/product_ids", "products"),
///             Number::Fixed(50_000),
///         )),
///     )
///     .route(Route::new(Method::POST, "/accounts").unique(
///         UniqueRule::own(
///             "accounts",
///             "{body./email}".parse().unwrap(),
///             "{header.x-account-id}".parse().unwrap(),
///         )
///         .normalize(Normalize::Email),
///     ));
/// policy.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "route")]
    routes: Vec<Route>,
    #[serde(default)]
    tables: BTreeMap<String, Table>,
    /// Not in the file: a secret belongs with the deployment's secrets, not its policy.
    #[serde(skip)]
    digest_key: Option<DigestKey>,
}

/// One route: a method and a path pattern, what it reserves, and the layer's options for it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(deserialize_with = "method")]
    method: Method,
    path: String,
    #[serde(default, rename = "budget")]
    budgets: Vec<BudgetRule>,
    #[serde(default, rename = "unique")]
    uniques: Vec<UniqueRule>,
    #[serde(default, deserialize_with = "lease")]
    lease: Option<Duration>,
    #[serde(default)]
    body_limit: Option<usize>,
    #[serde(default)]
    commit: Option<StatusSet>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    shadow: bool,
    #[serde(default, deserialize_with = "disconnect")]
    on_disconnect: Option<Disconnect>,
    #[serde(default)]
    remaining_headers: bool,
    #[serde(default)]
    too_many_requests: bool,
    #[serde(default, deserialize_with = "header_name")]
    mint_id: Option<HeaderName>,
}

/// Spend an amount against a budget: the key, the amount, the limit and its window.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    key: Template,
    amount: Number,
    limit: Number,
    #[serde(default = "lifetime", deserialize_with = "window")]
    window: Window,
}

/// Own a unique value (or give it up when the request commits) on behalf of an owner.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniqueRule {
    namespace: String,
    value: Template,
    owner: Template,
    #[serde(default)]
    normalize: Normalize,
    #[serde(default)]
    release_on_commit: bool,
}

/// How a unique value is normalized before it is claimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Normalize {
    /// The value exactly as read.
    #[default]
    Exact,
    /// An e-mail address: [`normalize_email`](crate::normalize_email) (trimmed, lower-cased).
    Email,
}

/// Where an amount or a limit comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Number {
    /// This number: `amount = 2000`.
    Fixed(u64),
    /// Read from the request: `amount = "{header.x-cost}"`, `limit = "{header.x-limit}"` (a
    /// header an authenticating proxy in front sets). A JSON integer in the body, digits
    /// elsewhere (`400` when they are not).
    Read(Source),
    /// Looked up in a table by a key read from the request:
    /// `limit = { lookup = "{header.x-plan}", table = "plans", default = 1000 }`. A key the
    /// table lacks takes `default`, or is refused with `422` when there is none.
    Lookup {
        /// The key.
        key: Template,
        /// The table's name.
        table: String,
        /// The number for a key the table lacks.
        default: Option<u64>,
    },
    /// The sum of the entries of a table for ids at a JSON pointer in the body (an array of
    /// strings or integers): `amount = { sum = "/product_ids", table = "products" }`. An id the
    /// table lacks is refused with `422`, and so is a sum above [`MAX_AMOUNT`].
    Sum {
        /// The JSON pointer to the array of ids.
        ids: String,
        /// The table's name.
        table: String,
    },
}

impl Number {
    /// The sum of `table`'s entries for the ids at the JSON pointer `ids`.
    pub fn sum(ids: impl Into<String>, table: impl Into<String>) -> Self {
        Number::Sum {
            ids: ids.into(),
            table: table.into(),
        }
    }

    /// `table`'s entry for `key`, with no default.
    pub fn lookup(key: Template, table: impl Into<String>) -> Self {
        Number::Lookup {
            key,
            table: table.into(),
            default: None,
        }
    }
}

/// The statuses of the responses that commit a hold; every other response releases it.
///
/// ```
/// use http::StatusCode;
/// use tower_reserve::policy::StatusSet;
///
/// let set = StatusSet::class(2).with(StatusCode::NOT_MODIFIED);
/// assert!(set.contains(StatusCode::CREATED));
/// assert!(set.contains(StatusCode::NOT_MODIFIED));
/// assert!(!set.contains(StatusCode::FOUND));
/// assert_eq!(StatusSet::default(), StatusSet::class(2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet {
    /// Inclusive ranges of status codes.
    ranges: Vec<(u16, u16)>,
}

impl Default for StatusSet {
    /// `2xx`.
    fn default() -> Self {
        Self::class(2)
    }
}

impl StatusSet {
    /// Every status of a class: `2` for `2xx` (1 to 5).
    pub fn class(class: u16) -> Self {
        Self::none().with_class(class)
    }

    /// No status: nothing commits until something is added.
    pub fn none() -> Self {
        Self { ranges: Vec::new() }
    }

    /// The set and one status more.
    pub fn with(mut self, status: StatusCode) -> Self {
        self.ranges.push((status.as_u16(), status.as_u16()));
        self
    }

    /// The set and a class more (`2` for `2xx`).
    pub fn with_class(mut self, class: u16) -> Self {
        let class = class.clamp(1, 5);
        self.ranges.push((class * 100, class * 100 + 99));
        self
    }

    /// Whether `status` commits.
    pub fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&code))
    }

    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl Policy {
    /// A policy with no routes: every request passes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. The first route that matches a request is used; two routes with one
    /// method and pattern are refused.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Adds (or replaces) the table `name`.
    pub fn table<K: Into<String>>(
        mut self,
        name: impl Into<String>,
        entries: impl IntoIterator<Item = (K, u64)>,
    ) -> Self {
        let table = entries.into_iter().map(|(k, v)| (k.into(), v)).collect();
        self.tables.insert(name.into(), table);
        self
    }

    /// Keys the digests of every unique value the policy claims ([`Unique::keyed`]): a
    /// deployment's secret, so that the digests in the store and the logs cannot be tested
    /// against guessed values (recommended). Set it again on a policy loaded anew (a reload).
    ///
    /// [`Unique::keyed`]: crate::Unique::keyed
    pub fn digest_key(mut self, key: DigestKey) -> Self {
        self.digest_key = Some(key);
        self
    }

    pub(crate) fn digest_key_setting(&self) -> Option<&DigestKey> {
        self.digest_key.as_ref()
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route a request with this method and path takes: the first that matches.
    pub fn route_for(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path))
    }

    /// The table `name`.
    pub fn table_named(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    pub(crate) fn tables(&self) -> &BTreeMap<String, Table> {
        &self.tables
    }

    /// Checks everything that can be checked before a request arrives: patterns and their
    /// parameters, templates, tables and the numbers in them (at most [`MAX_AMOUNT`]), fixed
    /// amounts (1 to [`MAX_AMOUNT`]) and limits, windows, leases, the number of claims, and that
    /// no two routes share a method and a pattern.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (name, table) in &self.tables {
            for (key, &value) in table {
                if value > MAX_AMOUNT {
                    return Err(PolicyError::at(
                        format!("tables.{name}.{key}"),
                        format!("{value} is above the largest amount, {MAX_AMOUNT} (2^53 - 1)"),
                    ));
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("route[{i}]");
            route.validate(&at, self)?;
            if let Some(j) = self.routes[..i]
                .iter()
                .position(|r| r.method == route.method && r.path == route.path)
            {
                return Err(PolicyError::at(
                    format!("{at}.path"),
                    format!(
                        "{} {} is declared twice (route[{j}] too)",
                        route.method, route.path
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Route {
    /// A route for requests with this method whose path matches `pattern` (`/`-separated; a
    /// segment `{name}` matches any one segment), reserving nothing yet.
    pub fn new(method: Method, pattern: impl Into<String>) -> Self {
        Self {
            method,
            path: pattern.into(),
            budgets: Vec::new(),
            uniques: Vec::new(),
            lease: None,
            body_limit: None,
            commit: None,
            fail_open: false,
            shadow: false,
            on_disconnect: None,
            remaining_headers: false,
            too_many_requests: false,
            mint_id: None,
        }
    }

    /// Adds a budget claim.
    pub fn budget(mut self, rule: BudgetRule) -> Self {
        self.budgets.push(rule);
        self
    }

    /// Adds a unique-value claim.
    pub fn unique(mut self, rule: UniqueRule) -> Self {
        self.uniques.push(rule);
        self
    }

    /// The lease of the route's holds (default: the layer's, 30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The most body bytes read to work out the claims (default: the layer's, 64 KiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = Some(bytes);
        self
    }

    /// Which responses commit (default `2xx`).
    pub fn commit(mut self, statuses: StatusSet) -> Self {
        self.commit = Some(statuses);
        self
    }

    /// Lets budget-only requests through unreserved when the store is unavailable.
    pub fn fail_open(mut self, yes: bool) -> Self {
        self.fail_open = yes;
        self
    }

    /// Shadow mode: check and count, hold nothing, let everything through.
    pub fn shadow(mut self, yes: bool) -> Self {
        self.shadow = yes;
        self
    }

    /// What happens to a request whose client goes away (default [`Disconnect::Finish`]).
    pub fn on_disconnect(mut self, what: Disconnect) -> Self {
        self.on_disconnect = Some(what);
        self
    }

    /// Adds `RateLimit-Policy` and `RateLimit` response headers.
    pub fn remaining_headers(mut self, yes: bool) -> Self {
        self.remaining_headers = yes;
        self
    }

    /// Mints a fresh id for every request that takes the route (a UUID, version 4), for a
    /// command that creates what will own its values (a sign-up that carries no account id yet):
    /// the id replaces whatever the client sent in the request header `name`, so that the
    /// route's templates read it there (`owner = "{header.x-account-id}"`) and the inner service
    /// gets it there and as a [`MintedId`](super::MintedId) extension, to create the account
    /// under that id.
    pub fn mint_id(mut self, name: HeaderName) -> Self {
        self.mint_id = Some(name);
        self
    }

    /// The request header the route mints a fresh id into, if it does ([`Route::mint_id`]).
    pub fn mint_id_header(&self) -> Option<&HeaderName> {
        self.mint_id.as_ref()
    }

    /// Refuses over a windowed budget with `429` and `Retry-After` instead of `403`; see
    /// [`ReserveLayer::too_many_requests`](crate::ReserveLayer::too_many_requests).
    pub fn too_many_requests(mut self, yes: bool) -> Self {
        self.too_many_requests = yes;
        self
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path pattern.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the route is in shadow mode.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// The lease the route sets, if it sets one (the layer's default, 30 s, otherwise).
    pub fn lease_setting(&self) -> Option<Duration> {
        self.lease
    }

    /// The body limit the route sets, if it sets one (the layer's default, 64 KiB, otherwise).
    pub fn body_limit_setting(&self) -> Option<usize> {
        self.body_limit
    }

    /// Whether a request with this method and path takes this route, as [`PolicyLayer`]
    /// matches it (the first route that matches takes a request: see [`Policy::route_for`]).
    ///
    /// [`PolicyLayer`]: super::PolicyLayer
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        crate::layer::extract::RouteMatch::new(self.method.clone(), &self.path)
            .matches(method, path)
    }

    /// Every placeholder the route's claims read (path parameters, headers, query parameters,
    /// body pointers; a sum's array of ids is read from the body besides), in file order,
    /// repeats included. A proxy in front can refuse a request that
    /// sends one of these headers twice, since the claims read only one of its values.
    pub fn sources(&self) -> Vec<&Source> {
        fn number<'a>(n: &'a Number, out: &mut Vec<&'a Source>) {
            match n {
                Number::Fixed(_) | Number::Sum { .. } => {}
                Number::Read(source) => out.push(source),
                Number::Lookup { key, .. } => out.extend(key.sources()),
            }
        }
        let mut out = Vec::new();
        for rule in &self.budgets {
            out.extend(rule.key.sources());
            number(&rule.amount, &mut out);
            number(&rule.limit, &mut out);
        }
        for rule in &self.uniques {
            out.extend(rule.value.sources());
            out.extend(rule.owner.sources());
        }
        out
    }

    pub(crate) fn budgets(&self) -> &[BudgetRule] {
        &self.budgets
    }

    pub(crate) fn uniques(&self) -> &[UniqueRule] {
        &self.uniques
    }

    /// Applies the route's options to a layer.
    pub(crate) fn configure<St: crate::Store, E: crate::ExtractClaims>(
        &self,
        mut layer: crate::ReserveLayer<St, E>,
    ) -> crate::ReserveLayer<St, E> {
        if let Some(lease) = self.lease {
            layer = layer.lease(lease);
        }
        if let Some(bytes) = self.body_limit {
            layer = layer.body_limit(bytes);
        }
        if let Some(statuses) = self.commit.clone() {
            layer = layer.commit_if(move |status| statuses.contains(status));
        }
        if let Some(what) = self.on_disconnect {
            layer = layer.on_disconnect(what);
        }
        layer
            .fail_open(self.fail_open)
            .shadow(self.shadow)
            .remaining_headers(self.remaining_headers)
            .too_many_requests(self.too_many_requests)
    }

    fn validate(&self, at: &str, policy: &Policy) -> Result<(), PolicyError> {
        let params =
            pattern_params(&self.path).map_err(|e| PolicyError::at(format!("{at}.path"), e))?;
        if self.budgets.is_empty() && self.uniques.is_empty() {
            return Err(PolicyError::at(
                at,
                "a route reserves something: give it a [[route.budget]] or a [[route.unique]]",
            ));
        }
        let claims = self.budgets.len() + self.uniques.len();
        if claims > MAX_CLAIMS {
            return Err(PolicyError::at(
                at,
                format!("{claims} claims; a route has at most {MAX_CLAIMS}"),
            ));
        }
        if let Some(lease) = self.lease
            && (lease < Duration::from_millis(1) || lease > MAX_LEASE)
        {
            return Err(PolicyError::at(
                format!("{at}.lease"),
                "a lease is 1 ms to 1 day",
            ));
        }
        if self.commit.as_ref().is_some_and(StatusSet::is_empty) {
            return Err(PolicyError::at(
                format!("{at}.commit"),
                "no status commits: name at least one",
            ));
        }
        let sources = Sources {
            params: &params,
            policy,
        };
        for (j, rule) in self.budgets.iter().enumerate() {
            rule.validate(&format!("{at}.budget[{j}]"), &sources)?;
            if let Some(k) = self.budgets[..j]
                .iter()
                .position(|r| r.key == rule.key && r.window == rule.window)
            {
                return Err(PolicyError::at(
                    format!("{at}.budget[{j}].key"),
                    format!("the same budget as budget[{k}]: a request may claim a budget once"),
                ));
            }
        }
        for (j, rule) in self.uniques.iter().enumerate() {
            rule.validate(&format!("{at}.unique[{j}]"), &sources)?;
        }
        Ok(())
    }
}

/// What a route's templates may read: its path parameters, the policy's tables.
struct Sources<'a> {
    params: &'a [&'a str],
    policy: &'a Policy,
}

impl Sources<'_> {
    fn check(&self, at: &str, template: &Template) -> Result<(), PolicyError> {
        template
            .sources()
            .try_for_each(|s| self.check_source(at, s))
    }

    fn check_source(&self, at: &str, source: &Source) -> Result<(), PolicyError> {
        match source {
            Source::Path(name) if !self.params.contains(&name.as_str()) => Err(PolicyError::at(
                at,
                format!("the route's path has no parameter {{{name}}}"),
            )),
            _ => Ok(()),
        }
    }

    fn check_table(&self, at: &str, table: &str) -> Result<(), PolicyError> {
        if self.policy.tables.contains_key(table) {
            Ok(())
        } else {
            Err(PolicyError::at(at, format!("there is no table {table:?}")))
        }
    }

    fn check_number(&self, at: &str, number: &Number, least: u64) -> Result<(), PolicyError> {
        let in_range = |n: u64| {
            if n < least || n > MAX_AMOUNT {
                Err(PolicyError::at(
                    at,
                    format!("{n} is not within {least} to {MAX_AMOUNT} (2^53 - 1)"),
                ))
            } else {
                Ok(())
            }
        };
        match number {
            Number::Fixed(n) => in_range(*n),
            Number::Read(source) => self.check_source(at, source),
            Number::Lookup {
                key,
                table,
                default,
            } => {
                self.check(at, key)?;
                self.check_table(at, table)?;
                default.map_or(Ok(()), in_range)
            }
            Number::Sum { ids, table } => {
                if !ids.starts_with('/') {
                    return Err(PolicyError::at(
                        at,
                        format!("the ids are at a JSON pointer starting with '/', not {ids:?}"),
                    ));
                }
                self.check_table(at, table)
            }
        }
    }
}

impl BudgetRule {
    /// Spend `amount` against a budget keyed by `key`, limited to `limit`, for all time.
    pub fn new(key: Template, amount: Number, limit: Number) -> Self {
        Self {
            key,
            amount,
            limit,
            window: Window::Lifetime,
        }
    }

    /// The limit applies per `window` instead of for all time.
    pub fn per(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    pub(crate) fn key(&self) -> &Template {
        &self.key
    }

    pub(crate) fn amount(&self) -> &Number {
        &self.amount
    }

    pub(crate) fn limit(&self) -> &Number {
        &self.limit
    }

    pub(crate) fn window(&self) -> Window {
        self.window
    }

    fn validate(&self, at: &str, sources: &Sources<'_>) -> Result<(), PolicyError> {
        let key_at = format!("{at}.key");
        sources.check(&key_at, &self.key)?;
        let literal: usize = self.key.literal_text().map(str::len).sum();
        if literal > MAX_KEY_LEN {
            return Err(PolicyError::at(
                key_at,
                format!("a budget key is at most {MAX_KEY_LEN} bytes"),
            ));
        }
        sources.check_number(&format!("{at}.amount"), &self.amount, 1)?;
        sources.check_number(&format!("{at}.limit"), &self.limit, 0)?;
        Budget::new("k", 0)
            .per(self.window)
            .validate()
            .map_err(|e| PolicyError::at(format!("{at}.window"), e.to_string()))
    }
}

impl UniqueRule {
    /// Own `value` in `namespace` on behalf of `owner`.
    pub fn own(namespace: impl Into<String>, value: Template, owner: Template) -> Self {
        Self {
            namespace: namespace.into(),
            value,
            owner,
            normalize: Normalize::Exact,
            release_on_commit: false,
        }
    }

    /// Give up `value`, which `owner` owns in `namespace`, when the request commits.
    pub fn release_on_commit(
        namespace: impl Into<String>,
        value: Template,
        owner: Template,
    ) -> Self {
        Self {
            release_on_commit: true,
            ..Self::own(namespace, value, owner)
        }
    }

    /// How the value is normalized (default [`Normalize::Exact`]).
    pub fn normalize(mut self, how: Normalize) -> Self {
        self.normalize = how;
        self
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn value(&self) -> &Template {
        &self.value
    }

    pub(crate) fn owner(&self) -> &Template {
        &self.owner
    }

    pub(crate) fn normalizer(&self) -> Normalize {
        self.normalize
    }

    pub(crate) fn releases(&self) -> bool {
        self.release_on_commit
    }

    fn validate(&self, at: &str, sources: &Sources<'_>) -> Result<(), PolicyError> {
        crate::claim::check_tag("unique namespace", &self.namespace)
            .map_err(|e| PolicyError::at(format!("{at}.namespace"), e.to_string()))?;
        sources.check(&format!("{at}.value"), &self.value)?;
        sources.check(&format!("{at}.owner"), &self.owner)?;
        // An owner read from nothing but what the value is read from is the same for every
        // request that claims one value, and an owner claiming its own value again is granted:
        // uniqueness would never refuse anyone.
        let value: Vec<&Source> = self.value.sources().collect();
        if self.owner.sources().all(|s| value.contains(&s)) {
            return Err(PolicyError::at(
                format!("{at}.owner"),
                format!(
                    "the owner {} is read from nothing but what the value is read from, so every request for one value would have one owner and none would ever be refused: name who owns it (a header an authenticating proxy sets, a path parameter), or give the route a mint_id and read the owner from that header",
                    self.owner
                ),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the fields that are text in a file: methods, durations, windows, numbers, statuses.

fn lifetime() -> Window {
    Window::Lifetime
}

fn method<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Method, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    let upper = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    match Method::from_bytes(text.as_bytes()) {
        Ok(method) if upper => Ok(method),
        _ => Err(de::Error::custom(format!(
            "{text:?} is not a method: write it in capitals, such as \"POST\""
        ))),
    }
}

/// `250ms`, `30s`, `5m`, `2h`, `1d`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms).map(Duration::from_millis)
}

fn lease<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    parse_duration(&text).map(Some).ok_or_else(|| {
        de::Error::custom(format!(
            "{text:?} is not a duration: a whole number with ms, s, m, h or d, such as \"30s\""
        ))
    })
}

fn window<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Window, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    match text.trim() {
        "lifetime" => Ok(Window::Lifetime),
        "day" => Ok(Window::Day),
        "month" => Ok(Window::Month),
        other => match parse_duration(other) {
            Some(d) if d.subsec_nanos() == 0 && !d.is_zero() => Ok(Window::Every(d)),
            _ => Err(de::Error::custom(format!(
                "{text:?} is not a window: \"lifetime\", \"day\", \"month\", or whole seconds such as \"3600s\" or \"1h\""
            ))),
        },
    }
}

fn header_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<HeaderName>, D::Error> {
    let text = Cow::<str>::deserialize(deserializer)?;
    HeaderName::from_bytes(text.as_bytes())
        .map(Some)
        .map_err(|_| de::Error::custom(format!("{text:?} is not a header name")))
}

fn disconnect<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Disconnect>, D::Error> {
    match &*Cow::<str>::deserialize(deserializer)? {
        "finish" => Ok(Some(Disconnect::Finish)),
        "release" => Ok(Some(Disconnect::Release)),
        other => Err(de::Error::custom(format!(
            "{other:?} is not \"finish\" or \"release\""
        ))),
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NumberVisitor)
    }
}

struct NumberVisitor;

/// The table form of a [`Number`]: `{ lookup, table, default }` or `{ sum, table }`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NumberTable {
    lookup: Option<Template>,
    sum: Option<String>,
    table: String,
    default: Option<u64>,
}

impl<'de> Visitor<'de> for NumberVisitor {
    type Value = Number;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a whole number, a placeholder such as \"{header.x-cost}\", { lookup = ..., table = ... } or { sum = ..., table = ... }",
        )
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Number, E> {
        Ok(Number::Fixed(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Number, E> {
        u64::try_from(n)
            .map(Number::Fixed)
            .map_err(|_| E::custom(format!("{n} is negative")))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Number, E> {
        let template = Template::parse(text).map_err(|e| E::custom(e.message()))?;
        match template.as_source() {
            Some(source) => Ok(Number::Read(source.clone())),
            None => Err(E::custom(format!(
                "{text:?} is not one placeholder such as \"{{header.x-cost}}\""
            ))),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Number, A::Error> {
        let t = NumberTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
        match (t.lookup, t.sum, t.default) {
            (Some(key), None, default) => Ok(Number::Lookup {
                key,
                table: t.table,
                default,
            }),
            (None, Some(ids), None) => Ok(Number::Sum {
                ids,
                table: t.table,
            }),
            (None, Some(_), Some(_)) => Err(de::Error::custom(
                "a sum has no default: every id must be in the table",
            )),
            _ => Err(de::Error::custom(
                "give either lookup = \"{...}\" or sum = \"/pointer\", with table",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for StatusSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(StatusSetVisitor)
    }
}

struct StatusSetVisitor;

/// One entry of `commit = [...]`.
enum StatusEntry {
    Code(u16),
    Class(u16),
}

impl<'de> Deserialize<'de> for StatusEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl Visitor<'_> for EntryVisitor {
            type Value = StatusEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status such as 201, or a class such as \"2xx\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<StatusEntry, E> {
                match u16::try_from(n) {
                    Ok(code) if (100..=599).contains(&code) => Ok(StatusEntry::Code(code)),
                    _ => Err(E::custom(format!("{n} is not a status (100 to 599)"))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<StatusEntry, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<StatusEntry, E> {
                match text.as_bytes() {
                    [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                        Ok(StatusEntry::Class(u16::from(c - b'0')))
                    }
                    _ => Err(E::custom(format!(
                        "{text:?} is not a class of statuses such as \"2xx\""
                    ))),
                }
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

impl<'de> Visitor<'de> for StatusSetVisitor {
    type Value = StatusSet;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of statuses and classes, such as [\"2xx\", 304]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StatusSet, A::Error> {
        let mut set = StatusSet::none();
        while let Some(entry) = seq.next_element::<StatusEntry>()? {
            set.ranges.push(match entry {
                StatusEntry::Code(code) => (code, code),
                StatusEntry::Class(class) => (class * 100, class * 100 + 99),
            });
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in [
            "",
            "s",
            "30",
            "30 sec",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
