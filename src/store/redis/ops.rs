//! The store's operations, written for `lua/hold.lua` and `lua/budget.lua` (whose headers give
//! each one's shape), and their answers read back into the crate's types.

use super::keys::Keys;
use super::protocol::{Answer, Op, Writer, protocol};
use crate::claim::hex;
use crate::reservation::{Denial, DenialReason, Grant};
use crate::{
    Budget, BudgetStatus, Claim, Error, ErrorKind, HoldId, Refund, Reservation, Reserved, Settled,
    Settlement, Unique,
};

/// Which record a reserve writes: the id's own (`Home`), or another slot group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Home,
    Group,
}

/// A random number per reserve call, kept in the record: a call that meets its own record (its
/// request was sent again after a dropped connection) knows it is not another attempt's.
pub(crate) type Nonce = [u8; 8];

/// Everything a reserve of one record needs besides the reservation.
pub(crate) struct ReserveArgs<'a> {
    pub(crate) record: String,
    pub(crate) mode: Mode,
    /// The home's other groups' records (empty for a whole hold and for a group).
    pub(crate) groups: &'a [String],
    /// The claims this record holds, by index into the reservation.
    pub(crate) claims: &'a [usize],
    pub(crate) lease_ms: u64,
    pub(crate) nonce: &'a Nonce,
}

/// The limits of the claims at `indices`, as `check_claims` in `hold.lua` reads them: the first
/// claim's, and the others' packed (none when it is alone); 0 for a value claim (a record keeps
/// no limit).
fn limits(r: &Reservation, indices: &[usize]) -> (u64, Option<Vec<u8>>) {
    let limit = |i: usize| match &r.claims()[i] {
        Claim::Spend { budget, .. } => budget.limit(),
        _ => 0,
    };
    let first = indices.first().map_or(0, |&i| limit(i));
    let more = (indices.len() > 1).then(|| {
        let mut w = Writer::sequence();
        for &i in &indices[1..] {
            w.uint(limit(i));
        }
        w.into_bytes()
    });
    (first, more)
}

fn value_claim(claim: &Claim) -> (&'static str, &crate::Unique, &str) {
    match claim {
        Claim::Own { value, owner } => ("u", value, owner),
        Claim::ReleaseOnCommit { value, owner } => ("r", value, owner),
        Claim::Spend { .. } => unreachable!("a value claim"),
    }
}

/// A hold record's body: its claims (as settling reads them), its home's other groups, and a
/// home's list of every budget claim (see `common.lua`).
fn record_body(keys: &Keys, r: &Reservation, indices: &[usize], groups: &[String]) -> Vec<u8> {
    let spends: Vec<(&Budget, u64)> = if groups.is_empty() {
        Vec::new()
    } else {
        r.claims()
            .iter()
            .filter_map(|c| match c {
                Claim::Spend { budget, amount } => Some((budget, *amount)),
                _ => None,
            })
            .collect()
    };
    let mut w = Writer::sequence();
    w.uint(indices.len() as u64);
    for &i in indices {
        match &r.claims()[i] {
            Claim::Spend { budget, amount } => {
                w.str("b")
                    .str(&keys.budget(budget))
                    .uint(*amount)
                    .str(&budget.window().spec());
            }
            claim => {
                let (kind, value, owner) = value_claim(claim);
                w.str(kind).str(&keys.unique(value)).uint(0).str(owner);
            }
        }
    }
    if groups.is_empty() && spends.is_empty() {
        return w.into_bytes();
    }
    w.uint(groups.len() as u64).uint(spends.len() as u64);
    for g in groups {
        w.str(g);
    }
    for (budget, amount) in spends {
        w.str(&keys.budget(budget))
            .str(&budget.window().spec())
            .uint(amount);
    }
    w.into_bytes()
}

/// Op 1: reserve the claims at `a.claims` under one record.
pub(crate) fn reserve(keys: &Keys, r: &Reservation, a: &ReserveArgs<'_>) -> Op {
    let mut fp_nonce = [0; 16];
    fp_nonce[..8].copy_from_slice(&r.fingerprint()[..]);
    fp_nonce[8..].copy_from_slice(&a.nonce[..]);
    let mode = match (a.mode, a.groups.is_empty()) {
        (Mode::Home, true) => 1,
        (Mode::Home, false) => 2,
        (Mode::Group, _) => 3,
    };
    let (limit, more_limits) = limits(r, a.claims);
    let mut w = Writer::op(1);
    w.str(&a.record)
        .uint(a.lease_ms)
        .bytes(&fp_nonce)
        .uint(mode)
        .bytes(&record_body(keys, r, a.claims, a.groups))
        .uint(limit)
        .bytes_or_nil(more_limits.as_deref());
    w.done(a.record.clone(), a.claims.len().max(1))
}

/// Op 9: what reserving the claims at `indices` under `record` would answer now.
pub(crate) fn check(keys: &Keys, r: &Reservation, record: String, indices: &[usize]) -> Op {
    let (limit, more_limits) = limits(r, indices);
    let mut w = Writer::op(9);
    w.str(&record)
        .uint(r.lease().as_millis() as u64)
        .bytes(&r.fingerprint()[..])
        .bytes(&record_body(keys, r, indices, &[]))
        .uint(limit)
        .bytes_or_nil(more_limits.as_deref());
    w.done(record, indices.len().max(1))
}

/// How a record is settled, besides the settlement itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SettleArgs {
    /// How long the record is kept; 0 forgets it.
    pub(crate) keep_ms: u64,
    /// Whether actual amounts must each name a budget of this record (a whole hold, or a home).
    pub(crate) strict: bool,
    /// Whether a home's groups were made sure to outlive its commit.
    pub(crate) prepared: Prepared,
    /// This call's own: its retry is answered as it was, even after the record was forgotten.
    pub(crate) nonce: Nonce,
}

/// What a Cluster home knows of its groups when it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prepared {
    /// Nothing yet: a home with groups answers "prepare".
    No,
    /// Every group outlives the commit.
    Yes,
    /// A group has ended: the commit expires.
    GroupEnded,
    /// Every group has followed a settlement that forgets: the home, kept for them, goes.
    GroupsFollowed,
}

/// Op 2: settle one record.
pub(crate) fn settle(keys: &Keys, record: String, s: &Settlement, a: SettleArgs) -> Op {
    let prepared = match a.prepared {
        Prepared::No => "0",
        Prepared::Yes => "1",
        Prepared::GroupEnded => "x",
        Prepared::GroupsFollowed => "f",
    };
    let actuals = (!s.actual.is_empty()).then(|| {
        let mut w = Writer::sequence();
        w.uint(s.actual.len() as u64);
        for (budget, amount) in &s.actual {
            w.str(&keys.budget(budget))
                .str(&budget.window().spec())
                .uint(*amount);
        }
        w.into_bytes()
    });
    let mut w = Writer::op(2);
    w.str(&record)
        .bool(s.is_commit())
        .bool(a.strict)
        .str(prepared)
        .uint(a.keep_ms)
        .bytes_or_nil(s.memo.as_deref())
        .bytes_or_nil(actuals.as_deref())
        .bytes(&a.nonce[..]);
    w.done(record, 1)
}

/// Op 3: extend one record's lease to `lease_ms` from now; `at_least`: never shorten it.
pub(crate) fn extend(record: String, lease_ms: u64, at_least: bool) -> Op {
    let mut w = Writer::op(3);
    w.str(&record).uint(lease_ms).bool(at_least);
    w.done(record, 1)
}

/// Op 4: a home whose groups are all held is held.
pub(crate) fn mark(record: String, nonce: &Nonce) -> Op {
    let mut w = Writer::op(4);
    w.str(&record).bytes(&nonce[..]);
    w.done(record, 1)
}

/// Op 5: undo and remove this attempt's record of a denied reservation.
pub(crate) fn forget(record: String, nonce: &Nonce) -> Op {
    let mut w = Writer::op(5);
    w.str(&record).bytes(&nonce[..]);
    w.done(record, 1)
}

/// Op 6: read a budget.
pub(crate) fn budget(keys: &Keys, budget: &Budget) -> Op {
    let key = keys.budget(budget);
    let mut w = Writer::op(6);
    w.str(&key).str(&budget.window().spec());
    w.done(key, 1)
}

/// Op 7: set a budget's spent amount (`nonce`: this call's, so that its retry is not run twice;
/// in hex, as it names a key).
pub(crate) fn set_spent(keys: &Keys, budget: &Budget, spent: u64, nonce: &Nonce) -> Op {
    let key = keys.budget(budget);
    let mut w = Writer::op(7);
    w.str(&key)
        .str(&budget.window().spec())
        .uint(spent)
        .str(&hex(&nonce[..]));
    w.done(key, 1)
}

/// Op 8: a refund.
pub(crate) fn refund(keys: &Keys, r: &Refund) -> Op {
    let key = keys.budget(&r.budget);
    let mut w = Writer::op(8);
    w.str(&keys.refund(&r.budget, &r.id))
        .str(&key)
        .str(&r.budget.window().spec())
        .uint(r.window_at_ms.unwrap_or(0))
        .uint(r.amount)
        .bytes(&r.fingerprint()[..])
        .uint(r.retain.as_millis() as u64);
    w.done(key, 1)
}

/// Op 10: who owns a value.
pub(crate) fn owner(keys: &Keys, value: &Unique) -> Op {
    let key = keys.unique(value);
    let mut w = Writer::op(10);
    w.str(&key);
    w.done(key, 1)
}

/// Op 11: free a value (`nonce`: this call's, so that its retry is not run twice; in hex, as it
/// names a key).
pub(crate) fn remove(keys: &Keys, value: &Unique, nonce: &Nonce) -> Op {
    let key = keys.unique(value);
    let mut w = Writer::op(11);
    w.str(&key).str(&hex(&nonce[..]));
    w.done(key, 1)
}

pub(crate) fn owned_by(answer: &[u8]) -> Result<Option<String>, Error> {
    let a = Answer::read(answer)?;
    if a.len() == 0 {
        return Ok(None);
    }
    match a.word(0)? {
        "X" => Err(refusal(&a, &HoldId::random())),
        owner => Ok(Some(owner.to_owned())),
    }
}

pub(crate) fn removed(answer: &[u8]) -> Result<bool, Error> {
    let a = Answer::read(answer)?;
    if a.word(0).is_ok() {
        return Err(refusal(&a, &HoldId::random()));
    }
    Ok(a.int(0)? == 1)
}

/// Whether an answer says "not here": the operation's keys are served by another node.
pub(crate) fn is_moved(answer: &[u8]) -> bool {
    Answer::read(answer).is_ok_and(|a| a.len() == 1 && a.word(0).is_ok_and(|w| w == "M"))
}

/// The error an `{ 'E', why, memo? }` answer (or a script failure `{ 'X', message }`) stands for.
pub(crate) fn refusal(a: &Answer<'_>, id: &HoldId) -> Error {
    if a.word(0).is_ok_and(|w| w == "X") {
        let message = a.word(1).unwrap_or("?");
        return protocol(&format!("the script failed: {message}"));
    }
    let kind = match a.word(1) {
        Ok("conflict") => ErrorKind::Conflict,
        Ok("unknown") => ErrorKind::UnknownHold,
        Ok("expired") => ErrorKind::Expired,
        Ok("committed") => ErrorKind::Committed,
        Ok("released") => ErrorKind::Released,
        Ok("in_flight") | Ok("not_pending") => ErrorKind::InFlight,
        Ok("exceeds") => ErrorKind::ExceedsHold,
        Ok("exceeds_spent") => ErrorKind::ExceedsSpent,
        Ok("not_held") => {
            return Error::invalid(format!(
                "an actual amount names a budget that hold {id} does not spend from"
            ));
        }
        Ok("future") => return Error::invalid("a refund cannot go to a window still to come"),
        Ok(other) => return protocol(other),
        Err(e) => return e,
    };
    let memo = a.bytes(2);
    Error::refused(kind, id).with_memo(memo)
}

/// Reads a reserve's (or check's) answer for the claims at `indices`, mapped back to the
/// reservation's own order.
pub(crate) fn reserved(
    answer: &[u8],
    r: &Reservation,
    indices: &[usize],
) -> Result<Reserved, Error> {
    let a = Answer::read(answer)?;
    match a.word(0)? {
        "G" => {
            if a.len() != 3 + indices.len() {
                return Err(protocol("claim count"));
            }
            let mut remaining = vec![None; r.claims().len()];
            for (at, &i) in indices.iter().enumerate() {
                remaining[i] = u64::try_from(a.int(3 + at)?).ok();
            }
            Ok(Reserved::Granted(Grant {
                id: r.id().clone(),
                expires_at_ms: a.int(1)? as u64,
                remaining,
                replayed: a.int(2)? == 1,
            }))
        }
        "D" => {
            let claim = *usize::try_from(a.int(1)? - 1)
                .ok()
                .and_then(|at| indices.get(at))
                .ok_or_else(|| protocol("denied claim index"))?;
            let reason = match a.word(2)? {
                "budget" => {
                    let Claim::Spend { amount, .. } = &r.claims()[claim] else {
                        return Err(protocol("denied claim kind"));
                    };
                    DenialReason::OverBudget {
                        requested: *amount,
                        remaining: a.int(3)?.max(0) as u64,
                        resets_at_ms: u64::try_from(a.int(4)?).ok(),
                    }
                }
                "taken" => DenialReason::Taken,
                "not_owner" => DenialReason::NotOwner,
                other => return Err(protocol(other)),
            };
            Ok(Reserved::Denied(Denial { claim, reason }))
        }
        _ => Err(refusal(&a, r.id())),
    }
}

/// A settle's answer: how it went, and the home's other groups (to settle next).
pub(crate) struct SettleAnswer {
    pub(crate) result: Result<Settled, Error>,
    pub(crate) groups: Vec<String>,
    /// A home's commit waits for its groups to be made sure of (nothing changed yet).
    pub(crate) prepare: bool,
}

pub(crate) fn settled(answer: &[u8], id: &HoldId) -> Result<SettleAnswer, Error> {
    let a = Answer::read(answer)?;
    let groups = a.words(2)?;
    if a.word(0)? == "E" && a.word(1)? == "prepare" {
        return Ok(SettleAnswer {
            result: Err(Error::refused(ErrorKind::InFlight, id)),
            groups,
            prepare: true,
        });
    }
    let result = match a.word(0)? {
        "OK" => match a.word(1)? {
            "applied" => Ok(Settled::Applied),
            "replayed" => Ok(Settled::Replayed),
            "tombstoned" => Ok(Settled::Tombstoned),
            other => return Err(protocol(other)),
        },
        _ => Err(refusal(&a, id)),
    };
    Ok(SettleAnswer {
        result,
        groups,
        prepare: false,
    })
}

/// An extend's answer: the new lease end, and the home's other groups (to extend next).
pub(crate) fn extended(answer: &[u8], id: &HoldId) -> Result<(u64, Vec<String>), Error> {
    let a = Answer::read(answer)?;
    match a.word(0)? {
        "OK" => Ok((a.int(1)? as u64, a.words(2)?)),
        _ => Err(refusal(&a, id)),
    }
}

/// A plain `{ 'OK' }`, or the refusal it is instead.
pub(crate) fn ok(answer: &[u8], id: &HoldId) -> Result<(), Error> {
    let a = Answer::read(answer)?;
    match a.word(0)? {
        "OK" => Ok(()),
        _ => Err(refusal(&a, id)),
    }
}

/// The answer to a forget: whether it left the record alone because it is not the given-back
/// call's (another call's, a hold answered to a second call, or one settled since).
pub(crate) fn forgot(answer: &[u8], id: &HoldId) -> Result<bool, Error> {
    let a = Answer::read(answer)?;
    match (a.word(0)?, a.word(1)) {
        ("OK", Ok("kept")) => Ok(true),
        ("OK", _) => Ok(false),
        _ => Err(refusal(&a, id)),
    }
}

pub(crate) fn refunded(answer: &[u8], id: &HoldId) -> Result<Settled, Error> {
    let a = Answer::read(answer)?;
    match (a.word(0)?, a.word(1)) {
        ("OK", Ok("applied")) => Ok(Settled::Applied),
        ("OK", Ok("replayed")) => Ok(Settled::Replayed),
        _ => Err(refusal(&a, id)),
    }
}

pub(crate) fn budget_status(answer: &[u8], budget: &Budget) -> Result<BudgetStatus, Error> {
    let a = Answer::read(answer)?;
    if a.word(0).is_ok() {
        return Err(refusal(&a, &HoldId::random()));
    }
    Ok(BudgetStatus::new(
        budget.limit(),
        a.int(0)?.max(0) as u64,
        a.int(1)?.max(0) as u64,
        u64::try_from(a.int(2)?).ok(),
    ))
}
