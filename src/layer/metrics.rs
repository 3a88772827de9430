//! What the layer counts, through the `metrics` facade; the list, with labels and units, is in
//! [`ReserveLayer`](super::ReserveLayer)'s docs (*Metrics*).

use std::sync::Arc;
use std::time::Duration;

pub(crate) use ::metrics::SharedString;
use http::Request;

use super::extract::RoutePattern;

/// The route label of a request: its matched pattern, or `unmatched`.
pub(crate) fn route_of<B>(request: &Request<B>) -> SharedString {
    if let Some(RoutePattern(p)) = request.extensions().get::<RoutePattern>() {
        return SharedString::from(Arc::clone(p));
    }
    #[cfg(feature = "axum")]
    if let Some(p) = request.extensions().get::<axum::extract::MatchedPath>() {
        return SharedString::from(p.as_str().to_owned());
    }
    SharedString::const_str("unmatched")
}

pub(crate) fn reservation(route: &SharedString, outcome: &'static str) {
    metrics::counter!("tower_reserve_reservations_total", "route" => route.clone(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn denial(route: &SharedString, reason: &'static str, shadow: bool) {
    let mode = if shadow { "shadow" } else { "enforce" };
    metrics::counter!("tower_reserve_denials_total", "route" => route.clone(), "reason" => reason, "mode" => mode)
        .increment(1);
}

pub(crate) fn settlement(route: &SharedString, result: &'static str, cause: &'static str) {
    metrics::counter!("tower_reserve_settlements_total", "route" => route.clone(), "result" => result, "cause" => cause)
        .increment(1);
}

/// Whether a store call failed as a store (it could not be reached, or answered something not
/// understood), rather than answered about the request: a replayed or reused key, a hold that
/// ended. Only the former counts as a store error, so that clients cannot set off its alerts.
pub(crate) fn is_store_fault(err: &crate::Error) -> bool {
    matches!(
        err.kind(),
        crate::ErrorKind::Unavailable | crate::ErrorKind::Protocol
    )
}

pub(crate) fn store_call(route: &SharedString, op: &'static str, took: Duration, ok: bool) {
    metrics::histogram!("tower_reserve_store_seconds", "route" => route.clone(), "op" => op)
        .record(took.as_secs_f64());
    if !ok {
        metrics::counter!("tower_reserve_store_errors_total", "route" => route.clone(), "op" => op)
            .increment(1);
    }
}
