//! Request → claims: the strategy that works out what a request needs, and building blocks for it.
//!
//! # What the client is told
//!
//! Each helper answers a [`Rejection`] the client may see: `400` for a missing header, query or
//! path parameter, `415` for a body that is not JSON, `400` for malformed JSON, `422` for JSON of
//! the wrong shape. Their details name only what the client sent or should have sent (the
//! header's name, the JSON pointer); a JSON error keeps serde's words, which describe the
//! client's own input (`invalid type: string "x", expected u64 at line 1 column 12`). Nothing of
//! the server's internals (a store's error, which claim of the extractor failed) ever goes into a
//! client's problem: those go to the logs.
//!
//! The status is the helper's choice; the route may choose another with
//! [`Rejection::with_status`], e.g. `401` for a missing API key:
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use tower_reserve::{Budget, Claim, Extracted, MemoryStore, ReserveLayer, extract};
//!
//! let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
//!     let key = extract::header(&req, "x-api-key")
//!         .map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?
//!         .to_owned();
//!     Extracted::Ok((req, vec![Claim::spend(Budget::new(key, 1_000), 1)]))
//! });
//! # let _ = layer;
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use serde::Deserialize;
use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::BoxFuture;
use super::Rejection;
use crate::Claim;

/// What [`ExtractClaims`] answers: the request (handed on to the handler, extensions and all)
/// and its claims. No claims means the request is passed on without a reservation.
pub type Extracted = Result<(Request<Bytes>, Vec<Claim>), Rejection>;

/// Works out the claims of a request, asynchronously: a price lookup, a read-model query, a
/// per-customer limit may all take a call to another service.
///
/// The request comes with its body already read (within the layer's body limit); the extractor
/// gives the request back, so it can add extensions for the handler (a freshly minted account
/// id, say). Any closure `Fn(Request<Bytes>) -> impl Future<Output = Extracted>` is one:
///
/// ```
/// use tower_reserve::{Budget, Claim, Extracted, ReserveLayer, MemoryStore, extract};
/// use http::Request;
/// use bytes::Bytes;
///
/// let layer = ReserveLayer::new(MemoryStore::new(), |req: Request<Bytes>| async move {
///     let customer = extract::header(&req, "x-customer-id")?.to_owned();
///     let amount: u64 = extract::json_pointer(&req, "/amount_cents")?;
///     let claims = vec![Claim::spend(Budget::new(customer, 50_000), amount)];
///     Extracted::Ok((req, claims))
/// });
/// # let _ = layer;
/// ```
pub trait ExtractClaims: Send + Sync + 'static {
    /// The future that answers the claims.
    type Future: Future<Output = Extracted> + Send + 'static;

    /// Works out the claims of `request`.
    fn extract(&self, request: Request<Bytes>) -> Self::Future;
}

impl<F, Fut> ExtractClaims for F
where
    F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Extracted> + Send + 'static,
{
    type Future = Fut;

    fn extract(&self, request: Request<Bytes>) -> Fut {
        self(request)
    }
}

/// The route pattern a request matched, e.g. `/customers/{customer_id}/purchases`, as
/// [`Routes`] records it for [`path_param`]. Under axum, axum's `MatchedPath` serves instead.
#[derive(Debug, Clone)]
pub struct RoutePattern(pub Arc<str>);

/// A table of claim extractors keyed by method and route pattern, for one layer in front of a
/// plain hyper service. A request that matches no route passes through unreserved.
///
/// Patterns are `/`-separated; a segment `{name}` matches any one segment and is read back
/// with [`path_param`].
///
/// ```
/// use http::{Method, Request};
/// use bytes::Bytes;
/// use tower_reserve::{Budget, Claim, Extracted, Routes, extract};
///
/// let routes = Routes::new().route(
///     Method::POST,
///     "/customers/{customer_id}/purchases",
///     |req: Request<Bytes>| async move {
///         let customer = extract::path_param(&req, "customer_id")?.to_owned();
///         let amount: u64 = extract::json_pointer(&req, "/amount_cents")?;
///         Extracted::Ok((req, vec![Claim::spend(Budget::new(customer, 50_000), amount)]))
///     },
/// );
/// # let _ = routes;
/// ```
#[derive(Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

#[derive(Clone)]
struct Route {
    matcher: RouteMatch,
    extract: Arc<dyn Fn(Request<Bytes>) -> BoxFuture<Extracted> + Send + Sync>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|r| &r.matcher))
            .finish()
    }
}

impl Routes {
    /// An empty table: every request passes through.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route. The first route that matches a request is used.
    pub fn route(mut self, method: Method, pattern: &str, extract: impl ExtractClaims) -> Self {
        let extract = Arc::new(extract);
        self.routes.push(Route {
            matcher: RouteMatch::new(method, pattern),
            extract: Arc::new(move |req| Box::pin(extract.extract(req))),
        });
        self
    }
}

impl ExtractClaims for Routes {
    type Future = BoxFuture<Extracted>;

    fn extract(&self, mut request: Request<Bytes>) -> Self::Future {
        let route = self
            .routes
            .iter()
            .find(|r| r.matcher.matches(request.method(), request.uri().path()));
        match route {
            Some(route) => {
                route.matcher.mark(&mut request);
                (route.extract)(request)
            }
            None => Box::pin(std::future::ready(Ok((request, Vec::new())))),
        }
    }
}

/// A method and a route pattern: how [`Routes`] and a policy's routes alike pick the route of a
/// request, and record it for [`path_param`] and the metrics.
#[derive(Clone)]
pub(crate) struct RouteMatch {
    method: Method,
    pattern: Arc<str>,
}

impl std::fmt::Debug for RouteMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.pattern)
    }
}

impl RouteMatch {
    pub(crate) fn new(method: Method, pattern: &str) -> Self {
        Self {
            method,
            pattern: Arc::from(pattern),
        }
    }

    /// Whether a request with this method and path takes this route.
    pub(crate) fn matches(&self, method: &Method, path: &str) -> bool {
        self.method == method && pattern_matches(&self.pattern, path)
    }

    /// Whether a request with this method, which a router sent to its route `pattern`, takes
    /// this route.
    #[cfg_attr(not(all(feature = "axum", feature = "policy")), allow(dead_code))]
    pub(crate) fn is_route(&self, method: &Method, pattern: &str) -> bool {
        self.method == method && same_pattern(&self.pattern, pattern)
    }

    /// Records the route's pattern on a request that took it.
    pub(crate) fn mark<B>(&self, request: &mut Request<B>) {
        request
            .extensions_mut()
            .insert(RoutePattern(self.pattern.clone()));
    }
}

/// Checks a route pattern: it starts with `/`, and each `{name}` is a whole segment with a name
/// of letters, digits, `_` or `-`, used once. Answers the parameters' names in order.
#[cfg_attr(not(feature = "policy"), allow(dead_code))]
pub(crate) fn pattern_params(pattern: &str) -> Result<Vec<&str>, String> {
    if !pattern.starts_with('/') {
        return Err(format!("a route pattern starts with '/', not {pattern:?}"));
    }
    let mut names: Vec<&str> = Vec::new();
    for segment in pattern.split('/') {
        if is_param(segment) {
            let name = &segment[1..segment.len() - 1];
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "a path parameter's name is letters, digits, '_' or '-', not {name:?}"
                ));
            }
            if names.contains(&name) {
                return Err(format!("the path parameter {{{name}}} appears twice"));
            }
            names.push(name);
        } else if segment.contains(['{', '}']) {
            return Err(format!(
                "a path parameter is a whole segment such as {{name}}, not {segment:?}"
            ));
        }
    }
    Ok(names)
}

fn pattern_matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some(ps), Some(ss)) if is_param(ps) => {
                if ss.is_empty() {
                    return false;
                }
            }
            (Some(ps), Some(ss)) if ps == ss => {}
            _ => return false,
        }
    }
}

fn is_param(segment: &str) -> bool {
    segment.len() > 2 && segment.starts_with('{') && segment.ends_with('}')
}

/// Whether two route patterns match the same paths: the same segments, a parameter (whatever its
/// name) where the other has one.
pub(crate) fn same_pattern(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == y || (is_param(x) && is_param(y)) => {}
            _ => return false,
        }
    }
}

/// Whether a router's pattern hands every path under it to one service: a wildcard segment
/// (`/{*rest}`).
#[cfg_attr(not(all(feature = "axum", feature = "policy")), allow(dead_code))]
pub(crate) fn is_wildcard(pattern: &str) -> bool {
    pattern.split('/').any(|segment| segment.starts_with("{*"))
}

/// The pattern of the router's route that a request took (axum's `MatchedPath`), as it applies
/// to the request's path: inside a nested router, whose requests come with the nesting prefix
/// stripped, without that prefix.
#[cfg(feature = "axum")]
pub(crate) fn router_pattern<B>(request: &Request<B>) -> Option<&str> {
    let matched = request
        .extensions()
        .get::<axum::extract::MatchedPath>()?
        .as_str();
    let Some(nested) = request.extensions().get::<axum::extract::NestedPath>() else {
        return Some(matched);
    };
    match matched.strip_prefix(nested.as_str()) {
        Some("") => Some("/"),
        Some(rest) if rest.starts_with('/') => Some(rest),
        _ => Some(matched),
    }
}

fn route_pattern<B>(request: &Request<B>) -> Option<&str> {
    if let Some(RoutePattern(p)) = request.extensions().get::<RoutePattern>() {
        return Some(p);
    }
    #[cfg(feature = "axum")]
    if let Some(p) = router_pattern(request) {
        return Some(p);
    }
    None
}

/// The path segment named `{name}` in the route pattern the request matched (from [`Routes`] or
/// axum's `MatchedPath`); `400` when the segment is empty.
///
/// A route that knows no pattern, or whose pattern has no `{name}`, is the server's mistake, not
/// the client's: `500`, with a plain detail for the client and the cause in the logs.
///
/// ```
/// use http::Request;
/// use tower_reserve::extract::{path_param, RoutePattern};
///
/// let mut req = Request::post("/customers/c-42/purchases").body(()).unwrap();
/// req.extensions_mut().insert(RoutePattern("/customers/{id}/purchases".into()));
/// assert_eq!(path_param(&req, "id").unwrap(), "c-42");
/// assert_eq!(path_param(&req, "order").unwrap_err().status(), 500);
/// ```
pub fn path_param<'a, B>(request: &'a Request<B>, name: &str) -> Result<&'a str, Rejection> {
    let misconfigured = |why: &str| {
        tracing::error!(parameter = name, path = request.uri().path(), "{why}");
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal server error",
            "the server could not read this route's parameters",
        )
    };
    let pattern = route_pattern(request).ok_or_else(|| {
        misconfigured("no route pattern is known to read the path parameter from (use Routes or axum's routing)")
    })?;
    let index = pattern
        .split('/')
        .position(|segment| {
            segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) == Some(name)
        })
        .ok_or_else(|| misconfigured("the route's pattern has no such path parameter"))?;
    request
        .uri()
        .path()
        .split('/')
        .nth(index)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Rejection::bad_request(format!("the path parameter {name} is missing")))
}

/// A header's value as text; `400` when it is missing or not visible ASCII. Another status for
/// the route (`401` for a missing API key) is one [`Rejection::with_status`] away:
/// `extract::header(&req, "x-api-key").map_err(|r| r.with_status(StatusCode::UNAUTHORIZED))?`.
pub fn header<'a, B>(request: &'a Request<B>, name: &str) -> Result<&'a str, Rejection> {
    request
        .headers()
        .get(name)
        .ok_or_else(|| Rejection::bad_request(format!("the header {name} is missing")))?
        .to_str()
        .map_err(|_| Rejection::bad_request(format!("the header {name} is not visible ASCII")))
}

/// A query parameter, percent-decoded; `400` when it is missing.
pub fn query<B>(request: &Request<B>, name: &str) -> Result<String, Rejection> {
    let query = request.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| Rejection::bad_request(format!("the query parameter {name} is missing")))
}

/// The body as JSON of type `T`: `415` when the request does not say it is JSON, `400` when
/// the body is not JSON, `422` when it is JSON of the wrong shape.
pub fn json<T: DeserializeOwned>(request: &Request<Bytes>) -> Result<T, Rejection> {
    require_json(request)?;
    serde_json::from_slice(request.body()).map_err(body_error)
}

/// The value at a JSON pointer (RFC 6901) in the body, as type `T`; errors as [`json`], and `422`
/// when the pointer finds nothing or a value of another type.
///
/// Only the values on the pointer's path are looked into; nothing else of the body is built.
///
/// ```
/// use bytes::Bytes;
/// use http::Request;
/// use tower_reserve::extract::json_pointer;
///
/// let req = Request::post("/")
///     .header("content-type", "application/json")
///     .body(Bytes::from_static(br#"{"order": {"lines": [{"cents": 250}]}}"#))
///     .unwrap();
/// let cents: u64 = json_pointer(&req, "/order/lines/0/cents").unwrap();
/// assert_eq!(cents, 250);
/// assert_eq!(json_pointer::<u64>(&req, "/order/total").unwrap_err().status(), 422);
/// ```
pub fn json_pointer<T: DeserializeOwned>(
    request: &Request<Bytes>,
    pointer: &str,
) -> Result<T, Rejection> {
    require_json(request)?;
    let nothing = || Rejection::unprocessable(format!("the body has nothing at {pointer}"));
    let mut value: &RawValue = serde_json::from_slice(request.body()).map_err(body_error)?;
    if !pointer.is_empty() {
        let tokens = pointer.strip_prefix('/').ok_or_else(nothing)?;
        for token in tokens.split('/') {
            let token = if token.contains('~') {
                Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(token)
            };
            value = step(value, &token).ok_or_else(nothing)?;
        }
    }
    serde_json::from_str(value.get())
        .map_err(|e| Rejection::unprocessable(format!("the value at {pointer}: {e}")))
}

fn require_json<B>(request: &Request<B>) -> Result<(), Rejection> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_media_type);
    if is_json {
        Ok(())
    } else {
        Err(Rejection::unsupported_media_type(
            "expected a body with content-type application/json",
        ))
    }
}

/// `application/json` or `application/<anything>+json`, parameters aside (RFC 6838, 6839). Only
/// the essence matters here, so it is compared in place rather than parsed into a `Mime`.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.as_bytes();
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case(b"json")
            || (subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json")))
}

fn body_error(e: serde_json::Error) -> Rejection {
    match e.classify() {
        serde_json::error::Category::Data => Rejection::unprocessable(e.to_string()),
        _ => Rejection::bad_request(format!("the body is not valid JSON: {e}")),
    }
}

/// One step of a JSON pointer: an object's member or an array's element.
fn step<'a>(value: &'a RawValue, token: &str) -> Option<&'a RawValue> {
    let text = value.get().trim_start();
    match text.as_bytes().first()? {
        b'{' => Member(token)
            .deserialize(&mut serde_json::Deserializer::from_str(text))
            .ok()?,
        b'[' => {
            // RFC 6901: "0", or digits without a leading zero.
            if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
                return None;
            }
            let index: usize = token.parse().ok()?;
            let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            items.get(index).copied()
        }
        _ => None,
    }
}

/// Finds one member of a JSON object, skipping the others without building them.
struct Member<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The last of duplicate members wins, as with `serde_json::Value`.
        let mut found = None;
        while let Some(Key(key)) = map.next_key()? {
            if key == self.0 {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &'static str) -> Request<Bytes> {
        Request::post("/")
            .header("content-type", "application/json")
            .body(Bytes::from_static(json.as_bytes()))
            .unwrap()
    }

    #[test]
    fn json_pointers_find_what_serde_json_value_finds() {
        let doc = r#" { "a": {"b": [10, {"c/d": 1, "e~f": 2}], "b": [30]}, "": 5, "q": "x\"y", "dup": 1, "dup": 2 } "#;
        let value: serde_json::Value = serde_json::from_str(doc).unwrap();
        let req = body(doc);
        for pointer in [
            "",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c~1d",
            "/a/b/1/e~0f",
            "/",
            "/q",
            "/dup",
            "/a/b/2",
            "/a/b/01",
            "/a/b/-",
            "/a/x",
            "a",
            "/q/0",
            "/a/b/1/c/d",
        ] {
            let ours = json_pointer::<serde_json::Value>(&req, pointer).ok();
            assert_eq!(ours.as_ref(), value.pointer(pointer), "{pointer:?}");
        }
        let escaped = body(r#"{"k\u0065y": 7}"#);
        assert_eq!(json_pointer::<u64>(&escaped, "/key").unwrap(), 7);
        assert_eq!(
            json_pointer::<u64>(&body("{"), "/a").unwrap_err().status(),
            400
        );
        assert_eq!(
            json_pointer::<u64>(&body(r#"{"a": "x"}"#), "/a")
                .unwrap_err()
                .status(),
            422
        );
    }

    #[test]
    fn json_media_types() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/problem+json ",
            "application/vnd.api+json;v=1",
        ] {
            assert!(is_json_media_type(yes), "{yes}");
        }
        for no in [
            "text/json",
            "application/jsonx",
            "application/+jsonp",
            "json",
            "",
            "application/",
        ] {
            assert!(!is_json_media_type(no), "{no}");
        }
    }

    #[test]
    fn patterns_match_by_segment() {
        assert!(pattern_matches("/a/{id}/b", "/a/42/b"));
        assert!(!pattern_matches("/a/{id}/b", "/a//b"));
        assert!(!pattern_matches("/a/{id}/b", "/a/42/b/c"));
        assert!(!pattern_matches("/a/{id}", "/b/42"));
        assert!(pattern_matches("/healthz", "/healthz"));
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(pattern_params("/a/{id}/b/{x_2}").unwrap(), ["id", "x_2"]);
        assert_eq!(pattern_params("/").unwrap(), Vec::<&str>::new());
        for bad in [
            "a/{id}",
            "/a/{id}/{id}",
            "/a/x{id}",
            "/a/{}",
            "/a/{i d}",
            "/a/}",
        ] {
            assert!(pattern_params(bad).is_err(), "{bad}");
        }
    }
}
