//! Settling a hold (commit, whole or in part, or release), and refunds after a commit.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::claim::MAX_AMOUNT;
use crate::{Budget, Error, HoldId};

/// The longest a settled record (or a refund's) may be kept: 30 days.
pub const MAX_RETAIN: Duration = Duration::from_secs(30 * 86_400);

/// The largest memo a record may keep: 1 MiB.
pub const MAX_MEMO: usize = 1 << 20;

/// How a hold ends: committed, whole or for the amounts the command really used, or released;
/// and how long its record is kept afterwards so that retries get the same answer.
///
/// ```
/// use tower_reserve::{Budget, Settlement};
///
/// let budget = Budget::new("api-key-7", 1_000_000);
/// // Held the most the job may cost; it used 1 234 credits: that much is spent, the rest goes
/// // back, in one step.
/// let settle = Settlement::commit().actual(&budget, 1_234);
/// # let _ = settle;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub(crate) commit: bool,
    pub(crate) actual: Vec<(Budget, u64)>,
    pub(crate) memo: Option<Bytes>,
    pub(crate) keep: Keep,
}

/// How long a settled record is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// The store's retention period.
    Default,
    /// This long.
    For(Duration),
    /// Not at all: nobody can ask for this hold again.
    Forget,
}

impl Settlement {
    /// Commits the hold: held amounts become spent (all of them, unless [`Settlement::actual`]
    /// says otherwise), held values become owned, release-on-commit values are freed.
    pub fn commit() -> Self {
        Self {
            commit: true,
            actual: Vec::new(),
            memo: None,
            keep: Keep::Default,
        }
    }

    /// Releases the hold: everything it holds goes back.
    pub fn release() -> Self {
        Self {
            commit: false,
            ..Self::commit()
        }
    }

    /// Commits `amount` of the hold's claim on `budget` instead of all of it: that much becomes
    /// spent, the rest of what was held goes back, in the same step. `0` spends nothing of that
    /// budget (the hold's other claims still commit).
    ///
    /// An amount above what was held is refused with
    /// [`ErrorKind::ExceedsHold`](crate::ErrorKind::ExceedsHold) and changes nothing: a command
    /// that needs more than it reserved reserves the difference as a hold of its own (which is
    /// checked against the limit like any other) and commits both.
    pub fn actual(mut self, budget: &Budget, amount: u64) -> Self {
        self.actual.push((budget.clone(), amount));
        self
    }

    /// Keeps `memo` with the settled record, for as long as the record is kept: a reserve that
    /// retries the id is refused with an error that carries it ([`Error::memo`]). The layer keeps
    /// a request's response here for idempotency keys.
    pub fn memo(mut self, memo: impl Into<Bytes>) -> Self {
        self.memo = Some(memo.into());
        self
    }

    /// Keeps the settled record this long (default: the store's retention period), so that a
    /// retried commit, release or reserve gets the same answer.
    pub fn retain(mut self, retain: Duration) -> Self {
        self.keep = Keep::For(retain);
        self
    }

    /// Drops the record as soon as the hold is settled: for a hold that nobody can ask for again
    /// (the layer's own holds, whose ids it generated). A retry then finds no hold.
    pub fn forget(mut self) -> Self {
        self.keep = Keep::Forget;
        self
    }

    /// Whether this commits.
    pub fn is_commit(&self) -> bool {
        self.commit
    }

    /// The retention this asks for, given the store's default: `None` to forget at once.
    pub(crate) fn retain_for(&self, default: Duration) -> Option<Duration> {
        match self.keep {
            Keep::Default => Some(default),
            Keep::For(d) => Some(d),
            Keep::Forget => None,
        }
    }

    /// Checks everything a store can check without the record.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !self.commit && !self.actual.is_empty() {
            return Err(Error::invalid("only a commit can name actual amounts"));
        }
        for (i, (budget, amount)) in self.actual.iter().enumerate() {
            budget.validate()?;
            if *amount > MAX_AMOUNT {
                return Err(Error::invalid(format!(
                    "actual amount {amount} is above {MAX_AMOUNT}"
                )));
            }
            if self.actual[..i].iter().any(|(b, _)| same_budget(b, budget)) {
                return Err(Error::invalid("two actual amounts for one budget"));
            }
        }
        if let Keep::For(d) = self.keep {
            check_retain(d)?;
        }
        if self.memo.as_ref().is_some_and(|m| m.len() > MAX_MEMO) {
            return Err(Error::invalid(format!(
                "a memo is at most {MAX_MEMO} bytes"
            )));
        }
        Ok(())
    }

    /// The actual amount named for the budget with this key and window spec, if any.
    pub(crate) fn actual_for(&self, key: &str, spec: &str) -> Option<u64> {
        self.actual
            .iter()
            .find(|(b, _)| b.key() == key && b.window().spec() == spec)
            .map(|(_, amount)| *amount)
    }
}

/// Whether two budgets are one stored budget: one key, one window (the limit is the caller's).
pub(crate) fn same_budget(a: &Budget, b: &Budget) -> bool {
    a.key() == b.key() && a.window() == b.window()
}

pub(crate) fn check_retain(retain: Duration) -> Result<(), Error> {
    if retain < Duration::from_millis(1) || retain > MAX_RETAIN {
        return Err(Error::invalid("a retention must be 1 ms to 30 days"));
    }
    Ok(())
}

/// Gives an amount back to a budget after it was spent: an order cancelled after its purchase
/// committed, say. A refund is a new movement of its own, as a reversing transfer is, never an
/// undoing of the commit: its caller says how much (its system of record knows what the order
/// cost), and its id makes a retried refund count once.
///
/// ```
/// use tower_reserve::{Budget, HoldId, Refund};
///
/// let budget = Budget::new("customer-42", 50_000);
/// let refund = Refund::new(HoldId::new("refund-order-77").unwrap(), budget, 2_000);
/// # let _ = refund;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub(crate) id: HoldId,
    pub(crate) budget: Budget,
    pub(crate) amount: u64,
    pub(crate) window_at_ms: Option<u64>,
    pub(crate) retain: Duration,
}

/// How long a refund's record is kept by default, so that a retry counts once: 24 hours.
pub const DEFAULT_REFUND_RETAIN: Duration = Duration::from_secs(86_400);

impl Refund {
    /// Gives `amount` back to `budget`'s current window; `id` names the refund.
    pub fn new(id: HoldId, budget: Budget, amount: u64) -> Self {
        Self {
            id,
            budget,
            amount,
            window_at_ms: None,
            retain: DEFAULT_REFUND_RETAIN,
        }
    }

    /// Gives it back to the window that `at` falls in (the purchase's time, say) instead of the
    /// current one. A window that has already ended gets nothing
    /// ([`ErrorKind::Expired`](crate::ErrorKind::Expired)).
    pub fn in_window_of(mut self, at: SystemTime) -> Self {
        self.window_at_ms = Some(
            at.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        );
        self
    }

    /// Keeps the refund's record this long (default [`DEFAULT_REFUND_RETAIN`]): a retry within
    /// it counts once.
    pub fn retain(mut self, retain: Duration) -> Self {
        self.retain = retain;
        self
    }

    /// The refund's id.
    pub fn id(&self) -> &HoldId {
        &self.id
    }

    /// The budget it gives back to.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The amount it gives back.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        self.budget.validate()?;
        if self.amount == 0 || self.amount > MAX_AMOUNT {
            return Err(Error::invalid(format!(
                "a refund is 1 to {MAX_AMOUNT}, not {}",
                self.amount
            )));
        }
        check_retain(self.retain)
    }

    /// What a retry with the same id must repeat: the budget (key and window) and the amount.
    pub(crate) fn fingerprint(&self) -> [u8; 8] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.budget.key().as_bytes(),
            self.budget.window().spec().as_bytes(),
            &self.amount.to_be_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let mut digest = [0; 8];
        digest.copy_from_slice(&h.finalize()[..8]);
        digest
    }
}
