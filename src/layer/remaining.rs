//! Remaining-budget response headers, in the form of the IETF draft *RateLimit header fields for
//! HTTP* (draft-ietf-httpapi-ratelimit-headers): for each budget the request spent from, a policy
//! item (`RateLimit-Policy: "<key>";q=<limit>;w=<window seconds>`) and its state after this
//! request (`RateLimit: "<key>";r=<remaining>;t=<seconds until the window resets>`). The quota
//! unit is the budget's own (minor units of money, credits), not requests; `w` and `t` are left
//! out for a lifetime budget, and `w` for a calendar month (its length varies).

use http::{HeaderMap, HeaderName, HeaderValue};

use super::settle::Hold;
use crate::store::now_ms;
use crate::{Claim, Settlement, Window};

static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static STATE: HeaderName = HeaderName::from_static("ratelimit");

/// Adds both headers for `hold`, as settled by `settlement`: what its budgets have left once the
/// unused part of a partial commit (or all of a release) is back.
pub(crate) fn insert(headers: &mut HeaderMap, hold: &Hold, settlement: &Settlement) {
    let now = now_ms();
    let mut policy = Vec::new();
    let mut state = Vec::new();
    for (i, claim) in hold.claims().iter().enumerate() {
        let (Claim::Spend { budget, amount }, Some(left)) = (claim, hold.remaining()[i]) else {
            continue;
        };
        let spent = if settlement.is_commit() {
            settlement
                .actual_for(budget.key(), &budget.window().spec())
                .unwrap_or(*amount)
        } else {
            0
        };
        let remaining = (left + (amount - spent)).min(budget.limit());
        let name = sf_string(budget.key()).unwrap_or_else(|| format!("\"budget-{i}\""));
        let ends = budget.window().slot(now).ends_at_ms;
        let mut p = format!("{name};q={}", budget.limit());
        match budget.window() {
            Window::Lifetime | Window::Month => {}
            Window::Day => p.push_str(";w=86400"),
            Window::Every(d) => p.push_str(&format!(";w={}", d.as_secs())),
        }
        let mut s = format!("{name};r={remaining}");
        if let Some(ends) = ends {
            s.push_str(&format!(";t={}", ends.saturating_sub(now).div_ceil(1000)));
        }
        policy.push(p);
        state.push(s);
    }
    if policy.is_empty() {
        return;
    }
    if let (Ok(p), Ok(s)) = (
        HeaderValue::from_str(&policy.join(", ")),
        HeaderValue::from_str(&state.join(", ")),
    ) {
        headers.insert(POLICY.clone(), p);
        headers.insert(STATE.clone(), s);
    }
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
    fn keys_become_structured_field_strings() {
        assert_eq!(sf_string("customer:42").as_deref(), Some("\"customer:42\""));
        assert_eq!(sf_string("a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(sf_string("kundé"), None);
    }
}
