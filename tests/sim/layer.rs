//! The simulator through the layer: keyed requests (`Idempotency-Key`) from two callers over a
//! few keys, handlers that answer, fail or commit their own hold, retries across the store's
//! retention and the key's `keep_for`, against a model of what the layer promises: a key's first
//! response replayed to its caller for as long as it is kept, its handler run once and its
//! amount charged once, another body under it refused, and one caller's key never answering
//! another caller. On Redis some requests are sent while the server is paused past the store's
//! time limit: a 503 must leave nothing held and the key free.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tower::{Layer, ServiceExt};
use tower_reserve::{
    Budget, Claim, Extracted, Hold, Idempotency, RequestBody, ReserveLayer, extract,
};

use crate::run::system_ms;
use support::{Advance, fresh};

const CALLERS: [&str; 2] = ["alice", "bob"];
const KEYS: usize = 3;
const LIMIT: u64 = 100;
const KEEP_MS: u64 = 8_000;
pub const RETAIN_MS: u64 = 2_000;

#[derive(Debug, Clone)]
enum Op {
    Request {
        caller: usize,
        key: usize,
        /// `ok`: answers 200; `self`: commits its own hold, then answers 200; `bad`: 400;
        /// `headers`: 200 with the largest body a kept response may have, and 5 KiB of headers.
        mode: &'static str,
        amount: u64,
        /// Sent while Redis is paused (`CLIENT PAUSE`) past the store's time limit: its
        /// reservation lands after the layer answered 503.
        paused: bool,
    },
    Advance(u64),
}

/// What a key's first request left, in its caller's scope.
#[derive(Debug, Clone)]
struct Kept {
    amount: u64,
    status: u16,
    body: Bytes,
    /// The record is kept `keep_for` from its settle, some instant of the first request's
    /// call: until somewhere in `[until_lo, until_hi]`.
    until_lo: u64,
    until_hi: u64,
    /// Whether the response fits what a record keeps.
    whole: bool,
}

#[derive(Debug, Default)]
struct Model {
    spent: [u64; 2],
    kept: BTreeMap<(usize, usize), Kept>,
}

fn op(rng: &mut StdRng, pauses: bool) -> Op {
    if rng.random_bool(0.2) {
        let choices = [RETAIN_MS + 200, KEEP_MS + 200, 1_000, RETAIN_MS / 2];
        return Op::Advance(choices[rng.random_range(0..choices.len())]);
    }
    Op::Request {
        caller: if rng.random_bool(0.7) { 0 } else { 1 },
        key: rng.random_range(0..KEYS),
        mode: ["ok", "ok", "self", "self", "bad", "headers"][rng.random_range(0..6)],
        amount: [10, 30][rng.random_range(0..2)],
        paused: pauses && rng.random_bool(0.04),
    }
}

/// How long a pause lasts: past the store's time limit (`STORE_TIMEOUT_MS`).
const PAUSE_MS: u64 = 800;
pub const STORE_TIMEOUT_MS: u64 = 300;

/// One case: a fresh store and service, `steps` operations; answers the history so far and
/// what went wrong.
/// `redis`: the port of the store's Redis, to pause it.
pub async fn case<S: Advance>(
    store: S,
    seed: u64,
    steps: usize,
    redis: Option<u16>,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let tag = fresh("layer");
    let budgets: Vec<Budget> = CALLERS
        .iter()
        .map(|c| Budget::new(format!("{tag}-{c}"), LIMIT))
        .collect();
    let claims_budgets = budgets.clone();
    let runs = Arc::new(AtomicU64::new(0));
    let handler_runs = runs.clone();
    let svc = ReserveLayer::new(store.clone(), move |req: Request<Bytes>| {
        let budgets = claims_budgets.clone();
        async move {
            let caller = extract::header(&req, "x-caller")?;
            let i = CALLERS.iter().position(|c| *c == caller).unwrap_or(0);
            let amount: u64 = extract::json_pointer(&req, "/amount")?;
            Extracted::Ok((req, vec![Claim::spend(budgets[i].clone(), amount)]))
        }
    })
    .idempotency(
        Idempotency::new()
            .keep_for(Duration::from_millis(KEEP_MS))
            .max_body(tower_reserve::MAX_MEMO),
    )
    .layer(tower::service_fn(move |req: Request<RequestBody>| {
        let runs = handler_runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let mode = req.headers()["x-mode"].to_str().unwrap_or("").to_owned();
            let status = match mode.as_str() {
                "self" => {
                    let hold = req.extensions().get::<Hold>().expect("a hold").clone();
                    hold.commit().await.expect("the handler's own commit");
                    StatusCode::OK
                }
                "bad" => StatusCode::BAD_REQUEST,
                _ => StatusCode::OK,
            };
            let mut text = format!("run-{n}");
            if mode == "headers" {
                // A body as large as a kept response may be, and headers on top of it.
                text.push_str(&" ".repeat(tower_reserve::MAX_MEMO - 4 * 1024 - text.len()));
            }
            let mut response = Response::new(Full::new(Bytes::from(text)));
            *response.status_mut() = status;
            if mode == "headers" {
                let pad = http::HeaderValue::from_str(&"x".repeat(5 * 1024)).expect("a value");
                response.headers_mut().insert("x-pad", pad);
            }
            Ok::<_, Infallible>(response)
        }
    }));

    let mut model = Model::default();
    let mut shift = 0u64;
    let mut history = Vec::new();
    for step in 0..steps {
        let op = op(&mut rng, redis.is_some());
        let now = system_ms() + shift;
        let (caller, key, mode, amount, paused) = match op {
            Op::Advance(by) => {
                store.advance(Duration::from_millis(by)).await;
                shift += by;
                history.push(format!("{step}: clock +{by} ms"));
                continue;
            }
            Op::Request {
                caller,
                key,
                mode,
                amount,
                paused,
            } => (caller, key, mode, amount, paused),
        };
        // Two callers share key names unless told not to (to look past a shared scope).
        let key_name = if crate::generate::without("shared-keys") {
            format!("{tag}-{caller}-k{key}")
        } else {
            format!("{tag}-k{key}")
        };
        let req = Request::post("/pay")
            .header("idempotency-key", key_name)
            .header("x-caller", CALLERS[caller])
            .header("x-mode", mode)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(r#"{{"amount":{amount}}}"#))))
            .expect("a request");
        let paused_until = match (paused, redis) {
            (true, Some(port)) => {
                let _ = tokio::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLIENT", "PAUSE"])
                    .arg(PAUSE_MS.to_string())
                    .arg("WRITE")
                    .output()
                    .await;
                Some(std::time::Instant::now() + Duration::from_millis(PAUSE_MS + 150))
            }
            _ => None,
        };
        let before = runs.load(Ordering::SeqCst);
        let response = svc.clone().oneshot(req).await.expect("infallible");
        let after = system_ms() + shift;
        if let Some(until) = paused_until {
            // What the pause held back lands now.
            tokio::time::sleep_until(until.into()).await;
        }
        let ran = runs.load(Ordering::SeqCst) - before;
        let status = response.status().as_u16();
        let replayed = response.headers().contains_key("idempotency-replayed");
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]);
        history.push(format!(
            "{step}: {op:?} -> {status} {shown:?}{} (handler runs: {ran})",
            if replayed { " replayed" } else { "" }
        ));
        let fail = |what: String, history: &[String]| {
            Err(format!(
                "step {step}: {what}\n--- history:\n{}",
                history.join("\n")
            ))
        };
        if status == 503 && ran == 0 {
            // The store did not answer in time: nothing ran, nothing may stay held, and the
            // key may be used again at once.
            if !paused {
                return fail("503 without a fault".into(), &history);
            }
        } else if let Some(r) = check(
            &mut model, caller, key, mode, amount, status, replayed, ran, &body, now, after,
        ) {
            return fail(r, &history);
        }
        for (i, b) in budgets.iter().enumerate() {
            let mut s = store.budget(b).await.expect("a budget read");
            // After a 503 the layer gives back what landed late, in the background: allow it
            // a moment (bounded).
            for _ in 0..20 {
                if !paused || (s.spent == model.spent[i] && s.held == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                s = store.budget(b).await.expect("a budget read");
            }
            if s.spent != model.spent[i] || s.held != 0 {
                return fail(
                    format!(
                        "{}'s budget: spent {} held {}, model spent {} held 0 (charged twice or not at all, or a hold nobody knows)",
                        CALLERS[i], s.spent, s.held, model.spent[i]
                    ),
                    &history,
                );
            }
        }
    }
    Ok(())
}

/// Judges one answered request against the model; answers what is wrong, if anything.
#[allow(clippy::too_many_arguments)]
fn check(
    model: &mut Model,
    caller: usize,
    key: usize,
    mode: &str,
    amount: u64,
    status: u16,
    replayed: bool,
    ran: u64,
    body: &Bytes,
    now: u64,
    after: u64,
) -> Option<String> {
    {
        // The model: the caller's own key, while kept. Where the key's end falls within the
        // call, the store's answer says which side it fell on.
        let kept = model.kept.get(&(caller, key)).filter(|k| {
            if k.until_lo > after {
                true
            } else if k.until_hi <= now {
                false
            } else {
                replayed || status == 422
            }
        });
        match kept {
            Some(k) if k.amount == amount => {
                // A response that could not be kept answers 409, never runs again.
                let unavailable = !k.whole && status == 409 && ran == 0;
                let replay = replayed && status == k.status && *body == k.body && ran == 0;
                if !(replay || unavailable) {
                    return Some(format!(
                        "a retry must replay {} {:?} without running the handler",
                        k.status, k.body
                    ));
                }
            }
            Some(_) => {
                if status != 422 || ran != 0 {
                    return Some("a key reused with another body must be 422".into());
                }
            }
            None => {
                let left = LIMIT - model.spent[caller];
                if amount > left {
                    if status != 403 || ran != 0 {
                        return Some(format!("{amount} over what is left ({left}) must be 403"));
                    }
                } else {
                    let want = if mode == "bad" { 400 } else { 200 };
                    let other = 1 - caller;
                    if model.kept.get(&(other, key)).is_some_and(|k| {
                        k.until_hi > now && (k.amount != amount || k.body == *body)
                    }) && (replayed || status == 422)
                    {
                        return Some(format!(
                            "{} was answered from {}'s key (another caller's response, or 422): keys must not let one client see another's result",
                            CALLERS[caller], CALLERS[other]
                        ));
                    }
                    if replayed || status != want || ran != 1 {
                        return Some(format!(
                            "a first request (or one after its key's keep_for, or after a 503) must run its handler once and answer {want}"
                        ));
                    }
                    if want == 200 {
                        model.spent[caller] += amount;
                    }
                    model.kept.insert(
                        (caller, key),
                        Kept {
                            amount,
                            status,
                            body: body.clone(),
                            // A response with more headers than a memo keeps may not be kept:
                            // its retry may then answer 409 (but never run again).
                            whole: mode != "headers",
                            until_lo: now + KEEP_MS,
                            until_hi: after + KEEP_MS,
                        },
                    );
                }
            }
        }
    }
    None
}
