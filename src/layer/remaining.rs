//! Remaining-budget response headers, in the form of the IETF draft *RateLimit header fields for
//! HTTP* (draft-ietf-httpapi-ratelimit-headers): for each budget the request spent from, a quota
//! policy item (`RateLimit-Policy: "<route>";q=<limit>;qu="units";w=<window seconds>;pk=:<digest>:`)
//! and its state after this request (`RateLimit: "<route>";r=<remaining>;t=<seconds until the
//! window resets>;pk=:<digest>:`). A request refused over budget gets the same for the budget
//! that refused it.
//!
//! - The policy is named after the route (its pattern: `"/customers/{customer_id}/purchases"`;
//!   a second budget of the route is `"<route>#2"`, and so on), never after the budget's key,
//!   which is often an API key or a customer id.
//! - `pk`, the draft's partition key, tells budgets apart without naming them: 12 bytes of a
//!   SHA-256 digest of the key, as a Structured Field byte sequence.
//! - `qu="units"`: a budget counts in its own units (minor units of money, credits), not in
//!   requests (the draft's default unit).
//! - `w` and `t` are left out for a lifetime budget, and `w` for a calendar month (its length
//!   varies).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::settle::Hold;
use crate::store::now_ms;
use crate::{Budget, Claim, DenialReason, Settlement, Window};

static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static STATE: HeaderName = HeaderName::from_static("ratelimit");

/// Adds both headers for `hold`, as settled by `settlement`: what its budgets have left once the
/// unused part of a partial commit (or all of a release) is back.
pub(crate) fn insert(headers: &mut HeaderMap, hold: &Hold, settlement: &Settlement) {
    let now = now_ms();
    let mut items = Items::default();
    for (i, claim) in hold.claims().iter().enumerate() {
        let Claim::Spend { budget, .. } = claim else {
            continue;
        };
        let spent = if settlement.is_commit() {
            settlement.actual_for(budget.key(), &budget.window().spec())
        } else {
            Some(0)
        };
        let Some(remaining) = hold.remaining_after(i, spent) else {
            continue;
        };
        let ends = budget.window().slot(now).ends_at_ms;
        items.push(hold.route(), budget, remaining, ends, now);
    }
    items.insert(headers);
}

/// Adds both headers for the budget that refused a request (its `nth` budget claim, from 1):
/// what it has left, and when its window ends by the store that refused it.
pub(crate) fn insert_denied(
    headers: &mut HeaderMap,
    route: &str,
    nth: usize,
    budget: &Budget,
    reason: &DenialReason,
) {
    let DenialReason::OverBudget {
        remaining,
        resets_at_ms,
        ..
    } = *reason
    else {
        return;
    };
    let mut items = Items {
        n: nth - 1,
        ..Items::default()
    };
    items.push(route, budget, remaining, resets_at_ms, now_ms());
    items.insert(headers);
}

/// The items of both headers, one per budget.
#[derive(Default)]
struct Items {
    /// The budgets so far: the next is the route's `n + 1`th.
    n: usize,
    policy: Vec<String>,
    state: Vec<String>,
}

impl Items {
    /// `budget` of `route`, `remaining` left, its window ending at `ends` (Unix ms).
    fn push(&mut self, route: &str, budget: &Budget, remaining: u64, ends: Option<u64>, now: u64) {
        self.n += 1;
        let n = self.n;
        let route = match route {
            "unmatched" => "budget",
            route => route,
        };
        let name = if n == 1 {
            route.to_owned()
        } else {
            format!("{route}#{n}")
        };
        let name = sf_string(&name).unwrap_or_else(|| format!("\"budget#{n}\""));
        let pk = partition_key(budget.key());
        let mut p = format!("{name};q={};qu=\"units\"", budget.limit());
        match budget.window() {
            Window::Lifetime | Window::Month => {}
            Window::Day => p.push_str(";w=86400"),
            Window::Every(d) => p.push_str(&format!(";w={}", d.as_secs())),
        }
        p.push_str(&format!(";pk={pk}"));
        let mut s = format!("{name};r={remaining}");
        if let Some(ends) = ends {
            s.push_str(&format!(";t={}", ends.saturating_sub(now).div_ceil(1000)));
        }
        s.push_str(&format!(";pk={pk}"));
        self.policy.push(p);
        self.state.push(s);
    }

    fn insert(self, headers: &mut HeaderMap) {
        if self.policy.is_empty() {
            return;
        }
        if let (Ok(p), Ok(s)) = (
            HeaderValue::from_str(&self.policy.join(", ")),
            HeaderValue::from_str(&self.state.join(", ")),
        ) {
            headers.insert(POLICY.clone(), p);
            headers.insert(STATE.clone(), s);
        }
    }
}

/// The draft's partition key for a budget key: 12 bytes of its SHA-256 digest, as a Structured
/// Field byte sequence (`:<base64>:`). Budgets stay apart in a client's bookkeeping; the key
/// (an API key, a customer id) is not shown.
fn partition_key(key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"tower-reserve ratelimit partition key\0");
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    format!(":{}:", STANDARD.encode(&digest[..12]))
}

/// A Structured Field string (RFC 8941): printable ASCII, quoted, `"` and `\` escaped; `None` for
/// a key with anything else.
fn sf_string(key: &str) -> Option<String> {
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return None;
    }
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_are_byte_sequences_that_hide_the_key() {
        let pk = partition_key("customer:ann");
        assert!(
            pk.starts_with(':') && pk.ends_with(':') && pk.len() == 18,
            "{pk}"
        );
        assert!(!pk.contains("ann"));
        assert_eq!(pk, partition_key("customer:ann"));
        assert_ne!(pk, partition_key("customer:bob"));
    }

    #[test]
    fn keys_become_structured_field_strings() {
        assert_eq!(sf_string("customer:42").as_deref(), Some("\"customer:42\""));
        assert_eq!(sf_string("a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(sf_string("kundé"), None);
    }
}
