//! The embedded store: one process, the same semantics as Redis.
//!
//! State is split into shards by slot (the same slots that place keys on a Redis Cluster), each
//! behind its own lock, so that budgets, values and holds of unrelated keys never wait for each
//! other. A hold whose id the builder generated lives in the shard of its first claim, so a
//! reservation whose claims share a shard takes one lock. An operation that spans shards locks
//! them in ascending order. Expiry is bounded per call, and every deadline sits in its shard's
//! ordered set, from which settling removes it: nothing on the request path grows with history.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::clock::Clock;
use super::{DEFAULT_RETAIN, HOLD_BUCKET_MS, MAX_EXPIRED_PER_CALL, Store, check_set_spent};
use crate::reservation::{Denial, DenialReason, Fingerprint, Grant};
use crate::{
    Budget, BudgetStatus, Claim, Error, ErrorKind, HoldId, Refund, Reservation, Reserved, Settled,
    Settlement, Unique,
};

/// How long a windowed budget outlives its window (and its last hold), as in Redis.
const WINDOW_GRACE_MS: u64 = 60_000;

/// Shards: a power of two, so that a slot's shard is a mask. Enough that two busy requests
/// rarely share one on a machine of many cores; few enough that an empty store is small.
const SHARDS: usize = 64;

/// An in-memory [`Store`] for a single process: the default where no Redis is configured.
///
/// Leases run on the wall clock; expired holds give their capacity back on the next call that
/// touches their budget. A settled record is kept for the retention period unless its settler
/// forgets it (the layer does, for the holds it names itself), so memory follows what is in
/// flight and what is owned, not throughput.
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
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    retain_ms: u64,
    clock: Clock,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("retain_ms", &self.inner.retain_ms)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store that keeps settled records for [`DEFAULT_RETAIN`].
    pub fn new() -> Self {
        Self::with_retain_ms(DEFAULT_RETAIN.as_millis() as u64)
    }

    fn with_retain_ms(retain_ms: u64) -> Self {
        Self::with(retain_ms, Clock::default())
    }

    fn with(retain_ms: u64, clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                retain_ms,
                clock,
            }),
        }
    }

    /// Keeps settled records and tombstones for `retain` instead.
    pub fn retain(self, retain: Duration) -> Self {
        Self::with(retain.as_millis().max(1) as u64, self.inner.clock.clone())
    }

    /// An empty store whose clock a test moves with [`MemoryStore::advance_clock`] (feature
    /// `test-clock`, for tests and simulation only): leases, retentions and windows pass in one
    /// step.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_reserve::{Budget, Claim, MemoryStore, Reservation, Reserved, Store};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let store = MemoryStore::with_test_clock();
    /// let budget = Budget::new("customer-42", 100);
    /// let hold = Reservation::builder()
    ///     .lease(Duration::from_secs(10))
    ///     .claim(Claim::spend(budget.clone(), 100))
    ///     .build()?;
    /// let Reserved::Granted(_) = store.reserve(&hold).await? else { panic!() };
    /// store.advance_clock(Duration::from_secs(11));
    /// assert_eq!(store.budget(&budget).await?.remaining, 100);
    /// # Ok::<_, tower_reserve::Error>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "test-clock")]
    pub fn with_test_clock() -> Self {
        Self::with(DEFAULT_RETAIN.as_millis() as u64, Clock::test())
    }

    /// Moves a test clock ahead (see [`MemoryStore::with_test_clock`]); on a store with the
    /// system's clock it does nothing.
    #[cfg(feature = "test-clock")]
    pub fn advance_clock(&self, by: Duration) {
        self.inner.clock.advance(by);
    }

    /// Locks the shards of `slots` (any order, repeats allowed) in ascending order, each swept of
    /// what has expired (a bounded amount per shard).
    fn lock(&self, slots: impl IntoIterator<Item = u16>) -> (Locked<'_>, u64) {
        self.lock_shards(ShardSet::of(slots))
    }

    fn lock_shards(&self, shards: ShardSet) -> (Locked<'_>, u64) {
        let now = self.inner.clock.now_ms();
        let lock = |i: usize| {
            // A panic while a lock is held cannot leave a half-applied change behind: every
            // operation checks everything before it writes. So a poisoned lock is usable.
            let mut guard = self.inner.shards[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            guard.sweep(now);
            (i, guard)
        };
        // Most operations touch one shard: that one is held without a vector.
        let locked = if shards.0.count_ones() == 1 {
            let (i, guard) = lock(shards.0.trailing_zeros() as usize);
            Locked::One(i, guard)
        } else {
            Locked::Many(shards.iter().map(lock).collect())
        };
        (locked, now)
    }
}

/// A set of shards, one bit each: iterated in ascending order, the order they are locked in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ShardSet(u64);

const _: () = assert!(SHARDS <= u64::BITS as usize, "a shard set is one u64");

impl ShardSet {
    fn of(slots: impl IntoIterator<Item = u16>) -> Self {
        Self(
            slots
                .into_iter()
                .fold(0, |set, slot| set | 1 << shard_of(slot)),
        )
    }

    fn iter(self) -> impl Iterator<Item = usize> {
        (0..SHARDS).filter(move |i| self.0 & (1 << i) != 0)
    }
}

fn shard_of(slot: u16) -> usize {
    slot as usize & (SHARDS - 1)
}

/// `store`, when it is the embedded store. It answers without waiting, so the layer calls it in
/// place: no future boxed to keep the call, none to hand to a task should the request go away
/// meanwhile (there is no meanwhile).
pub(crate) fn embedded<St: Store>(store: &St) -> Option<&MemoryStore> {
    (store as &dyn std::any::Any).downcast_ref()
}

/// The wall clock in Unix milliseconds: the layer's estimate of when a window resets.
pub(crate) fn now_ms() -> u64 {
    super::clock::system_ms()
}

/// The shards one operation holds, by index.
enum Locked<'a> {
    One(usize, MutexGuard<'a, Shard>),
    Many(Vec<(usize, MutexGuard<'a, Shard>)>),
}

impl Locked<'_> {
    /// The shards held.
    fn held(&self) -> ShardSet {
        match self {
            Locked::One(i, _) => ShardSet(1 << i),
            Locked::Many(guards) => ShardSet(guards.iter().fold(0, |set, (i, _)| set | 1 << i)),
        }
    }

    fn shard(&mut self, slot: u16) -> &mut Shard {
        let i = shard_of(slot);
        let held = match self {
            Locked::One(j, guard) if *j == i => Some(guard),
            Locked::One(..) => None,
            Locked::Many(guards) => guards.iter_mut().find(|(j, _)| *j == i).map(|(_, g)| g),
        };
        held.expect("the shard of every key an operation touches is locked")
    }
}

/// A budget's storage key: its key, and for a windowed budget `{` (which keys may not contain)
/// and its window's suffix, so that no two budgets share one. Shared by the budget's cell and
/// the records of the holds on it: a hold on a budget already there allocates no key.
type BudgetKey = Arc<str>;

/// The budget's own key in a storage key.
fn budget_of(key: &BudgetKey) -> &str {
    key.split('{').next().unwrap_or_default()
}

/// The storage key of `key` in the window of `suffix` (empty for a lifetime budget: then the
/// budget's own key, looked up without a copy).
fn budget_key<'a>(key: &'a str, suffix: &str) -> Cow<'a, str> {
    if suffix.is_empty() {
        return Cow::Borrowed(key);
    }
    let mut k = String::with_capacity(key.len() + 1 + suffix.len());
    k.push_str(key);
    k.push('{');
    k.push_str(suffix);
    Cow::Owned(k)
}

/// What a shard keeps. Every entry that can expire has its deadline in `deadlines` (and keeps
/// it, to find and remove it there when the entry goes first).
#[derive(Default)]
struct Shard {
    budgets: HashMap<BudgetKey, BudgetCell>,
    values: HashMap<String, ValueCell>,
    records: HashMap<HoldId, Record>,
    /// By the budget's key (whatever the window: a refund id counts once) and the refund's id.
    refunds: HashMap<(String, HoldId), RefundRecord>,
    deadlines: BTreeSet<(u64, Expiring)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Expiring {
    Record(HoldId),
    Value(String),
    Budget(BudgetKey),
    Refund(String, HoldId),
}

#[derive(Debug)]
struct BudgetCell {
    /// The cell's own key in `budgets`, for the records of holds on it to share.
    key: BudgetKey,
    spent: u64,
    held: u64,
    /// The amount held per bucket of lease ends (see `store/lua`).
    buckets: Buckets,
    /// When a windowed budget may go (its window and its last hold ended); `None` for a
    /// lifetime budget, which goes when it holds and has spent nothing.
    drop_at: Option<u64>,
}

/// The end of the bucket of lease ends that `expires_at` falls in.
fn bucket(expires_at: u64) -> u64 {
    expires_at.div_ceil(HOLD_BUCKET_MS) * HOLD_BUCKET_MS
}

/// The amount a budget holds per bucket of lease ends, by the bucket's end. The holds of one
/// budget in flight at once mostly share a bucket (it is 100 ms wide), so one bucket is kept
/// inline and only more take a map; a budget with nothing in flight keeps no allocation, so
/// that idle budgets cost their key and their counts only.
#[derive(Debug, Default)]
enum Buckets {
    #[default]
    Empty,
    One {
        end: u64,
        sum: u64,
    },
    Many(BTreeMap<u64, u64>),
}

impl Buckets {
    /// The bucket that ends first: its end and its sum.
    fn first(&self) -> Option<(u64, u64)> {
        match self {
            Buckets::Empty => None,
            Buckets::One { end, sum } => Some((*end, *sum)),
            Buckets::Many(map) => map.first_key_value().map(|(end, sum)| (*end, *sum)),
        }
    }

    /// Adds `amount` to the bucket that ends at `end`.
    fn add(&mut self, end: u64, amount: u64) {
        match self {
            Buckets::Empty => *self = Buckets::One { end, sum: amount },
            Buckets::One { end: e, sum } if *e == end => *sum += amount,
            Buckets::One { end: e, sum } => {
                *self = Buckets::Many(BTreeMap::from([(*e, *sum), (end, amount)]));
            }
            Buckets::Many(map) => *map.entry(end).or_default() += amount,
        }
    }

    /// Takes the bucket that ends at `end` out whole: its sum, if it is there.
    fn remove(&mut self, end: u64) -> Option<u64> {
        let sum = match self {
            Buckets::One { end: e, sum } if *e == end => Some(*sum),
            Buckets::Many(map) => map.remove(&end),
            _ => None,
        };
        if matches!(self, Buckets::One { end: e, .. } if *e == end) {
            *self = Buckets::Empty;
        }
        self.shrink();
        sum
    }

    /// Takes `amount` out of the bucket that ends at `end`, which goes once it holds nothing.
    fn take(&mut self, end: u64, amount: u64) {
        match self {
            Buckets::One { end: e, sum } if *e == end => {
                *sum -= amount;
                if *sum == 0 {
                    *self = Buckets::Empty;
                }
            }
            Buckets::Many(map) => {
                if let Some(sum) = map.get_mut(&end) {
                    *sum -= amount;
                    if *sum == 0 {
                        map.remove(&end);
                    }
                }
            }
            _ => {}
        }
        self.shrink();
    }

    /// A map left with one bucket or none goes back inline, and its nodes are freed.
    fn shrink(&mut self) {
        if let Buckets::Many(map) = self
            && map.len() <= 1
        {
            *self = match map.first_key_value() {
                Some((end, sum)) => Buckets::One {
                    end: *end,
                    sum: *sum,
                },
                None => Buckets::Empty,
            };
        }
    }
}

impl BudgetCell {
    fn new(key: BudgetKey) -> Self {
        Self {
            key,
            spent: 0,
            held: 0,
            buckets: Buckets::default(),
            drop_at: None,
        }
    }

    /// Gives back the buckets whose end has passed (a bounded number per call).
    fn expire_buckets(&mut self, now: u64) {
        for _ in 0..MAX_EXPIRED_PER_CALL {
            match self.buckets.first() {
                Some((end, _)) if end <= now => {
                    self.held -= self.buckets.remove(end).expect("first exists");
                }
                _ => break,
            }
        }
    }

    /// Holds `amount` until `expires_at`.
    fn hold_in(&mut self, expires_at: u64, amount: u64) {
        self.buckets.add(bucket(expires_at), amount);
        self.held += amount;
    }

    /// Takes a hold out of its bucket: true when it was still held, false when its bucket's end
    /// has passed and the bucket is (now) given back whole. At most once per hold.
    fn take_out(&mut self, expires_at: u64, amount: u64, now: u64) -> bool {
        let end = bucket(expires_at);
        if end <= now {
            if let Some(sum) = self.buckets.remove(end) {
                self.held -= sum;
            }
            return false;
        }
        self.buckets.take(end, amount);
        self.held -= amount;
        true
    }

    fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.spent).saturating_sub(self.held)
    }

    /// Nothing to remember: a lifetime budget that holds and has spent nothing.
    fn is_empty(&self) -> bool {
        self.spent == 0 && self.held == 0 && self.drop_at.is_none()
    }
}

/// A unique value: who owns it, and which hold has it in flight until when.
#[derive(Default, Debug)]
struct ValueCell {
    owner: Option<String>,
    pending: Option<(HoldId, u64)>,
}

impl ValueCell {
    fn pending_other(&self, id: &HoldId, now: u64) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|(h, exp)| *exp > now && h != id)
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
    /// The digest of the command's payload, when it had one: with the claims, what tells a retry
    /// from a reuse of the id for another command ([`same_command`]).
    payload: Option<Fingerprint>,
    claims: ResolvedClaims,
    /// When the record goes (its deadline in the shard).
    drop_at: u64,
    memo: Option<bytes::Bytes>,
}

#[derive(Debug)]
struct RefundRecord {
    fingerprint: [u8; 8],
    drop_at: u64,
}

/// A claim as held: where it lives, resolved at reserve time.
#[derive(Debug)]
enum Resolved {
    Spend {
        slot: u16,
        key: BudgetKey,
        /// The budget's window spec, to match actual amounts against (with [`budget_of`]).
        spec: Cow<'static, str>,
        limit: u64,
        amount: u64,
        /// When the budget's window ends; `None` for a lifetime budget.
        window_ends: Option<u64>,
    },
    Own {
        slot: u16,
        tag: String,
        owner: String,
    },
    ReleaseOnCommit {
        slot: u16,
        tag: String,
        owner: String,
    },
}

/// A record's claims. Most reservations have one, kept in the record itself rather than in an
/// allocation of its own.
#[derive(Debug, Default)]
enum ResolvedClaims {
    #[default]
    Empty,
    One(Resolved),
    Many(Vec<Resolved>),
}

impl ResolvedClaims {
    fn push(&mut self, claim: Resolved) {
        *self = match std::mem::take(self) {
            ResolvedClaims::Empty => ResolvedClaims::One(claim),
            ResolvedClaims::One(first) => ResolvedClaims::Many(vec![first, claim]),
            ResolvedClaims::Many(mut all) => {
                all.push(claim);
                ResolvedClaims::Many(all)
            }
        };
    }
}

impl std::ops::Deref for ResolvedClaims {
    type Target = [Resolved];

    fn deref(&self) -> &[Resolved] {
        match self {
            ResolvedClaims::Empty => &[],
            ResolvedClaims::One(claim) => std::slice::from_ref(claim),
            ResolvedClaims::Many(all) => all,
        }
    }
}

impl Resolved {
    fn slot(&self) -> u16 {
        match self {
            Resolved::Spend { slot, .. }
            | Resolved::Own { slot, .. }
            | Resolved::ReleaseOnCommit { slot, .. } => *slot,
        }
    }
}

impl Shard {
    /// Drops what has expired (records, in-flight markers, windowed budgets, refund records),
    /// a bounded number per call.
    fn sweep(&mut self, now: u64) {
        for _ in 0..MAX_EXPIRED_PER_CALL {
            let Some((at, _)) = self.deadlines.first() else {
                return;
            };
            if *at > now {
                return;
            }
            let (at, what) = self.deadlines.pop_first().expect("first exists");
            match what {
                Expiring::Record(id) => {
                    if self.records.get(&id).is_some_and(|r| r.drop_at == at) {
                        self.records.remove(&id);
                    }
                }
                Expiring::Value(tag) => {
                    if let Some(cell) = self.values.get_mut(&tag)
                        && cell.pending.as_ref().is_some_and(|(_, exp)| *exp == at)
                    {
                        cell.pending = None;
                        if cell.owner.is_none() {
                            self.values.remove(&tag);
                        }
                    }
                }
                Expiring::Budget(key) => {
                    if let Some(cell) = self.budgets.get_mut(&key)
                        && cell.drop_at == Some(at)
                    {
                        // Holds still in it keep it (their leases moved it on), and so does what
                        // is left to clear (a bounded amount per call): it is looked at again
                        // when its next bucket ends.
                        cell.expire_buckets(now);
                        if cell.held == 0 {
                            self.budgets.remove(&key);
                        } else {
                            let next = cell.buckets.first().map_or(now, |(end, _)| end);
                            let again = next.max(now + 1);
                            cell.drop_at = Some(again);
                            self.deadlines.insert((again, Expiring::Budget(key)));
                        }
                    }
                }
                Expiring::Refund(key, id) => {
                    let k = (key, id);
                    if self.refunds.get(&k).is_some_and(|r| r.drop_at == at) {
                        self.refunds.remove(&k);
                    }
                }
            }
        }
    }

    fn budget_cell(&mut self, key: &str, now: u64) -> Option<&mut BudgetCell> {
        let cell = self.budgets.get_mut(key)?;
        cell.expire_buckets(now);
        Some(cell)
    }

    fn keep_budget_until(&mut self, key: &BudgetKey, at: u64) {
        if let Some(cell) = self.budgets.get_mut(key) {
            if cell.drop_at.is_some_and(|d| d >= at) {
                return;
            }
            if let Some(old) = cell.drop_at.replace(at) {
                self.deadlines.remove(&(old, Expiring::Budget(key.clone())));
            }
            self.deadlines.insert((at, Expiring::Budget(key.clone())));
        }
    }

    /// Drops a lifetime budget that has nothing left to remember.
    fn tidy_budget(&mut self, key: &str) {
        if self.budgets.get(key).is_some_and(BudgetCell::is_empty) {
            self.budgets.remove(key);
        }
    }

    fn set_pending(&mut self, tag: &str, id: &HoldId, expires: u64) {
        let cell = self.values.entry(tag.to_owned()).or_default();
        if let Some((_, old)) = cell.pending.replace((id.clone(), expires)) {
            self.deadlines
                .remove(&(old, Expiring::Value(tag.to_owned())));
        }
        self.deadlines
            .insert((expires, Expiring::Value(tag.to_owned())));
    }

    /// Clears `id`'s in-flight marker on `tag`, if it is `id`'s.
    fn clear_pending(&mut self, tag: &str, id: &HoldId) {
        let Some(cell) = self.values.get_mut(tag) else {
            return;
        };
        if let Some((h, exp)) = &cell.pending
            && h == id
        {
            let exp = *exp;
            cell.pending = None;
            let empty = cell.owner.is_none();
            self.deadlines
                .remove(&(exp, Expiring::Value(tag.to_owned())));
            if empty {
                self.values.remove(tag);
            }
        }
    }

    fn put_record(&mut self, id: HoldId, record: Record) {
        self.deadlines
            .insert((record.drop_at, Expiring::Record(id.clone())));
        if let Some(old) = self.records.insert(id.clone(), record) {
            self.deadlines.remove(&(old.drop_at, Expiring::Record(id)));
        }
    }

    fn take_record(&mut self, id: &HoldId) -> Option<Record> {
        let record = self.records.remove(id)?;
        self.deadlines
            .remove(&(record.drop_at, Expiring::Record(id.clone())));
        Some(record)
    }
}

/// The answer a reserve gets from an existing record, or `None` when the record is a live hold
/// to answer as a replay.
fn refusal(record: &Record, reservation: &Reservation, now: u64) -> Option<Error> {
    let id = reservation.id();
    let same = same_command(record, reservation);
    let kind = match record.phase {
        _ if record.phase != Phase::Tombstone && !same => ErrorKind::Conflict,
        Phase::Held if now >= record.expires_at => ErrorKind::Expired,
        Phase::Held => return None,
        Phase::Committed => ErrorKind::Committed,
        Phase::Released | Phase::Tombstone => ErrorKind::Released,
        Phase::Expired => ErrorKind::Expired,
    };
    Some(Error::refused(kind, id).with_memo(record.memo.clone()))
}

/// Whether `reservation` is the command `record` was reserved for: a retry, not a reuse of its id
/// with other claims. The fields compared are those a Redis record's fingerprint digests
/// ([`Reservation::fingerprint`]): the payload's digest alone when there is one, otherwise each
/// claim's kind, target and amount or owner. A record never leaves the process, so it keeps the
/// fields themselves and compares them exactly, rather than digest them at every reserve.
fn same_command(record: &Record, reservation: &Reservation) -> bool {
    if let Some(payload) = reservation.payload_digest() {
        return record.payload.as_ref() == Some(payload);
    }
    let claims = reservation.claims();
    record.payload.is_none()
        && record.claims.len() == claims.len()
        && record.claims.iter().zip(claims).all(|pair| match pair {
            (
                Resolved::Spend {
                    key,
                    spec,
                    limit,
                    amount,
                    ..
                },
                Claim::Spend { budget, amount: a },
            ) => {
                budget_of(key) == budget.key()
                    && *spec == budget.window().spec()
                    && *limit == budget.limit()
                    && amount == a
            }
            (Resolved::Own { tag, owner, .. }, Claim::Own { value, owner: o })
            | (
                Resolved::ReleaseOnCommit { tag, owner, .. },
                Claim::ReleaseOnCommit { value, owner: o },
            ) => *tag == value.tag() && owner == o,
            _ => false,
        })
}

impl MemoryStore {
    /// Every slot a reservation touches: its record's and its claims'.
    fn slots_of(reservation: &Reservation) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(reservation.id().slot()).chain(reservation.claims().iter().map(Claim::slot))
    }

    /// Reserve, or (`write` false) only check: [`Store::reserve`] and [`Store::check`], which
    /// never wait, called in place (see [`embedded`]).
    pub(crate) fn reserve_sync(
        &self,
        reservation: &Reservation,
        write: bool,
    ) -> Result<Reserved, Error> {
        let (mut locked, now) = self.lock(Self::slots_of(reservation));
        let id = reservation.id();
        let record_slot = id.slot();
        if let Some(record) = locked.shard(record_slot).records.get(id) {
            if let Some(err) = refusal(record, reservation, now) {
                return Err(err);
            }
            // A retry of a live hold: the same hold, with what the retry's own budget claims
            // have left now (with a payload, a retry may work out other claims than its first
            // attempt).
            let expires_at = record.expires_at;
            let remaining = reservation
                .claims()
                .iter()
                .map(|c| match c {
                    Claim::Spend { budget, .. } => {
                        let slot = c.slot();
                        let key = budget_key(budget.key(), &budget.window().slot(now).suffix);
                        Some(
                            locked
                                .shard(slot)
                                .budget_cell(&key, now)
                                .map_or(budget.limit(), |cell| cell.remaining(budget.limit())),
                        )
                    }
                    _ => None,
                })
                .collect();
            return Ok(Reserved::Granted(Grant {
                id: id.clone(),
                expires_at_ms: expires_at,
                remaining,
                replayed: true,
            }));
        }

        // Check every claim before writing anything.
        let mut resolved = ResolvedClaims::default();
        let mut remaining = Vec::with_capacity(reservation.claims().len());
        for (i, claim) in reservation.claims().iter().enumerate() {
            let deny = |reason| Ok(Reserved::Denied(Denial { claim: i, reason }));
            let slot = claim.slot();
            let shard = locked.shard(slot);
            match claim {
                Claim::Spend { budget, amount } => {
                    let window = budget.window().slot(now);
                    let name = budget_key(budget.key(), &window.suffix);
                    let (left, key) = match shard.budget_cell(&name, now) {
                        Some(cell) => (cell.remaining(budget.limit()), cell.key.clone()),
                        None => (budget.limit(), BudgetKey::from(name)),
                    };
                    if *amount > left {
                        return deny(DenialReason::OverBudget {
                            requested: *amount,
                            remaining: left,
                            resets_at_ms: window.ends_at_ms,
                        });
                    }
                    remaining.push(Some(left - amount));
                    resolved.push(Resolved::Spend {
                        slot,
                        key,
                        spec: budget.window().spec(),
                        limit: budget.limit(),
                        amount: *amount,
                        window_ends: window.ends_at_ms,
                    });
                }
                Claim::Own { value, owner } => {
                    let tag = value.tag();
                    if let Some(cell) = shard.values.get(&tag)
                        && (cell.owner.as_ref().is_some_and(|o| o != owner)
                            || cell.pending_other(id, now))
                    {
                        return deny(DenialReason::Taken);
                    }
                    remaining.push(None);
                    resolved.push(Resolved::Own {
                        slot,
                        tag,
                        owner: owner.clone(),
                    });
                }
                Claim::ReleaseOnCommit { value, owner } => {
                    let tag = value.tag();
                    let cell = shard.values.get(&tag);
                    if cell.and_then(|c| c.owner.as_ref()) != Some(owner) {
                        return deny(DenialReason::NotOwner);
                    }
                    if cell.is_some_and(|c| c.pending_other(id, now)) {
                        return deny(DenialReason::Taken);
                    }
                    remaining.push(None);
                    resolved.push(Resolved::ReleaseOnCommit {
                        slot,
                        tag,
                        owner: owner.clone(),
                    });
                }
            }
        }

        let expires_at = now + reservation.lease().as_millis() as u64;
        if !write {
            return Ok(Reserved::Granted(Grant {
                id: id.clone(),
                expires_at_ms: expires_at,
                remaining,
                replayed: false,
            }));
        }
        for claim in resolved.iter() {
            let shard = locked.shard(claim.slot());
            match claim {
                Resolved::Spend {
                    key,
                    amount,
                    window_ends,
                    ..
                } => {
                    match shard.budgets.get_mut(key) {
                        Some(cell) => cell.hold_in(expires_at, *amount),
                        None => {
                            let mut cell = BudgetCell::new(key.clone());
                            cell.hold_in(expires_at, *amount);
                            shard.budgets.insert(key.clone(), cell);
                        }
                    }
                    if let Some(ends) = window_ends {
                        shard.keep_budget_until(key, (*ends).max(expires_at) + WINDOW_GRACE_MS);
                    }
                }
                Resolved::Own { tag, .. } | Resolved::ReleaseOnCommit { tag, .. } => {
                    shard.set_pending(tag, id, expires_at);
                }
            }
        }
        locked.shard(record_slot).put_record(
            id.clone(),
            Record {
                phase: Phase::Held,
                expires_at,
                payload: reservation.payload_digest().copied(),
                claims: resolved,
                drop_at: expires_at + self.inner.retain_ms,
                memo: None,
            },
        );
        Ok(Reserved::Granted(Grant {
            id: id.clone(),
            expires_at_ms: expires_at,
            remaining,
            replayed: false,
        }))
    }

    /// Locks the record's shard and its claims' shards. The claims are learned from the record
    /// under its own shard's lock first; if they live elsewhere, everything is locked again in
    /// order (and the record read again by the caller).
    ///
    /// The record may change between the two (settled and reserved again with other claims):
    /// then it is locked again, until the shards held are those of the record found.
    fn lock_hold(&self, id: &HoldId) -> (Locked<'_>, u64) {
        let record_slot = id.slot();
        let mut shards = ShardSet::of([record_slot]);
        loop {
            let (mut locked, now) = self.lock_shards(shards);
            let claimed = match locked.shard(record_slot).records.get(id) {
                Some(record) => ShardSet::of(record.claims.iter().map(Resolved::slot)),
                None => ShardSet::default(),
            };
            let missing = claimed.0 & !locked.held().0;
            if missing == 0 {
                return (locked, now);
            }
            drop(locked);
            shards.0 |= missing;
        }
    }

    /// [`Store::settle`], which never waits, called in place (see [`embedded`]).
    pub(crate) fn settle_sync(
        &self,
        id: &HoldId,
        settlement: &Settlement,
    ) -> Result<Settled, Error> {
        settlement.validate()?;
        let default_ms = self.inner.retain_ms;
        let retain_ms = settlement
            .retain_for(Duration::from_millis(default_ms))
            .map(|d| d.as_millis() as u64);
        let (mut locked, now) = self.lock_hold(id);
        let record_slot = id.slot();
        let Some(mut record) = locked.shard(record_slot).take_record(id) else {
            if settlement.commit {
                return Err(Error::refused(ErrorKind::UnknownHold, id));
            }
            // Released before reserved: the tombstone refuses the late reserve. It is kept even
            // when the settler would forget: that is what it is for.
            let tombstone = Record {
                phase: Phase::Tombstone,
                expires_at: now,
                payload: None,
                claims: ResolvedClaims::Empty,
                drop_at: now + retain_ms.unwrap_or(default_ms),
                memo: None,
            };
            locked.shard(record_slot).put_record(id.clone(), tombstone);
            return Ok(Settled::Tombstoned);
        };
        let replay = match (record.phase, settlement.commit) {
            (Phase::Held, _) => false,
            (Phase::Committed, true) | (Phase::Released | Phase::Expired, false) => true,
            // A tombstone stays, whatever the settler's retention: it refuses a late reserve.
            (Phase::Tombstone, false) => {
                locked.shard(record_slot).put_record(id.clone(), record);
                return Ok(Settled::Replayed);
            }
            (phase, _) => {
                let kind = match phase {
                    Phase::Committed => ErrorKind::Committed,
                    Phase::Expired => ErrorKind::Expired,
                    _ => ErrorKind::Released,
                };
                locked.shard(record_slot).put_record(id.clone(), record);
                return Err(Error::refused(kind, id));
            }
        };
        if replay {
            // Settled the same way before: a memo not yet kept is kept now, and the record is
            // kept at least as long as this settlement asks.
            let memo = record.memo.take().or_else(|| settlement.memo.clone());
            let phase = record.phase;
            let retain_ms = retain_ms.map(|ms| ms.max(record.drop_at.saturating_sub(now)));
            keep(
                locked.shard(record_slot),
                id,
                record,
                phase,
                retain_ms,
                now,
                memo,
            );
            return Ok(Settled::Replayed);
        }

        if settlement.commit && now >= record.expires_at {
            // The lease ran out: whatever is still held goes back now.
            undo(&mut locked, id, &record, now);
            let shard = locked.shard(record_slot);
            keep(
                shard,
                id,
                record,
                Phase::Expired,
                Some(default_ms),
                now,
                None,
            );
            return Err(Error::refused(ErrorKind::Expired, id));
        }
        let phase = if settlement.commit {
            if let Err(err) = check_actual(&record, settlement) {
                locked.shard(record_slot).put_record(id.clone(), record);
                return Err(err.with_id(id));
            }
            commit(&mut locked, id, &record, settlement, now);
            Phase::Committed
        } else {
            undo(&mut locked, id, &record, now);
            Phase::Released
        };
        let memo = settlement.memo.clone();
        keep(
            locked.shard(record_slot),
            id,
            record,
            phase,
            retain_ms,
            now,
            memo,
        );
        Ok(Settled::Applied)
    }

    fn extend_sync(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        crate::reservation::check_lease(lease)?;
        let (mut locked, now) = self.lock_hold(id);
        let record_slot = id.slot();
        let shard = locked.shard(record_slot);
        let Some(record) = shard.records.get(id) else {
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
        let mut record = shard.take_record(id).expect("read above");
        let old = record.expires_at;
        let new = now + lease.as_millis() as u64;
        for claim in record.claims.iter() {
            let shard = locked.shard(claim.slot());
            match claim {
                Resolved::Spend {
                    key,
                    amount,
                    window_ends,
                    ..
                } => {
                    if let Some(cell) = shard.budgets.get_mut(key) {
                        cell.take_out(old, *amount, now);
                        cell.hold_in(new, *amount);
                    }
                    if window_ends.is_some() {
                        shard.keep_budget_until(key, new + WINDOW_GRACE_MS);
                    }
                }
                Resolved::Own { tag, .. } | Resolved::ReleaseOnCommit { tag, .. } => {
                    if shard
                        .values
                        .get(tag)
                        .and_then(|c| c.pending.as_ref())
                        .is_some_and(|(h, _)| h == id)
                    {
                        shard.set_pending(tag, id, new);
                    }
                }
            }
        }
        record.expires_at = new;
        record.drop_at = new + self.inner.retain_ms;
        locked.shard(record_slot).put_record(id.clone(), record);
        Ok(new)
    }

    fn refund_sync(&self, refund: &Refund) -> Result<Settled, Error> {
        refund.validate()?;
        let budget = &refund.budget;
        let slot = crate::claim::slot_of(budget.key().as_bytes());
        let (mut locked, now) = self.lock([slot]);
        let shard = locked.shard(slot);
        let at = refund.window_at_ms.unwrap_or(now);
        if at > now + 1_000 {
            return Err(Error::invalid(
                "a refund cannot go to a window still to come",
            ));
        }
        let record_key = (budget.key().to_owned(), refund.id.clone());
        if let Some(done) = shard.refunds.get(&record_key) {
            return if done.fingerprint == refund.fingerprint() {
                Ok(Settled::Replayed)
            } else {
                Err(Error::refused(ErrorKind::Conflict, &refund.id))
            };
        }
        let window = budget.window().slot(at);
        if window.ends_at_ms.is_some_and(|ends| ends <= now) {
            return Err(Error::refused(ErrorKind::Expired, &refund.id));
        }
        let key = budget_key(budget.key(), &window.suffix);
        let spent = shard.budget_cell(&key, now).map_or(0, |c| c.spent);
        if refund.amount > spent {
            return Err(Error::refused(ErrorKind::ExceedsSpent, &refund.id));
        }
        shard.budgets.get_mut(&*key).expect("it has spent").spent -= refund.amount;
        shard.tidy_budget(&key);
        let drop_at = now + refund.retain.as_millis() as u64;
        shard.refunds.insert(
            record_key.clone(),
            RefundRecord {
                fingerprint: refund.fingerprint(),
                drop_at,
            },
        );
        shard
            .deadlines
            .insert((drop_at, Expiring::Refund(record_key.0, record_key.1)));
        Ok(Settled::Applied)
    }

    fn budget_sync(&self, budget: &Budget) -> Result<BudgetStatus, Error> {
        budget.validate()?;
        let slot = crate::claim::slot_of(budget.key().as_bytes());
        let (mut locked, now) = self.lock([slot]);
        let window = budget.window().slot(now);
        let key = budget_key(budget.key(), &window.suffix);
        let (spent, held) = match locked.shard(slot).budget_cell(&key, now) {
            Some(cell) => (cell.spent, cell.held),
            None => (0, 0),
        };
        Ok(BudgetStatus::new(
            budget.limit(),
            spent,
            held,
            window.ends_at_ms,
        ))
    }

    fn set_spent_sync(&self, budget: &Budget, spent: u64) -> Result<(), Error> {
        check_set_spent(budget, spent)?;
        let slot = crate::claim::slot_of(budget.key().as_bytes());
        let (mut locked, now) = self.lock([slot]);
        let shard = locked.shard(slot);
        let window = budget.window().slot(now);
        let key = budget_key(budget.key(), &window.suffix);
        let key = BudgetKey::from(key);
        shard
            .budgets
            .entry(key.clone())
            .or_insert_with(|| BudgetCell::new(key.clone()))
            .spent = spent;
        match window.ends_at_ms {
            Some(ends) => shard.keep_budget_until(&key, ends + WINDOW_GRACE_MS),
            None => shard.tidy_budget(&key),
        }
        Ok(())
    }

    fn owner_sync(&self, value: &Unique) -> Result<Option<String>, Error> {
        value.validate()?;
        let tag = value.tag();
        let slot = crate::claim::slot_of(tag.as_bytes());
        let (mut locked, _) = self.lock([slot]);
        Ok(locked
            .shard(slot)
            .values
            .get(&tag)
            .and_then(|c| c.owner.clone()))
    }

    fn remove_sync(&self, value: &Unique) -> Result<bool, Error> {
        value.validate()?;
        let tag = value.tag();
        let slot = crate::claim::slot_of(tag.as_bytes());
        let (mut locked, _) = self.lock([slot]);
        let shard = locked.shard(slot);
        let Some(cell) = shard.values.get_mut(&tag) else {
            return Ok(false);
        };
        let owned = cell.owner.take().is_some();
        if cell.pending.is_none() {
            shard.values.remove(&tag);
        }
        Ok(owned)
    }
}

/// Puts a settled record back with its phase, memo and deadline; or, `retain_ms` `None`, drops it.
fn keep(
    shard: &mut Shard,
    id: &HoldId,
    mut record: Record,
    phase: Phase,
    retain_ms: Option<u64>,
    now: u64,
    memo: Option<bytes::Bytes>,
) {
    let Some(retain_ms) = retain_ms else {
        return;
    };
    record.phase = phase;
    record.memo = memo;
    record.drop_at = now + retain_ms;
    shard.put_record(id.clone(), record);
}

/// Refuses, before anything changes, actual amounts that name a budget the hold does not spend
/// from or are above what it holds.
fn check_actual(record: &Record, settlement: &Settlement) -> Result<(), ActualError> {
    for (budget, _) in &settlement.actual {
        let held = record.claims.iter().any(|c| {
            matches!(c, Resolved::Spend { key, spec, .. }
                if budget_of(key) == budget.key() && *spec == budget.window().spec())
        });
        if !held {
            return Err(ActualError::NotHeld);
        }
    }
    for claim in record.claims.iter() {
        if let Resolved::Spend {
            key, spec, amount, ..
        } = claim
            && committed(settlement, key, spec, *amount) > *amount
        {
            return Err(ActualError::AboveHeld);
        }
    }
    Ok(())
}

/// What a spend claim of `amount` on `key` commits: the actual amount the settlement names for
/// its budget, or all of it.
fn committed(settlement: &Settlement, key: &BudgetKey, spec: &str, amount: u64) -> u64 {
    settlement
        .actual_for(budget_of(key), spec)
        .unwrap_or(amount)
}

/// Why actual amounts were refused.
enum ActualError {
    /// An actual amount names a budget the hold does not spend from.
    NotHeld,
    /// An actual amount is above what the hold holds.
    AboveHeld,
}

impl ActualError {
    fn with_id(self, id: &HoldId) -> Error {
        match self {
            ActualError::NotHeld => Error::invalid(format!(
                "an actual amount names a budget that hold {id} does not spend from"
            )),
            ActualError::AboveHeld => Error::refused(ErrorKind::ExceedsHold, id),
        }
    }
}

/// Makes a hold permanent, spending what `settlement` commits of each spend claim (checked by
/// [`check_actual`]) and giving the rest back.
fn commit(
    locked: &mut Locked<'_>,
    id: &HoldId,
    record: &Record,
    settlement: &Settlement,
    now: u64,
) {
    for claim in record.claims.iter() {
        let shard = locked.shard(claim.slot());
        match claim {
            Resolved::Spend {
                key, spec, amount, ..
            } => {
                if let Some(cell) = shard.budgets.get_mut(key) {
                    if cell.take_out(record.expires_at, *amount, now) {
                        let spend = committed(settlement, key, spec, *amount);
                        cell.spent = cell.spent.saturating_add(spend);
                    }
                    if cell.is_empty() {
                        shard.budgets.remove(key);
                    }
                }
            }
            Resolved::Own { tag, owner, .. } => {
                // The hold had the value in flight: it is the owner's now (again, for an owner
                // that claimed what it owned, even if an operator removed it meanwhile).
                let held = shard
                    .values
                    .get(tag)
                    .and_then(|c| c.pending.as_ref())
                    .is_some_and(|(h, _)| h == id);
                if held {
                    shard.values.get_mut(tag).expect("held").owner = Some(owner.clone());
                    shard.clear_pending(tag, id);
                }
            }
            Resolved::ReleaseOnCommit { tag, owner, .. } => {
                shard.clear_pending(tag, id);
                if let Some(cell) = shard.values.get_mut(tag)
                    && cell.owner.as_ref() == Some(owner)
                {
                    cell.owner = None;
                    if cell.pending.is_none() {
                        shard.values.remove(tag);
                    }
                }
            }
        }
    }
}

/// Gives back whatever the hold still holds.
fn undo(locked: &mut Locked<'_>, id: &HoldId, record: &Record, now: u64) {
    for claim in record.claims.iter() {
        let shard = locked.shard(claim.slot());
        match claim {
            Resolved::Spend { key, amount, .. } => {
                if let Some(cell) = shard.budgets.get_mut(key) {
                    cell.take_out(record.expires_at, *amount, now);
                    if cell.is_empty() {
                        shard.budgets.remove(key);
                    }
                }
            }
            Resolved::Own { tag, .. } | Resolved::ReleaseOnCommit { tag, .. } => {
                shard.clear_pending(tag, id);
            }
        }
    }
}

impl Store for MemoryStore {
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        self.reserve_sync(reservation, true)
    }

    async fn check(&self, reservation: &Reservation) -> Result<Reserved, Error> {
        self.reserve_sync(reservation, false)
    }

    async fn settle(&self, id: &HoldId, settlement: &Settlement) -> Result<Settled, Error> {
        self.settle_sync(id, settlement)
    }

    async fn extend(&self, id: &HoldId, lease: Duration) -> Result<u64, Error> {
        self.extend_sync(id, lease)
    }

    async fn refund(&self, refund: &Refund) -> Result<Settled, Error> {
        self.refund_sync(refund)
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

#[cfg(all(test, feature = "test-clock"))]
mod tests {
    use super::*;
    use crate::Window;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Buckets kept inline and in a map count the same: what is added to a bucket is there
    /// until taken out or the bucket is removed whole, in order of the buckets' ends.
    #[test]
    fn buckets_inline_and_in_a_map_count_alike() {
        let mut b = Buckets::default();
        assert_eq!(b.first(), None);
        b.add(300, 5);
        b.add(300, 7);
        assert!(matches!(b, Buckets::One { end: 300, sum: 12 }));
        b.add(100, 1);
        b.add(200, 2);
        assert_eq!(b.first(), Some((100, 1)));
        b.take(100, 1);
        assert_eq!(b.first(), Some((200, 2)));
        assert_eq!(b.remove(999), None);
        assert_eq!(b.remove(200), Some(2));
        // One bucket left: inline again, the map's nodes freed.
        assert!(matches!(b, Buckets::One { end: 300, sum: 12 }));
        b.take(300, 5);
        assert_eq!(b.first(), Some((300, 7)));
        b.take(999, 1);
        b.take(300, 7);
        assert!(matches!(b, Buckets::Empty));
        b.add(400, 3);
        assert_eq!(b.remove(400), Some(3));
        assert!(matches!(b, Buckets::Empty));
    }

    /// A windowed budget whose drop deadline comes with more expired buckets than one call
    /// clears keeps a deadline, and goes once they are all cleared: nothing is left behind.
    #[test]
    fn a_windowed_budget_with_many_expired_buckets_still_goes() {
        let store = MemoryStore::with_test_clock();
        let budget =
            Budget::new("many-buckets", 1_000_000).per(Window::Every(Duration::from_secs(60)));
        block_on(async {
            // Holds in twice as many buckets as one call clears, each 100 ms apart.
            for i in 0..(2 * MAX_EXPIRED_PER_CALL as u64) {
                let r = Reservation::builder()
                    .lease(Duration::from_millis(100 * (i + 1)))
                    .claim(Claim::spend(budget.clone(), 1))
                    .build()
                    .unwrap();
                assert!(matches!(
                    store.reserve(&r).await.unwrap(),
                    Reserved::Granted(_)
                ));
            }
        });
        let slot = crate::claim::slot_of(budget.key().as_bytes());
        let cells = |store: &MemoryStore| {
            store.inner.shards[shard_of(slot)]
                .lock()
                .unwrap()
                .budgets
                .len()
        };
        assert_eq!(cells(&store), 1);
        // Past the window, its grace and every lease: the sweeps of later calls take it.
        store.advance_clock(Duration::from_secs(3_600));
        for _ in 0..4 {
            let _ = store.lock([slot]);
            store.advance_clock(Duration::from_millis(1));
        }
        assert_eq!(cells(&store), 0);
    }
}
