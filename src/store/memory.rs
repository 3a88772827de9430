//! The embedded store: one process, the same semantics as Redis.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{DEFAULT_RETAIN, HOLD_BUCKET_MS, MAX_EXPIRED_PER_CALL, Store, check_set_spent};
use crate::reservation::{Denial, DenialReason, Fingerprint, Grant};
use crate::{
    Budget, BudgetStatus, Claim, Error, ErrorKind, HoldId, Reservation, Reserved, Settled, Unique,
};

/// How long a windowed budget outlives its window (and its last hold), as in Redis.
const WINDOW_GRACE_MS: u64 = 60_000;

/// An in-memory [`Store`] for a single process: the default where no Redis is configured.
///
/// Leases run on the wall clock; expired holds give their capacity back on the next call that
/// touches their budget, and settled records are dropped after the retention period, so memory
/// follows what is in flight, not history.
///
/// ```
/// use tower_reserve::{Budget, Claim, MemoryStore, Reservation, Reserved, Store};
///
/// # tokio_test_block_on(async {
/// let store = MemoryStore::new();
/// let budget = Budget::new("customer-42", 50_000);
/// let reservation = Reservation::builder()
///     .claim(Claim::spend(budget.clone(), 2_000))
///     .build()?;
/// let Reserved::Granted(hold) = store.reserve(&reservation).await? else { panic!() };
/// store.commit(&hold.id).await?;
/// assert_eq!(store.budget(&budget).await?.spent, 2_000);
/// # Ok::<_, tower_reserve::Error>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    retain_ms: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store that keeps settled records for [`DEFAULT_RETAIN`].
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            retain_ms: DEFAULT_RETAIN.as_millis() as u64,
        }
    }

    /// Keeps settled records and tombstones for `retain` instead.
    pub fn retain(mut self, retain: Duration) -> Self {
        self.retain_ms = retain.as_millis() as u64;
        self
    }

    fn lock(&self) -> (MutexGuard<'_, State>, u64) {
        // A panic while the lock is held cannot leave a half-applied change behind: every
        // operation checks everything before it writes. So a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        state.drop_expired(now);
        (state, now)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type BudgetKey = (String, String);

#[derive(Default, Debug)]
struct State {
    budgets: HashMap<BudgetKey, BudgetCell>,
    owners: HashMap<String, String>,
    /// Values held by a hold in flight: the hold and when its lease ends.
    pending: HashMap<String, (HoldId, u64)>,
    records: HashMap<HoldId, Record>,
    deadlines: BinaryHeap<Reverse<(u64, Expiring)>>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Expiring {
    Record(HoldId),
    Pending(String),
    Budget(BudgetKey),
}

#[derive(Default, Debug)]
struct BudgetCell {
    spent: u64,
    held: u64,
    /// The amount held per bucket of lease ends, by the bucket's end (see `store/lua/common.lua`).
    buckets: BTreeMap<u64, u64>,
    drop_at: Option<u64>,
}

/// The end of the bucket of lease ends that `expires_at` falls in.
fn bucket(expires_at: u64) -> u64 {
    expires_at.div_ceil(HOLD_BUCKET_MS) * HOLD_BUCKET_MS
}

impl BudgetCell {
    /// Gives back the buckets whose end has passed (a bounded number per call).
    fn expire_buckets(&mut self, now: u64) {
        for _ in 0..MAX_EXPIRED_PER_CALL {
            match self.buckets.first_key_value() {
                Some((end, _)) if *end <= now => {
                    let (_, sum) = self.buckets.pop_first().expect("first exists");
                    self.held -= sum;
                }
                _ => break,
            }
        }
    }

    /// Holds `amount` until `expires_at`.
    fn hold_in(&mut self, expires_at: u64, amount: u64) {
        *self.buckets.entry(bucket(expires_at)).or_default() += amount;
        self.held += amount;
    }

    /// Takes a hold out of its bucket: true when it was still held, false when its bucket's end
    /// has passed and the bucket is (now) given back whole. At most once per hold.
    fn take_out(&mut self, expires_at: u64, amount: u64, now: u64) -> bool {
        let end = bucket(expires_at);
        if end <= now {
            if let Some(sum) = self.buckets.remove(&end) {
                self.held -= sum;
            }
            return false;
        }
        if let Some(sum) = self.buckets.get_mut(&end) {
            *sum -= amount;
            if *sum == 0 {
                self.buckets.remove(&end);
            }
        }
        self.held -= amount;
        true
    }

    fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.spent).saturating_sub(self.held)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Held,
    Committed,
    Released,
    Tombstone,
    Expired,
}

#[derive(Debug)]
struct Record {
    phase: Phase,
    expires_at: u64,
    fingerprint: Fingerprint,
    claims: Vec<Resolved>,
    drop_at: u64,
}

#[derive(Debug)]
enum Resolved {
    Spend {
        key: BudgetKey,
        amount: u64,
        limit: u64,
        /// When the budget's window ends; `None` for a lifetime budget.
        window_ends: Option<u64>,
    },
    Own {
        key: String,
        owner: String,
        already_owned: bool,
    },
    ReleaseOnCommit {
        key: String,
        owner: String,
    },
}

fn unique_key(value: &Unique) -> String {
    format!("{}:{}", value.namespace(), value.digest_hex())
}

fn budget_key(budget: &Budget, suffix: String) -> BudgetKey {
    (budget.key().to_owned(), suffix)
}

impl State {
    fn drop_expired(&mut self, now: u64) {
        for _ in 0..MAX_EXPIRED_PER_CALL {
            match self.deadlines.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => return,
            }
            let Reverse((at, what)) = self.deadlines.pop().expect("peeked");
            // Deadlines are pushed again when they move; only the current one removes.
            match what {
                Expiring::Record(id) => {
                    if self.records.get(&id).is_some_and(|r| r.drop_at == at) {
                        self.records.remove(&id);
                    }
                }
                Expiring::Pending(key) => {
                    if self.pending.get(&key).is_some_and(|(_, exp)| *exp == at) {
                        self.pending.remove(&key);
                    }
                }
                Expiring::Budget(key) => {
                    if self
                        .budgets
                        .get(&key)
                        .is_some_and(|b| b.drop_at == Some(at))
                    {
                        self.budgets.remove(&key);
                    }
                }
            }
        }
    }

    fn push_record(&mut self, id: HoldId, record: Record) {
        self.deadlines
            .push(Reverse((record.drop_at, Expiring::Record(id.clone()))));
        self.records.insert(id, record);
    }

    fn keep_budget_until(&mut self, key: &BudgetKey, at: u64) {
        if let Some(cell) = self.budgets.get_mut(key) {
            if cell.drop_at.is_some_and(|d| d >= at) {
                return;
            }
            cell.drop_at = Some(at);
            self.deadlines
                .push(Reverse((at, Expiring::Budget(key.clone()))));
        }
    }

    fn settle_record(&mut self, id: &HoldId, phase: Phase, now: u64, retain_ms: u64) {
        let drop_at = now + retain_ms;
        if let Some(record) = self.records.get_mut(id) {
            record.phase = phase;
            record.drop_at = drop_at;
            self.deadlines
                .push(Reverse((drop_at, Expiring::Record(id.clone()))));
        }
    }

    /// Gives back whatever the hold still holds.
    fn undo(&mut self, id: &HoldId, now: u64) {
        let Some(record) = self.records.get(id) else {
            return;
        };
        for claim in &record.claims {
            match claim {
                Resolved::Spend { key, amount, .. } => {
                    if let Some(cell) = self.budgets.get_mut(key) {
                        cell.take_out(record.expires_at, *amount, now);
                    }
                }
                Resolved::Own {
                    key,
                    already_owned: false,
                    ..
                } => {
                    if self.pending.get(key).is_some_and(|(h, _)| h == id) {
                        self.pending.remove(key);
                    }
                }
                Resolved::Own { .. } | Resolved::ReleaseOnCommit { .. } => {}
            }
        }
    }

    fn apply_commit(&mut self, id: &HoldId, now: u64) {
        let Some(record) = self.records.get(id) else {
            return;
        };
        for claim in &record.claims {
            match claim {
                Resolved::Spend { key, amount, .. } => {
                    if let Some(cell) = self.budgets.get_mut(key)
                        && cell.take_out(record.expires_at, *amount, now)
                    {
                        cell.spent = cell.spent.saturating_add(*amount);
                    }
                }
                Resolved::Own {
                    key,
                    owner,
                    already_owned,
                } => {
                    if !already_owned {
                        self.owners.insert(key.clone(), owner.clone());
                        if self.pending.get(key).is_some_and(|(h, _)| h == id) {
                            self.pending.remove(key);
                        }
                    }
                }
                Resolved::ReleaseOnCommit { key, owner } => {
                    if self.owners.get(key) == Some(owner) {
                        self.owners.remove(key);
                    }
                }
            }
        }
    }

    fn replay(&self, record_id: &HoldId, reservation: &Reservation) -> Grant {
        let record = &self.records[record_id];
        let remaining = record
            .claims
            .iter()
            .map(|claim| match claim {
                Resolved::Spend { key, limit, .. } => Some(
                    self.budgets
                        .get(key)
                        .map_or(*limit, |cell| cell.remaining(*limit)),
                ),
                _ => None,
            })
            .collect();
        Grant {
            id: reservation.id().clone(),
            expires_at_ms: record.expires_at,
            remaining,
            replayed: true,
        }
    }
}

impl MemoryStore {
    fn reserve_sync(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        let (mut state, now) = self.lock();
        let id = reservation.id();
        if let Some(record) = state.records.get(id) {
            let same = &record.fingerprint == reservation.fingerprint();
            let refuse = match record.phase {
                _ if record.phase != Phase::Tombstone && !same => ErrorKind::Conflict,
                Phase::Held if now >= record.expires_at => ErrorKind::Expired,
                Phase::Held => return Ok(Reserved::Granted(state.replay(id, reservation))),
                Phase::Committed => ErrorKind::Committed,
                Phase::Released | Phase::Tombstone => ErrorKind::Released,
                Phase::Expired => ErrorKind::Expired,
            };
            return Err(Error::refused(refuse, id));
        }

        // Check every claim before writing anything.
        let mut resolved = Vec::with_capacity(reservation.claims().len());
        let mut remaining = Vec::with_capacity(reservation.claims().len());
        for (i, claim) in reservation.claims().iter().enumerate() {
            let deny = |reason| Ok(Reserved::Denied(Denial { claim: i, reason }));
            match claim {
                Claim::Spend { budget, amount } => {
                    let slot = budget.window().slot(now);
                    let key = budget_key(budget, slot.suffix);
                    let left = match state.budgets.get_mut(&key) {
                        Some(cell) => {
                            cell.expire_buckets(now);
                            cell.remaining(budget.limit())
                        }
                        None => budget.limit(),
                    };
                    if *amount > left {
                        return deny(DenialReason::OverBudget {
                            requested: *amount,
                            remaining: left,
                        });
                    }
                    remaining.push(Some(left - amount));
                    resolved.push(Resolved::Spend {
                        key,
                        amount: *amount,
                        limit: budget.limit(),
                        window_ends: slot.ends_at_ms,
                    });
                }
                Claim::Own { value, owner } => {
                    let key = unique_key(value);
                    let owned = state.owners.get(&key);
                    if owned.is_some_and(|o| o != owner)
                        || state
                            .pending
                            .get(&key)
                            .is_some_and(|(h, exp)| *exp > now && h != id)
                    {
                        return deny(DenialReason::Taken);
                    }
                    remaining.push(None);
                    resolved.push(Resolved::Own {
                        already_owned: owned.is_some(),
                        key,
                        owner: owner.clone(),
                    });
                }
                Claim::ReleaseOnCommit { value, owner } => {
                    let key = unique_key(value);
                    if state.owners.get(&key) != Some(owner) {
                        return deny(DenialReason::NotOwner);
                    }
                    remaining.push(None);
                    resolved.push(Resolved::ReleaseOnCommit {
                        key,
                        owner: owner.clone(),
                    });
                }
            }
        }

        let expires_at = now + reservation.lease().as_millis() as u64;
        for claim in &resolved {
            match claim {
                Resolved::Spend {
                    key,
                    amount,
                    window_ends,
                    ..
                } => {
                    state
                        .budgets
                        .entry(key.clone())
                        .or_default()
                        .hold_in(expires_at, *amount);
                    if let Some(ends) = window_ends {
                        state.keep_budget_until(key, (*ends).max(expires_at) + WINDOW_GRACE_MS);
                    }
                }
                Resolved::Own {
                    key,
                    already_owned: false,
                    ..
                } => {
                    state.pending.insert(key.clone(), (id.clone(), expires_at));
                    state
                        .deadlines
                        .push(Reverse((expires_at, Expiring::Pending(key.clone()))));
                }
                Resolved::Own { .. } | Resolved::ReleaseOnCommit { .. } => {}
            }
        }
        state.push_record(
            id.clone(),
            Record {
                phase: Phase::Held,
                expires_at,
                fingerprint: *reservation.fingerprint(),
                claims: resolved,
                drop_at: expires_at + self.retain_ms,
            },
        );
        Ok(Reserved::Granted(Grant {
            id: id.clone(),
            expires_at_ms: expires_at,
            remaining,
            replayed: false,
        }))
    }

    fn commit_sync(&self, id: &HoldId) -> Result<Settled, Error> {
        let (mut state, now) = self.lock();
        let Some(record) = state.records.get(id) else {
            return Err(Error::refused(ErrorKind::UnknownHold, id));
        };
        match record.phase {
            Phase::Committed => return Ok(Settled::Replayed),
            Phase::Released | Phase::Tombstone => {
                return Err(Error::refused(ErrorKind::Released, id));
            }
            Phase::Expired => return Err(Error::refused(ErrorKind::Expired, id)),
            Phase::Held => {}
        }
        if now >= record.expires_at {
            state.undo(id, now);
            state.settle_record(id, Phase::Expired, now, self.retain_ms);
            return Err(Error::refused(ErrorKind::Expired, id));
        }
        state.apply_commit(id, now);
        state.settle_record(id, Phase::Committed, now, self.retain_ms);
        Ok(Settled::Applied)
    }

    fn release_sync(&self, id: &HoldId) -> Result<Settled, Error> {
        let (mut state, now) = self.lock();
        let Some(record) = state.records.get(id) else {
            state.push_record(
                id.clone(),
                Record {
                    phase: Phase::Tombstone,
                    expires_at: now,
                    fingerprint: Fingerprint::default(),
                    claims: Vec::new(),
                    drop_at: now + self.retain_ms,
                },
            );
            return Ok(Settled::Tombstoned);
        };
        match record.phase {
            Phase::Committed => Err(Error::refused(ErrorKind::Committed, id)),
            Phase::Released | Phase::Tombstone | Phase::Expired => Ok(Settled::Replayed),
            Phase::Held => {
                state.undo(id, now);
                state.settle_record(id, Phase::Released, now, self.retain_ms);
                Ok(Settled::Applied)
            }
        }
    }

    fn extend_sync(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        crate::reservation::check_lease(lease)?;
        let (mut state, now) = self.lock();
        let Some(record) = state.records.get_mut(id) else {
            return Err(Error::refused(ErrorKind::UnknownHold, id));
        };
        match record.phase {
            Phase::Committed => return Err(Error::refused(ErrorKind::Committed, id)),
            Phase::Released | Phase::Tombstone => {
                return Err(Error::refused(ErrorKind::Released, id));
            }
            Phase::Expired => return Err(Error::refused(ErrorKind::Expired, id)),
            Phase::Held if now >= record.expires_at => {
                return Err(Error::refused(ErrorKind::Expired, id));
            }
            Phase::Held => {}
        }
        let old = record.expires_at;
        let new = now + lease.as_millis() as u64;
        record.expires_at = new;
        record.drop_at = new + self.retain_ms;
        let drop_at = record.drop_at;
        let claims = std::mem::take(&mut record.claims);
        for claim in &claims {
            match claim {
                Resolved::Spend {
                    key,
                    amount,
                    window_ends,
                    ..
                } => {
                    if let Some(cell) = state.budgets.get_mut(key) {
                        cell.take_out(old, *amount, now);
                        cell.hold_in(new, *amount);
                    }
                    if window_ends.is_some() {
                        state.keep_budget_until(key, new + WINDOW_GRACE_MS);
                    }
                }
                Resolved::Own {
                    key,
                    already_owned: false,
                    ..
                } if state.pending.get(key).is_some_and(|(h, _)| h == id) => {
                    state.pending.insert(key.clone(), (id.clone(), new));
                    state
                        .deadlines
                        .push(Reverse((new, Expiring::Pending(key.clone()))));
                }
                _ => {}
            }
        }
        let record = state.records.get_mut(id).expect("present");
        record.claims = claims;
        state
            .deadlines
            .push(Reverse((drop_at, Expiring::Record(id.clone()))));
        Ok(new)
    }

    fn budget_sync(&self, budget: &Budget) -> Result<BudgetStatus, Error> {
        budget.validate()?;
        let (mut state, now) = self.lock();
        let slot = budget.window().slot(now);
        let key = budget_key(budget, slot.suffix);
        let (spent, held) = match state.budgets.get_mut(&key) {
            Some(cell) => {
                cell.expire_buckets(now);
                (cell.spent, cell.held)
            }
            None => (0, 0),
        };
        Ok(BudgetStatus::new(
            budget.limit(),
            spent,
            held,
            slot.ends_at_ms,
        ))
    }

    fn set_spent_sync(&self, budget: &Budget, spent: u64) -> Result<(), Error> {
        check_set_spent(budget, spent)?;
        let (mut state, now) = self.lock();
        let slot = budget.window().slot(now);
        let key = budget_key(budget, slot.suffix);
        state.budgets.entry(key.clone()).or_default().spent = spent;
        if let Some(ends) = slot.ends_at_ms {
            state.keep_budget_until(&key, ends + WINDOW_GRACE_MS);
        }
        Ok(())
    }

    fn owner_sync(&self, value: &Unique) -> Result<Option<String>, Error> {
        value.validate()?;
        let (state, _) = self.lock();
        Ok(state.owners.get(&unique_key(value)).cloned())
    }

    fn remove_sync(&self, value: &Unique) -> Result<bool, Error> {
        value.validate()?;
        let (mut state, _) = self.lock();
        Ok(state.owners.remove(&unique_key(value)).is_some())
    }
}

impl Store for MemoryStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        self.reserve_sync(reservation)
    }

    async fn commit(&self, id: &HoldId) -> Result<Settled, Error> {
        self.commit_sync(id)
    }

    async fn release(&self, id: &HoldId) -> Result<Settled, Error> {
        self.release_sync(id)
    }

    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        self.extend_sync(id, lease)
    }

    async fn budget(&self, budget: &Budget) -> Result<BudgetStatus, Error> {
        self.budget_sync(budget)
    }

    async fn set_spent(&self, budget: &Budget, spent: u64) -> Result<(), Error> {
        self.set_spent_sync(budget, spent)
    }

    async fn owner(&self, value: &Unique) -> Result<Option<String>, Error> {
        self.owner_sync(value)
    }

    async fn remove(&self, value: &Unique) -> Result<bool, Error> {
        self.remove_sync(value)
    }
}
