//! The reference model with time: what every store must answer, given the store's clock.
//!
//! It follows the crate docs' *Semantics*, with the clock as an input: a lease ends at its
//! `expires`, a hold's capacity comes back when its 100 ms bucket ends, a settled record goes
//! when its retention ends, a windowed budget's counter is per window, and a refund's id counts
//! once for as long as its record is kept, whatever window it lands in.

use std::collections::{BTreeMap, BTreeSet};

use tower_reserve::{DenialReason, ErrorKind, Settled};

pub const BUCKET_MS: u64 = 100;

/// How a budget of the universe is windowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Win {
    Lifetime,
    /// Every this many seconds.
    Every(u64),
    Day,
}

impl Win {
    /// The window index and its end at `now` (index 0 and no end for a lifetime budget).
    pub fn at(self, now: u64) -> (u64, Option<u64>) {
        let secs = match self {
            Win::Lifetime => return (0, None),
            Win::Every(s) => s,
            Win::Day => 86_400,
        };
        let index = now / (secs * 1000);
        (index, Some((index + 1) * secs * 1000))
    }
}

/// One claim, by index into the universe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Spec {
    Spend { budget: usize, amount: u64 },
    Own { value: usize, owner: usize },
    ReleaseOnCommit { value: usize, owner: usize },
}

/// What one operation touches: two operations run at once only when they share none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Hold(usize),
    Budget(usize),
    Value(usize),
    Refund(usize),
}

impl Spec {
    pub fn target(&self) -> Res {
        match *self {
            Spec::Spend { budget, .. } => Res::Budget(budget),
            Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } => Res::Value(value),
        }
    }
}

/// How long a settled record is kept, as the settlement asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Default,
    For(u64),
    Forget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Granted {
        remaining: Vec<Option<u64>>,
        replayed: bool,
    },
    Denied {
        claim: usize,
        reason: DenialReason,
    },
    Settled(Settled),
    /// A new lease end (checked against the clock by the runner, not here).
    Extended,
    Budget {
        spent: u64,
        held: u64,
        remaining: u64,
        resets_at_ms: Option<u64>,
    },
    Owner(Option<usize>),
    Removed(bool),
    Done,
    Err(ErrorKind, Option<Vec<u8>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Held,
    Committed,
    Released,
    Tombstone,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub phase: Phase,
    pub claims: Vec<Spec>,
    /// For each claim, the window index it was held in (0 for values and lifetime budgets).
    pub windows: Vec<u64>,
    pub expires: u64,
    /// When each claim's hold ends: the lease, from when its group was reserved or extended,
    /// with a group's grace on a Cluster (a group is reserved after its home, and a slow node
    /// reserves it later still).
    pub claim_expires: Vec<u64>,
    /// When the record goes: at some instant of `[drop_from, drop_at]`. A settlement answers
    /// no instant, so a record it wrote goes its retention after an instant of the call that
    /// the run cannot tell (a call held up by a pause and answered by a later retry spans
    /// hundreds of ms); later answers narrow it down ([`Model::split_drops`]). Trying only the
    /// call's first and last instants would lose the store, which ran in between.
    pub drop_at: u64,
    pub drop_from: u64,
    pub memo: Option<Vec<u8>>,
}

impl Hold {
    fn drop_exactly_at(&mut self, t: u64) {
        self.drop_at = t;
        self.drop_from = t;
    }
}

/// A record the model keeps, by kind and id.
#[derive(Debug, Clone, Copy)]
enum Kept {
    Hold(usize),
    Refund(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRecord {
    pub amount: u64,
    /// When the record goes: at some instant of `[drop_from, drop_at]`, as a hold's (see
    /// [`Hold::drop_at`]): a refund answers no instant either.
    pub drop_at: u64,
    pub drop_from: u64,
}

/// The universe's shape, shared by the model and the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub limits: Vec<u64>,
    pub windows: Vec<Win>,
    pub values: usize,
    pub owners: usize,
    pub holds: usize,
    /// Refund `r` gives back to budget `r % budgets`.
    pub refunds: usize,
    /// The store's retention of settled records and tombstones, in ms.
    pub retain_ms: u64,
    /// On a Cluster, how much longer a group's lease is than its home's (the claims of a
    /// reservation in other slots than its id's); 0 elsewhere.
    pub group_grace: u64,
    /// The slot of each hold id's record, each budget's and each value's keys.
    pub hold_slots: Vec<u16>,
    pub budget_slots: Vec<u16>,
    pub value_slots: Vec<u16>,
}

impl Shape {
    /// How much longer than its hold's lease a claim is held: a group's grace on a Cluster.
    pub fn grace(&self, hold: usize, claim: &Spec) -> u64 {
        if self.group_grace == 0 {
            return 0;
        }
        let slot = match *claim {
            Spec::Spend { budget, .. } => self.budget_slots[budget],
            Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } => {
                self.value_slots[value]
            }
        };
        if slot == self.hold_slots[hold] {
            0
        } else {
            self.group_grace
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub shape: Shape,
    /// Spent per budget and window index.
    pub spent: BTreeMap<(usize, u64), u64>,
    pub owner: Vec<Option<usize>>,
    /// Which hold has each value in flight, until when.
    pub pending: Vec<Option<(usize, u64)>>,
    pub holds: BTreeMap<usize, Hold>,
    pub refunds: BTreeMap<usize, RefundRecord>,
    /// Hold ids whose fate the simulation could not learn (a reservation across slots left in
    /// flight by a fault): no longer used.
    pub poisoned: BTreeSet<usize>,
}

pub fn bucket(expires: u64) -> u64 {
    expires.div_ceil(BUCKET_MS) * BUCKET_MS
}

impl Model {
    pub fn new(shape: Shape) -> Self {
        Self {
            owner: vec![None; shape.values],
            pending: vec![None; shape.values],
            shape,
            spent: BTreeMap::new(),
            holds: BTreeMap::new(),
            refunds: BTreeMap::new(),
            poisoned: BTreeSet::new(),
        }
    }

    pub fn refund_budget(&self, refund: usize) -> usize {
        refund % self.shape.limits.len()
    }

    fn drop_gone(&mut self, now: u64) {
        self.holds.retain(|_, h| h.drop_at > now);
        self.refunds.retain(|_, r| r.drop_at > now);
        for p in &mut self.pending {
            if p.is_some_and(|(_, exp)| exp <= now) {
                *p = None;
            }
        }
    }

    /// What is held on budget `b`'s window `w` at `now`: every hold still held there whose
    /// bucket has not ended (an expired hold counts until its bucket ends).
    pub fn held(&self, b: usize, w: u64, now: u64) -> u64 {
        let mut sum = 0;
        for h in self.holds.values() {
            if h.phase != Phase::Held {
                continue;
            }
            for ((c, &cw), &end) in h.claims.iter().zip(&h.windows).zip(&h.claim_expires) {
                if let Spec::Spend { budget, amount } = *c
                    && budget == b
                    && cw == w
                    && bucket(end) > now
                {
                    sum += amount;
                }
            }
        }
        // A hold whose record was dropped (only after its lease and retention) holds nothing.
        sum
    }

    pub fn spent_of(&self, b: usize, w: u64) -> u64 {
        self.spent.get(&(b, w)).copied().unwrap_or(0)
    }

    pub fn remaining(&self, b: usize, now: u64) -> u64 {
        let (w, _) = self.shape.windows[b].at(now);
        self.shape.limits[b]
            .saturating_sub(self.spent_of(b, w))
            .saturating_sub(self.held(b, w, now))
    }

    fn pending_other(&self, v: usize, hold: usize, now: u64) -> bool {
        self.pending[v].is_some_and(|(h, exp)| exp > now && h != hold)
    }

    /// Every time after which the model answers differently: lease ends, bucket ends, record and
    /// refund drops, window ends in `(from, to]`.
    pub fn boundaries(&self, from: u64, to: u64) -> Vec<u64> {
        let mut out = BTreeSet::new();
        let mut add = |t: u64| {
            if t > from && t <= to {
                out.insert(t);
            }
        };
        for h in self.holds.values() {
            add(h.expires);
            add(bucket(h.expires));
            add(h.drop_from);
            add(h.drop_at);
            for &end in &h.claim_expires {
                add(end);
                add(bucket(end));
            }
        }
        for r in self.refunds.values() {
            add(r.drop_from);
            add(r.drop_at);
        }
        for w in &self.shape.windows {
            let mut t = from;
            for _ in 0..4 {
                match w.at(t) {
                    (_, Some(end)) if end <= to => {
                        add(end);
                        t = end;
                    }
                    _ => break,
                }
            }
        }
        out.into_iter().collect()
    }

    /// Every record kept: the holds' and the refunds'.
    fn records(&self) -> Vec<Kept> {
        let holds = self.holds.keys().map(|&h| Kept::Hold(h));
        holds
            .chain(self.refunds.keys().map(|&r| Kept::Refund(r)))
            .collect()
    }

    /// The range of instants in which record `k` goes (see [`Hold::drop_at`]).
    fn drops(&self, k: Kept) -> Option<(u64, u64)> {
        match k {
            Kept::Hold(h) => self.holds.get(&h).map(|h| (h.drop_from, h.drop_at)),
            Kept::Refund(r) => self.refunds.get(&r).map(|r| (r.drop_from, r.drop_at)),
        }
    }

    fn drops_mut(&mut self, k: Kept) -> Option<(&mut u64, &mut u64)> {
        match k {
            Kept::Hold(h) => self
                .holds
                .get_mut(&h)
                .map(|h| (&mut h.drop_from, &mut h.drop_at)),
            Kept::Refund(r) => self
                .refunds
                .get_mut(&r)
                .map(|r| (&mut r.drop_from, &mut r.drop_at)),
        }
    }

    /// A key that a slot's move carried (`MIGRATE`) lives up to `by` ms longer than it would
    /// have: the node it leaves reads the time the key has left, and the node it goes to counts
    /// that time from when it arrives. So each record of `slot` that had not gone at `from`, when
    /// that move began, goes up to `by` ms later.
    pub fn delay_drops(&mut self, slot: u16, from: u64, by: u64) {
        let budgets = self.shape.budget_slots.len();
        for (h, rec) in &mut self.holds {
            if self.shape.hold_slots[*h] == slot && rec.drop_at >= from {
                rec.drop_at += by;
            }
        }
        for (r, rec) in &mut self.refunds {
            if self.shape.budget_slots[*r % budgets] == slot && rec.drop_at >= from {
                rec.drop_at += by;
            }
        }
    }

    /// The worlds this one stands for at `t`: a record that goes at an instant not yet known
    /// (see [`Hold::drop_at`]) has, at `t`, either gone or not.
    pub fn split_drops(&self, t: u64) -> Vec<Model> {
        let mut out = vec![self.clone()];
        for k in self.records() {
            let (from, at) = self.drops(k).expect("kept");
            if from <= t && t < at {
                out = out
                    .into_iter()
                    .flat_map(|m| {
                        let mut gone = m.clone();
                        let (from, at) = gone.drops_mut(k).expect("kept");
                        (*from, *at) = (t, t);
                        let mut kept = m;
                        *kept.drops_mut(k).expect("kept").0 = t + 1;
                        [gone, kept]
                    })
                    .collect();
            }
        }
        out
    }

    /// The one world that `self` and `other` stand for together when they differ only in when
    /// their records go (the same call run at two instants): each record then goes at an instant
    /// between.
    pub fn join_drops(&self, other: &Model) -> Option<Model> {
        let (mut joined, mut widened) = (self.clone(), other.clone());
        for k in self.records() {
            let (other_from, other_at) = other.drops(k)?;
            let (from, at) = joined.drops_mut(k).expect("kept");
            (*from, *at) = ((*from).min(other_from), (*at).max(other_at));
            let range = (*from, *at);
            let (from, at) = widened.drops_mut(k).expect("in other");
            (*from, *at) = range;
        }
        (joined == widened).then_some(joined)
    }

    /// Future boundaries, for the clock jumps to aim at.
    pub fn upcoming(&self, now: u64) -> Vec<u64> {
        self.boundaries(now, now + 3 * 86_400_000)
    }

    /// `group_now`: when the claims in other slots than the id's were checked (a Cluster's
    /// groups, after their home); `now` elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        &mut self,
        hold: usize,
        claims: &[Spec],
        lease: u64,
        now: u64,
        group_now: u64,
        write: bool,
    ) -> Answer {
        self.drop_gone(now);
        let duplicate = claims
            .iter()
            .enumerate()
            .any(|(i, c)| claims[..i].iter().any(|e| e.target() == c.target()));
        if duplicate {
            return Answer::Err(ErrorKind::InvalidInput, None);
        }
        if let Some(existing) = self.holds.get(&hold) {
            if existing.phase != Phase::Tombstone && existing.claims != claims {
                return Answer::Err(ErrorKind::Conflict, None);
            }
            let memo = existing.memo.clone();
            return match existing.phase {
                Phase::Held if now >= existing.expires => Answer::Err(ErrorKind::Expired, None),
                Phase::Held => Answer::Granted {
                    remaining: claims
                        .iter()
                        .map(|c| match *c {
                            Spec::Spend { budget, .. } => Some(self.remaining(budget, now)),
                            _ => None,
                        })
                        .collect(),
                    replayed: true,
                },
                Phase::Committed => Answer::Err(ErrorKind::Committed, memo),
                Phase::Released => Answer::Err(ErrorKind::Released, memo),
                Phase::Tombstone => Answer::Err(ErrorKind::Released, None),
                Phase::Expired => Answer::Err(ErrorKind::Expired, memo),
            };
        }
        let mut remaining = Vec::new();
        let mut windows = Vec::new();
        let mut claim_expires = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let denied = |reason| Answer::Denied { claim: i, reason };
            let grace = self.shape.grace(hold, claim);
            let now = if grace > 0 { group_now } else { now };
            claim_expires.push(now + lease + grace);
            match *claim {
                Spec::Spend { budget, amount } => {
                    let left = self.remaining(budget, now);
                    if amount > left {
                        return denied(DenialReason::OverBudget {
                            requested: amount,
                            remaining: left,
                            resets_at_ms: self.shape.windows[budget].at(now).1,
                        });
                    }
                    remaining.push(Some(left - amount));
                    windows.push(self.shape.windows[budget].at(now).0);
                }
                Spec::Own { value, owner } => {
                    if self.owner[value].is_some_and(|o| o != owner)
                        || self.pending_other(value, hold, now)
                    {
                        return denied(DenialReason::Taken);
                    }
                    remaining.push(None);
                    windows.push(0);
                }
                Spec::ReleaseOnCommit { value, owner } => {
                    if self.owner[value] != Some(owner) {
                        return denied(DenialReason::NotOwner);
                    }
                    if self.pending_other(value, hold, now) {
                        return denied(DenialReason::Taken);
                    }
                    remaining.push(None);
                    windows.push(0);
                }
            }
        }
        if write {
            let expires = now + lease;
            for (c, &end) in claims.iter().zip(&claim_expires) {
                if let Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } = *c {
                    self.pending[value] = Some((hold, end));
                }
            }
            self.holds.insert(
                hold,
                Hold {
                    phase: Phase::Held,
                    claims: claims.to_vec(),
                    windows,
                    expires,
                    claim_expires,
                    drop_at: expires + self.shape.retain_ms,
                    drop_from: expires + self.shape.retain_ms,
                    memo: None,
                },
            );
        }
        Answer::Granted {
            remaining,
            replayed: false,
        }
    }

    fn keep_ms(&self, keep: Keep) -> Option<u64> {
        match keep {
            Keep::Default => Some(self.shape.retain_ms),
            Keep::For(ms) => Some(ms),
            Keep::Forget => None,
        }
    }

    fn undo(&mut self, hold: usize) {
        let claims = self.holds[&hold].claims.clone();
        for c in claims {
            if let Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } = c
                && self.pending[value].is_some_and(|(h, _)| h == hold)
            {
                self.pending[value] = None;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        &mut self,
        hold: usize,
        commit: bool,
        actual: Option<(usize, u64)>,
        memo: Option<Vec<u8>>,
        keep: Keep,
        now: u64,
    ) -> Answer {
        self.drop_gone(now);
        let keep_ms = self.keep_ms(keep);
        let Some(h) = self.holds.get_mut(&hold) else {
            if commit {
                return Answer::Err(ErrorKind::UnknownHold, None);
            }
            let retain = keep_ms.unwrap_or(self.shape.retain_ms);
            self.holds.insert(
                hold,
                Hold {
                    phase: Phase::Tombstone,
                    claims: Vec::new(),
                    windows: Vec::new(),
                    // A tombstone has no lease. Not the call's instant: the worlds of the call's
                    // instants must differ only in when the tombstone goes, to be joined into one
                    // that stands for every instant between (see `Sim::judge`).
                    expires: 0,
                    claim_expires: Vec::new(),
                    drop_at: now + retain,
                    drop_from: now + retain,
                    memo: None,
                },
            );
            return Answer::Settled(Settled::Tombstoned);
        };
        match (h.phase, commit) {
            (Phase::Held, _) => {}
            (Phase::Committed, true) | (Phase::Released | Phase::Expired, false) => {
                // Settled the same way before: a memo not yet kept is kept now, and the record
                // is kept at least as long as this settlement asks (or forgotten).
                match keep_ms {
                    None => {
                        self.holds.remove(&hold);
                    }
                    Some(ms) => {
                        if h.memo.is_none() {
                            h.memo = memo;
                        }
                        h.drop_at = h.drop_at.max(now + ms);
                        h.drop_from = h.drop_from.max(now + ms);
                    }
                }
                return Answer::Settled(Settled::Replayed);
            }
            (Phase::Tombstone, false) => return Answer::Settled(Settled::Replayed),
            (phase, _) => {
                let kind = match phase {
                    Phase::Committed => ErrorKind::Committed,
                    Phase::Expired => ErrorKind::Expired,
                    _ => ErrorKind::Released,
                };
                return Answer::Err(kind, None);
            }
        }
        if commit && now >= h.expires {
            h.phase = Phase::Expired;
            h.drop_exactly_at(now + self.shape.retain_ms);
            h.memo = None;
            self.undo(hold);
            return Answer::Err(ErrorKind::Expired, None);
        }
        if commit {
            if let Some((budget, amount)) = actual {
                let held = h.claims.iter().find_map(|c| match *c {
                    Spec::Spend { budget: b, amount } if b == budget => Some(amount),
                    _ => None,
                });
                match held {
                    None => return Answer::Err(ErrorKind::InvalidInput, None),
                    Some(held) if amount > held => {
                        return Answer::Err(ErrorKind::ExceedsHold, None);
                    }
                    Some(_) => {}
                }
            }
            let h = self.holds[&hold].clone();
            for (c, &w) in h.claims.iter().zip(&h.windows) {
                match *c {
                    Spec::Spend { budget, amount } => {
                        let used = match actual {
                            Some((b, used)) if b == budget => used,
                            _ => amount,
                        };
                        *self.spent.entry((budget, w)).or_default() += used;
                    }
                    Spec::Own { value, owner } => {
                        if self.pending[value].is_some_and(|(p, _)| p == hold) {
                            self.owner[value] = Some(owner);
                            self.pending[value] = None;
                        }
                    }
                    Spec::ReleaseOnCommit { value, owner } => {
                        if self.pending[value].is_some_and(|(p, _)| p == hold) {
                            self.pending[value] = None;
                        }
                        if self.owner[value] == Some(owner) {
                            self.owner[value] = None;
                        }
                    }
                }
            }
        } else {
            self.undo(hold);
        }
        match keep_ms {
            None => {
                self.holds.remove(&hold);
            }
            Some(ms) => {
                let h = self.holds.get_mut(&hold).expect("present");
                h.phase = if commit {
                    Phase::Committed
                } else {
                    Phase::Released
                };
                h.drop_exactly_at(now + ms);
                h.memo = memo;
            }
        }
        Answer::Settled(Settled::Applied)
    }

    /// Extends a live hold to `now + lease`; the answer's lease end is the runner's to check.
    pub fn extend(&mut self, hold: usize, lease: u64, now: u64, group_now: u64) -> Answer {
        self.drop_gone(now);
        let retain = self.shape.retain_ms;
        let Some(h) = self.holds.get_mut(&hold) else {
            return Answer::Err(ErrorKind::UnknownHold, None);
        };
        match h.phase {
            Phase::Committed => return Answer::Err(ErrorKind::Committed, None),
            Phase::Released | Phase::Tombstone => return Answer::Err(ErrorKind::Released, None),
            Phase::Expired => return Answer::Err(ErrorKind::Expired, None),
            Phase::Held if now >= h.expires => return Answer::Err(ErrorKind::Expired, None),
            Phase::Held => {}
        }
        let new = now + lease;
        h.expires = new;
        h.drop_exactly_at(new + retain);
        let claims = h.claims.clone();
        let mut ends = Vec::new();
        for c in claims {
            let grace = self.shape.grace(hold, &c);
            let end = if grace > 0 {
                group_now + lease + grace
            } else {
                new
            };
            ends.push(end);
            if let Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } = c
                && let Some((p, exp)) = &mut self.pending[value]
                && *p == hold
            {
                *exp = end;
            }
        }
        self.holds.get_mut(&hold).expect("present").claim_expires = ends;
        Answer::Extended
    }

    /// A refund of `amount` to refund `r`'s budget, in the window of `at` (`None`: now), kept
    /// `retain` ms.
    pub fn refund(
        &mut self,
        r: usize,
        amount: u64,
        at: Option<u64>,
        retain: u64,
        now: u64,
    ) -> Answer {
        self.drop_gone(now);
        let b = self.refund_budget(r);
        let at = at.unwrap_or(now);
        if at > now + 1000 {
            return Answer::Err(ErrorKind::InvalidInput, None);
        }
        // A refund id counts once while its record is kept, whatever window a retry names: the
        // record answers first.
        if let Some(done) = self.refunds.get(&r) {
            return if done.amount == amount {
                Answer::Settled(Settled::Replayed)
            } else {
                Answer::Err(ErrorKind::Conflict, None)
            };
        }
        let (w, ends) = self.shape.windows[b].at(at);
        if ends.is_some_and(|e| e <= now) {
            return Answer::Err(ErrorKind::Expired, None);
        }
        let spent = self.spent_of(b, w);
        if amount > spent {
            return Answer::Err(ErrorKind::ExceedsSpent, None);
        }
        self.spent.insert((b, w), spent - amount);
        self.refunds.insert(
            r,
            RefundRecord {
                amount,
                drop_at: now + retain,
                drop_from: now + retain,
            },
        );
        Answer::Settled(Settled::Applied)
    }

    pub fn budget(&mut self, b: usize, now: u64) -> Answer {
        self.drop_gone(now);
        let (w, ends) = self.shape.windows[b].at(now);
        let spent = self.spent_of(b, w);
        let held = self.held(b, w, now);
        Answer::Budget {
            spent,
            held,
            remaining: self.shape.limits[b]
                .saturating_sub(spent)
                .saturating_sub(held),
            resets_at_ms: ends,
        }
    }

    pub fn set_spent(&mut self, b: usize, spent: u64, now: u64) -> Answer {
        self.drop_gone(now);
        let (w, _) = self.shape.windows[b].at(now);
        self.spent.insert((b, w), spent);
        Answer::Done
    }

    pub fn owner_of(&mut self, v: usize, now: u64) -> Answer {
        self.drop_gone(now);
        Answer::Owner(self.owner[v])
    }

    pub fn remove(&mut self, v: usize, now: u64) -> Answer {
        self.drop_gone(now);
        Answer::Removed(self.owner[v].take().is_some())
    }
}
