//! Stores: where holds live.
//!
//! A [`Store`] checks and holds every claim of a [`Reservation`] in one atomic step, then
//! commits or releases the hold by id. Two stores share one semantics, held together by one
//! behaviour suite:
//!
//! - [`MemoryStore`]: embedded, for one process; the default where no Redis is configured.
//! - [`RedisStore`]: Redis, for many processes; one call of one Lua function per operation,
//!   operations sent together in batches.

use std::future::Future;
use std::time::Duration;

use crate::{
    Budget, BudgetStatus, Error, HoldId, Refund, Reservation, Reserved, Settled, Settlement, Unique,
};

mod clock;
mod memory;
mod redis;

pub use self::memory::MemoryStore;
pub(crate) use self::memory::{embedded, now_ms};
pub use self::redis::{BatchStats, RedisStore, RedisStoreBuilder};

/// How long a settled record (or a tombstone) is kept by default, so that a retried commit,
/// release or reserve still gets the right answer.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(600);

/// How many expired buckets of holds of one budget a call clears at most. Work per call stays
/// bounded; a budget with more than this is cleared over the next calls, and until then counts
/// too much as held, never too little.
pub(crate) const MAX_EXPIRED_PER_CALL: usize = 64;

/// Holds are counted per bucket of lease ends this wide (`BUCKET_MS` in `lua/common.lua`), so a
/// budget keeps one entry per bucket, not one per hold in flight. An expired hold's capacity
/// comes back when its bucket ends: at most this long after its lease.
pub(crate) const HOLD_BUCKET_MS: u64 = 100;

/// A place that holds reservations. See the [crate docs](crate#semantics) for the semantics every
/// store implements.
///
/// Stores are cheap handles: clones share one state.
pub trait Store: Clone + Send + Sync + 'static {
    /// Checks every claim and holds them all, or none.
    ///
    /// A retry with the same id and claims answers the same hold (`replayed`); with other claims
    /// it is [`ErrorKind::Conflict`](crate::ErrorKind::Conflict). After the hold was committed,
    /// released or expired, a retry is [`Committed`](crate::ErrorKind::Committed),
    /// [`Released`](crate::ErrorKind::Released) or [`Expired`](crate::ErrorKind::Expired), with
    /// the settlement's memo ([`Error::memo`]) while the record is kept.
    fn reserve(
        &self,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<Reserved, Error>> + Send;

    /// Answers what [`Store::reserve`] would answer now, holding and writing nothing (shadow
    /// mode: watch what limits would refuse before enforcing them). A retry of a known id is
    /// answered as a replay.
    fn check(
        &self,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<Reserved, Error>> + Send;

    /// Commits or releases a hold, as `settlement` says. Idempotent: settling again the same way
    /// answers [`Settled::Replayed`] while the record is kept. A commit is refused once the lease
    /// has run out; a release before the reserve leaves a tombstone that refuses it.
    fn settle(
        &self,
        id: &HoldId,
        settlement: &Settlement,
    ) -> impl Future<Output = Result<Settled, Error>> + Send;

    /// Makes a hold permanent: held becomes spent, values become owned, release-on-commit values
    /// are freed. Idempotent. Refused once the lease has run out.
    fn commit(&self, id: &HoldId) -> impl Future<Output = Result<Settled, Error>> + Send {
        async move { self.settle(id, &Settlement::commit()).await }
    }

    /// Gives a hold back. Idempotent; before the reserve arrives it leaves a tombstone that
    /// refuses it.
    fn release(&self, id: &HoldId) -> impl Future<Output = Result<Settled, Error>> + Send {
        async move { self.settle(id, &Settlement::release()).await }
    }

    /// Renews a live hold's lease to `lease` from now; answers the new end in Unix milliseconds.
    fn extend(
        &self,
        id: &HoldId,
        lease: Duration,
    ) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Gives an amount back to a budget after it was spent; see [`Refund`]. Idempotent by the
    /// refund's id.
    fn refund(&self, refund: &Refund) -> impl Future<Output = Result<Settled, Error>> + Send;

    /// The budget's current window as it stands now.
    fn budget(&self, budget: &Budget) -> impl Future<Output = Result<BudgetStatus, Error>> + Send;

    /// Sets the spent amount of the budget's current window, e.g. from the system of record.
    fn set_spent(
        &self,
        budget: &Budget,
        spent: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Who owns `value`, if anyone (holds in flight are not ownership).
    fn owner(&self, value: &Unique) -> impl Future<Output = Result<Option<String>, Error>> + Send;

    /// Frees an owned value at once, whoever owns it; answers whether it was owned.
    ///
    /// A hold that has the value in flight keeps it: nobody else can claim it until that hold
    /// ends, its commit makes the value its owner's (again, for an owner that claimed what it
    /// owned), and its release leaves it free.
    fn remove(&self, value: &Unique) -> impl Future<Output = Result<bool, Error>> + Send;
}

pub(crate) fn check_set_spent(budget: &Budget, spent: u64) -> Result<(), Error> {
    budget.validate()?;
    if spent > crate::MAX_AMOUNT {
        return Err(Error::invalid(format!(
            "spent {spent} is above {}",
            crate::MAX_AMOUNT
        )));
    }
    Ok(())
}
