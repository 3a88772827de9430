//! What the layer counts, through the `metrics` facade; the list, with labels and units, is in
//! [`ReserveLayer`](super::ReserveLayer)'s docs (*Metrics*).
//!
//! Every key a route can record is built once, the first time its layer sees the route, and
//! kept with the route ([`RouteMetrics`]), with the handle the recorder registered for it the
//! first time it was recorded ([`Registered`]): recording is then one update of that handle, with
//! no label vector built, no key hashed and no look-up in the recorder's registry (whose locks
//! and reference counts every thread would otherwise touch at every request).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use ::metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder, SharedString};
use http::Request;

use super::extract::RoutePattern;
use super::settle::Cause;
use crate::DenialReason;

/// What the `metrics` macros would say of a metric recorded from this module.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// `tower_reserve_reservations_total{outcome}`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Granted,
    Denied,
    InFlight,
    Conflict,
    Replayed,
    Settled,
    Invalid,
    Unavailable,
}

const OUTCOMES: [&str; 8] = [
    "granted",
    "denied",
    "in_flight",
    "conflict",
    "replayed",
    "settled",
    "invalid",
    "unavailable",
];

/// A store call, the `op` label.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Reserve,
    Check,
    Commit,
    Release,
}

const OPS: [&str; 4] = ["reserve", "check", "commit", "release"];

/// How a settlement went: the `result` label.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settling {
    Committed,
    Released,
    Expired,
    Failed,
}

const RESULTS: [&str; 4] = ["committed", "released", "expired", "failed"];

const REASONS: [&str; 3] = ["over_budget", "taken", "not_owner"];
const MODES: [&str; 2] = ["enforce", "shadow"];

fn reason_index(reason: &DenialReason) -> usize {
    match reason {
        DenialReason::OverBudget { .. } => 0,
        DenialReason::Taken => 1,
        DenialReason::NotOwner => 2,
    }
}

/// The `reason` label of a denial.
pub(crate) fn reason_label(reason: &DenialReason) -> &'static str {
    REASONS[reason_index(reason)]
}

/// Every key one route records, labelled by its route.
pub(crate) struct RouteMetrics {
    route: SharedString,
    reservations: [Registered<Counter>; OUTCOMES.len()],
    denials: [[Registered<Counter>; MODES.len()]; REASONS.len()],
    settlements: [[Registered<Counter>; Cause::ALL.len()]; RESULTS.len()],
    store_seconds: [Registered<Histogram>; OPS.len()],
    store_errors: [Registered<Counter>; OPS.len()],
}

/// A key, and the handle the first recorder it was recorded under registered for it.
///
/// The handle serves only that recorder: under any other (a test's local recorder, say), the key
/// is registered again at every call, as the `metrics` macros do. A recorder is told apart by its
/// address, which a global recorder keeps for the life of the process.
struct Registered<H> {
    key: Key,
    handle: OnceLock<(usize, H)>,
}

impl<H> From<Key> for Registered<H> {
    fn from(key: Key) -> Self {
        Self {
            key,
            handle: OnceLock::new(),
        }
    }
}

impl<H> Registered<H> {
    /// Runs `record` on the handle of the current recorder, registered by `register` the first
    /// time.
    fn with(&self, register: impl Fn(&dyn Recorder, &Key) -> H, record: impl FnOnce(&H)) {
        ::metrics::with_recorder(|recorder| {
            let address = std::ptr::from_ref(recorder).cast::<()>() as usize;
            match self.handle.get() {
                Some((at, handle)) if *at == address => record(handle),
                Some(_) => record(&register(recorder, &self.key)),
                None => {
                    let handle = register(recorder, &self.key);
                    record(&handle);
                    let _ = self.handle.set((address, handle));
                }
            }
        });
    }
}

impl Registered<Counter> {
    fn count(&self) {
        self.with(
            |recorder, key| recorder.register_counter(key, &METADATA),
            |counter| counter.increment(1),
        );
    }
}

impl Registered<Histogram> {
    fn record(&self, value: f64) {
        self.with(
            |recorder, key| recorder.register_histogram(key, &METADATA),
            |histogram| histogram.record(value),
        );
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RouteMetrics").field(&&*self.route).finish()
    }
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        // One shared string for every key: the label's text is not copied per key.
        let route = SharedString::from(Arc::<str>::from(route));
        let key = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            let mut all = vec![Label::new("route", route.clone())];
            all.extend(labels.iter().map(|&(k, v)| Label::from_static_parts(k, v)));
            Key::from_parts(name, all)
        };
        Self {
            reservations: OUTCOMES.map(|outcome| {
                key("tower_reserve_reservations_total", &[("outcome", outcome)]).into()
            }),
            denials: REASONS.map(|reason| {
                MODES.map(|mode| {
                    key(
                        "tower_reserve_denials_total",
                        &[("reason", reason), ("mode", mode)],
                    )
                    .into()
                })
            }),
            settlements: RESULTS.map(|result| {
                Cause::ALL.map(|cause| {
                    key(
                        "tower_reserve_settlements_total",
                        &[("result", result), ("cause", cause.label())],
                    )
                    .into()
                })
            }),
            store_seconds: OPS.map(|op| key("tower_reserve_store_seconds", &[("op", op)]).into()),
            store_errors: OPS
                .map(|op| key("tower_reserve_store_errors_total", &[("op", op)]).into()),
            route,
        }
    }

    /// The route's label: its pattern, or `unmatched`.
    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    pub(crate) fn reservation(&self, outcome: Outcome) {
        self.reservations[outcome as usize].count();
    }

    pub(crate) fn denial(&self, reason: &DenialReason, shadow: bool) {
        self.denials[reason_index(reason)][usize::from(shadow)].count();
    }

    pub(crate) fn settlement(&self, result: Settling, cause: Cause) {
        self.settlements[result as usize][cause as usize].count();
    }

    pub(crate) fn store_call(&self, op: Op, took: Duration, ok: bool) {
        self.store_seconds[op as usize].record(took.as_secs_f64());
        if !ok {
            self.store_errors[op as usize].count();
        }
    }
}

/// The [`RouteMetrics`] of every route one layer has seen, by route label. Route labels are
/// patterns (a router's, a [`Routes`](super::Routes) table's) or `unmatched`, never taken from
/// the request's own path: the map stays as small as the app's routes.
#[derive(Default)]
pub(crate) struct RouteTable {
    /// The first route seen: a layer put on one route (`route_layer`) sees no other, and finds
    /// it here without a lock.
    first: OnceLock<Arc<RouteMetrics>>,
    others: RwLock<HashMap<Box<str>, Arc<RouteMetrics>>>,
}

impl RouteTable {
    /// The metrics of the route `request` took.
    pub(crate) fn of<B>(&self, request: &Request<B>) -> Arc<RouteMetrics> {
        let route = route_of(request);
        let first = self
            .first
            .get_or_init(|| Arc::new(RouteMetrics::new(route)));
        if first.route() == route {
            return first.clone();
        }
        if let Some(metrics) = self
            .others
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
        {
            return metrics.clone();
        }
        self.others
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.into())
            .or_insert_with(|| Arc::new(RouteMetrics::new(route)))
            .clone()
    }
}

/// The route label of a request: its matched pattern, or `unmatched`.
fn route_of<B>(request: &Request<B>) -> &str {
    if let Some(RoutePattern(p)) = request.extensions().get::<RoutePattern>() {
        return p;
    }
    #[cfg(feature = "axum")]
    if let Some(p) = request.extensions().get::<axum::extract::MatchedPath>() {
        return p.as_str();
    }
    "unmatched"
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use ::metrics::{Counter, CounterFn, Gauge, Histogram, HistogramFn, KeyName, Recorder, Unit};

    /// Remembers every key registered, with the sum of what was recorded under it.
    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<Vec<(String, f64)>>>);

    struct Cell(Arc<Mutex<Vec<(String, f64)>>>, String);

    impl CounterFn for Cell {
        fn increment(&self, value: u64) {
            self.add(value as f64);
        }
        fn absolute(&self, _: u64) {}
    }

    impl HistogramFn for Cell {
        fn record(&self, value: f64) {
            self.add(value);
        }
    }

    impl Cell {
        fn add(&self, value: f64) {
            let mut seen = self.0.lock().unwrap();
            match seen.iter_mut().find(|(k, _)| *k == self.1) {
                Some((_, sum)) => *sum += value,
                None => seen.push((self.1.clone(), value)),
            }
        }
    }

    fn text(key: &Key) -> String {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    impl Recorder for Seen {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(Cell(self.0.clone(), text(key))))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Cell(self.0.clone(), text(key))))
        }
    }

    #[test]
    fn causes_are_listed_in_declaration_order() {
        for (i, cause) in Cause::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, i, "{cause:?}");
        }
    }

    /// A route's handles serve the recorder they were registered with; under another, each call
    /// reaches that recorder all the same.
    #[test]
    fn a_second_recorder_gets_what_is_recorded_under_it() {
        let (first, second) = (Seen::default(), Seen::default());
        let table = RouteTable::default();
        let route = table.of(&Request::new(()));
        let granted = || route.reservation(Outcome::Granted);
        ::metrics::with_local_recorder(&first, granted);
        ::metrics::with_local_recorder(&second, || {
            granted();
            granted();
            route.store_call(Op::Reserve, Duration::from_millis(500), true);
        });
        ::metrics::with_local_recorder(&first, granted);
        let sums = |seen: &Seen| seen.0.lock().unwrap().clone();
        let key = "tower_reserve_reservations_total{route=unmatched,outcome=granted}";
        assert_eq!(sums(&first), [(key.to_owned(), 2.0)]);
        assert_eq!(
            sums(&second),
            [
                (key.to_owned(), 2.0),
                (
                    "tower_reserve_store_seconds{route=unmatched,op=reserve}".to_owned(),
                    0.5
                )
            ]
        );
    }

    /// The keys built once per route carry the names and labels the docs list, and each call
    /// records under its own.
    #[test]
    fn each_call_records_under_its_documented_key() {
        let seen = Seen::default();
        ::metrics::with_local_recorder(&seen, || {
            let table = RouteTable::default();
            let mut request = Request::new(());
            request
                .extensions_mut()
                .insert(RoutePattern(Arc::from("/orders/{id}")));
            let route = table.of(&request);
            assert_eq!(route.route(), "/orders/{id}");
            route.reservation(Outcome::Granted);
            route.reservation(Outcome::Granted);
            route.reservation(Outcome::Unavailable);
            route.denial(&DenialReason::Taken, true);
            route.settlement(Settling::Expired, Cause::Lease);
            route.store_call(Op::Commit, Duration::from_millis(250), false);
            let other = table.of(&Request::new(()));
            assert_eq!(other.route(), "unmatched");
            other.settlement(Settling::Committed, Cause::Success);
            assert!(Arc::ptr_eq(&table.of(&request), &route));
            assert!(Arc::ptr_eq(&table.of(&Request::new(())), &other));
        });
        let mut seen = seen.0.lock().unwrap().clone();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let expected = [
            (
                "tower_reserve_denials_total{route=/orders/{id},reason=taken,mode=shadow}",
                1.0,
            ),
            (
                "tower_reserve_reservations_total{route=/orders/{id},outcome=granted}",
                2.0,
            ),
            (
                "tower_reserve_reservations_total{route=/orders/{id},outcome=unavailable}",
                1.0,
            ),
            (
                "tower_reserve_settlements_total{route=/orders/{id},result=expired,cause=lease}",
                1.0,
            ),
            (
                "tower_reserve_settlements_total{route=unmatched,result=committed,cause=success}",
                1.0,
            ),
            (
                "tower_reserve_store_errors_total{route=/orders/{id},op=commit}",
                1.0,
            ),
            (
                "tower_reserve_store_seconds{route=/orders/{id},op=commit}",
                0.25,
            ),
        ];
        let expected: Vec<(String, f64)> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        assert_eq!(seen, expected);
    }
}
