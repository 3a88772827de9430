//! Runs a history against a store and the model side by side, judging every answer, with the
//! store's clock as an interval: an operation ran at some instant between its send and its
//! answer, so the model accepts the answer it gives at any instant in between (it changes only
//! at its boundaries: lease ends, bucket ends, record drops, window ends).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use tower_reserve::{
    Budget, Claim, ErrorKind, HoldId, Refund, Reservation, Reserved, Settled, Settlement, Unique,
    Window,
};

use crate::env::Env;
use crate::generate::{Fault, Op};
use crate::model::{Answer, Keep, Model, Phase, Res, Shape, Spec, Win};
use support::{Advance, fresh};

/// The most states the model keeps at once (more only when as many extremes need keeping).
const WORLDS: usize = 64;

/// An instant and the world it was recorded in.
type Extreme = (u64, usize);

/// Keeps `WORLDS` of `worlds`, in their order: for every instant a world records (each hold's
/// lease end, each claim's, the ends of the range in which each hold or refund record goes,
/// each value's pending end) the worlds with the earliest and the latest, so that whichever of
/// them the store is in, one world kept agrees; then others spread evenly, the first and the
/// last included.
fn prune(worlds: Vec<Model>) -> Vec<Model> {
    let n = worlds.len();
    // For each instant, by what it is and whose: (earliest, its world), (latest, its world).
    let mut extremes: BTreeMap<(u8, usize), (Extreme, Extreme)> = BTreeMap::new();
    for (i, m) in worlds.iter().enumerate() {
        let mut note = |what: (u8, usize), t: u64| {
            let e = extremes.entry(what).or_insert(((t, i), (t, i)));
            if t < e.0.0 {
                e.0 = (t, i);
            }
            if t > e.1.0 {
                e.1 = (t, i);
            }
        };
        for (&h, hold) in &m.holds {
            note((0, h), hold.expires);
            note((1, h), hold.drop_at);
            note((5, h), hold.drop_from);
            note(
                (2, h),
                hold.claim_expires.iter().copied().max().unwrap_or(0),
            );
        }
        for (&r, record) in &m.refunds {
            note((3, r), record.drop_at);
            note((6, r), record.drop_from);
        }
        for (v, pending) in m.pending.iter().enumerate() {
            if let Some((_, until)) = pending {
                note((4, v), *until);
            }
        }
    }
    let mut pick: BTreeSet<usize> = [0, n - 1].into();
    for ((_, first), (_, last)) in extremes.into_values() {
        pick.insert(first);
        pick.insert(last);
    }
    let spread = WORLDS.saturating_sub(pick.len()).max(2);
    for i in 0..spread {
        if pick.len() >= WORLDS {
            break;
        }
        pick.insert(i * (n - 1) / (spread - 1));
    }
    // Spread indices may coincide with extremes; top up with the next ones not taken.
    let mut next = 0;
    while pick.len() < WORLDS.min(n) {
        pick.insert(next);
        next += 1;
    }
    let mut worlds: Vec<Option<Model>> = worlds.into_iter().map(Some).collect();
    pick.into_iter()
        .map(|i| worlds[i].take().expect("each index once"))
        .collect()
}

pub const OWNERS: [&str; 3] = ["alice", "bob", "carol"];

/// The shape every case uses: four budgets (two lifetime, one per 2 s, one per day), three
/// values, eight hold ids (two of them `x@s` and `x:m@s`, whose Redis keys must not meet), four
/// refund ids.
pub fn shape(retain_ms: u64, cluster: bool) -> Shape {
    Shape {
        group_grace: if cluster { 100 } else { 0 },
        hold_slots: Vec::new(),
        budget_slots: Vec::new(),
        value_slots: Vec::new(),
        limits: vec![100, 100, 250, 60],
        windows: vec![Win::Lifetime, Win::Every(2), Win::Day, Win::Lifetime],
        values: 3,
        owners: OWNERS.len(),
        holds: 8,
        refunds: 4,
        retain_ms,
    }
}

pub fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The concrete budgets, values and ids of one case, under keys no other case uses.
pub struct Universe {
    pub budgets: Vec<Budget>,
    pub values: Vec<Unique>,
    pub ids: Vec<HoldId>,
    pub refunds: Vec<HoldId>,
    pub tag: String,
}

/// Redis Cluster's slot of a hash tag (CRC16/XMODEM mod 16384).
pub fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

impl Universe {
    /// The universe of a case; fills in the shape's slots.
    pub fn new(shape: &mut Shape) -> Self {
        let tag = fresh("sim");
        let budgets: Vec<Budget> = shape
            .limits
            .iter()
            .zip(&shape.windows)
            .enumerate()
            .map(|(i, (&limit, win))| {
                let b = Budget::new(format!("{tag}-b{i}"), limit);
                match win {
                    Win::Lifetime => b,
                    Win::Every(s) => b.per(Window::Every(Duration::from_secs(*s))),
                    Win::Day => b.per(Window::Day),
                }
            })
            .collect();
        let values = (0..shape.values)
            .map(|i| Unique::new(format!("{tag}-v"), &format!("value-{i}")))
            .collect();
        let s0 = slot_of(budgets[0].key());
        let s2 = slot_of(budgets[2].key());
        let names = [
            format!("{tag}-h0"),
            format!("{tag}-h1"),
            format!("{tag}-h2"),
            format!("{tag}-x@{s0}"),
            // `x@s`'s memo key is `x:m@s`'s record on Redis unless key layouts are injective.
            if crate::generate::without("colliding-ids") {
                format!("{tag}-w@{s0}")
            } else {
                format!("{tag}-x:m@{s0}")
            },
            format!("{tag}-y@{s2}"),
            format!("{tag}-h6"),
            format!("{tag}-h7:m"),
        ];
        let ids = names[..shape.holds]
            .iter()
            .map(|n| HoldId::new(n.clone()).expect("a valid hold id"))
            .collect();
        let refunds = (0..shape.refunds)
            .map(|i| HoldId::new(format!("{tag}-r{i}")).expect("a valid refund id"))
            .collect();
        let u = Self {
            budgets,
            values,
            ids,
            refunds,
            tag,
        };
        shape.hold_slots = u.ids.iter().map(HoldId::slot).collect();
        shape.budget_slots = u.budgets.iter().map(|b| slot_of(b.key())).collect();
        shape.value_slots = (0..shape.values)
            .map(|value| u.slot(&Spec::Own { value, owner: 0 }))
            .collect();
        u
    }

    fn claim(&self, spec: &Spec) -> Claim {
        match *spec {
            Spec::Spend { budget, amount } => Claim::spend(self.budgets[budget].clone(), amount),
            Spec::Own { value, owner } => Claim::own(self.values[value].clone(), OWNERS[owner]),
            Spec::ReleaseOnCommit { value, owner } => {
                Claim::release_on_commit(self.values[value].clone(), OWNERS[owner])
            }
        }
    }

    /// The slot of each claim's keys.
    pub fn slot(&self, spec: &Spec) -> u16 {
        match *spec {
            Spec::Spend { budget, .. } => slot_of(self.budgets[budget].key()),
            Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } => {
                let v = &self.values[value];
                slot_of(&format!("{}:{}", v.namespace(), v.digest_hex()))
            }
        }
    }
}

/// What a store answered, with the lease end when it named one.
#[derive(Debug, Clone)]
pub struct Got {
    pub answer: Answer,
    pub lease_end: Option<u64>,
}

fn unknown(got: &Got) -> bool {
    matches!(
        got.answer,
        Answer::Err(ErrorKind::Unavailable | ErrorKind::InFlight, _)
    )
}

pub fn memo_bytes(n: u8) -> Vec<u8> {
    format!("memo-{n}").into_bytes()
}

fn keep_settlement(mut s: Settlement, keep: Keep) -> Settlement {
    match keep {
        Keep::Default => s,
        Keep::For(ms) => {
            s = s.retain(Duration::from_millis(ms));
            s
        }
        Keep::Forget => s.forget(),
    }
}

/// A failure: what went wrong, at which step.
#[derive(Debug, Clone)]
pub struct Failure {
    pub step: usize,
    pub what: String,
}

pub struct Sim<'e, S: Advance> {
    pub store: S,
    pub env: &'e mut Env,
    /// Every state the model may be in, given the answers so far (an answer seen at an
    /// instant the run knows only within an interval may fit several).
    pub worlds: Vec<Model>,
    pub u: Universe,
    /// How far the store's clock is ahead of the system's.
    pub shift: u64,
    pub history: Vec<String>,
    /// Whether to record a line per step.
    pub record: bool,
}

fn err_answer(e: &tower_reserve::Error) -> Answer {
    // A conflict's memo is not compared: the embedded store attaches the record's, Redis none,
    // and the docs promise a memo with committed, released and expired only.
    let memo = match e.kind() {
        ErrorKind::Conflict => None,
        _ => e.memo().map(<[u8]>::to_vec),
    };
    Answer::Err(e.kind(), memo)
}

impl<'e, S: Advance> Sim<'e, S> {
    pub fn now(&self) -> u64 {
        system_ms() + self.shift
    }

    pub async fn advance(&mut self, by: u64) {
        if by == 0 {
            return;
        }
        self.store.advance(Duration::from_millis(by)).await;
        self.shift += by;
    }

    /// Sends one plain operation.
    async fn send(&self, op: &Op) -> Got {
        let plain = |answer| Got {
            answer,
            lease_end: None,
        };
        let u = &self.u;
        match op {
            Op::Reserve {
                hold,
                claims,
                lease,
            }
            | Op::Check {
                hold,
                claims,
                lease,
            } => {
                let built = Reservation::builder()
                    .id(u.ids[*hold].clone())
                    .lease(Duration::from_millis(*lease))
                    .claims(claims.iter().map(|c| u.claim(c)))
                    .build();
                let r = match built {
                    Ok(r) => r,
                    Err(e) => return plain(err_answer(&e)),
                };
                let result = if matches!(op, Op::Reserve { .. }) {
                    self.store.reserve(&r).await
                } else {
                    self.store.check(&r).await
                };
                match result {
                    Ok(Reserved::Granted(g)) => Got {
                        answer: Answer::Granted {
                            remaining: g.remaining,
                            replayed: g.replayed,
                        },
                        lease_end: Some(g.expires_at_ms),
                    },
                    Ok(Reserved::Denied(d)) => plain(Answer::Denied {
                        claim: d.claim,
                        reason: d.reason,
                    }),
                    Err(e) => plain(err_answer(&e)),
                }
            }
            Op::Settle {
                hold,
                commit,
                actual,
                memo,
                keep,
            } => {
                let mut s = if *commit {
                    Settlement::commit()
                } else {
                    Settlement::release()
                };
                if let Some((b, amount)) = actual {
                    s = s.actual(&u.budgets[*b], *amount);
                }
                if let Some(n) = memo {
                    s = s.memo(memo_bytes(*n));
                }
                let s = keep_settlement(s, *keep);
                plain(match self.store.settle(&u.ids[*hold], &s).await {
                    Ok(s) => Answer::Settled(s),
                    Err(e) => err_answer(&e),
                })
            }
            Op::Extend { hold, lease } => {
                match self
                    .store
                    .extend(&u.ids[*hold], Duration::from_millis(*lease))
                    .await
                {
                    Ok(end) => Got {
                        answer: Answer::Extended,
                        lease_end: Some(end),
                    },
                    // Only a reserve's refusal promises the memo (Redis sends it here too).
                    Err(e) => plain(Answer::Err(e.kind(), None)),
                }
            }
            Op::Refund {
                refund,
                amount,
                back,
                retain,
            } => {
                let b = self.model().refund_budget(*refund);
                let mut r = Refund::new(u.refunds[*refund].clone(), u.budgets[b].clone(), *amount)
                    .retain(Duration::from_millis(*retain));
                if let Some(back) = back {
                    // Into the window of `back` ms ago by the store's clock.
                    let at = self.now().saturating_sub(*back);
                    r = r.in_window_of(UNIX_EPOCH + Duration::from_millis(at));
                }
                plain(match self.store.refund(&r).await {
                    Ok(s) => Answer::Settled(s),
                    Err(e) => err_answer(&e),
                })
            }
            Op::SetSpent { budget, spent } => plain(
                match self.store.set_spent(&u.budgets[*budget], *spent).await {
                    Ok(()) => Answer::Done,
                    Err(e) => err_answer(&e),
                },
            ),
            Op::Budget(b) => plain(match self.store.budget(&u.budgets[*b]).await {
                Ok(s) if s.limit == u.budgets[*b].limit() => Answer::Budget {
                    spent: s.spent,
                    held: s.held,
                    remaining: s.remaining,
                    resets_at_ms: s.resets_at_ms,
                },
                Ok(s) => Answer::Err(ErrorKind::Protocol, Some(format!("{s:?}").into_bytes())),
                Err(e) => err_answer(&e),
            }),
            Op::Owner(v) => plain(match self.store.owner(&u.values[*v]).await {
                Ok(o) => Answer::Owner(
                    o.map(|o| OWNERS.iter().position(|x| *x == o).unwrap_or(usize::MAX)),
                ),
                Err(e) => err_answer(&e),
            }),
            Op::Remove(v) => plain(match self.store.remove(&u.values[*v]).await {
                Ok(was) => Answer::Removed(was),
                Err(e) => err_answer(&e),
            }),
            other => unreachable!("not a plain operation: {other:?}"),
        }
    }

    /// What an operation touches, by the model's knowledge of its hold.
    fn footprint(&self, op: &Op) -> Vec<Res> {
        let mut out = Vec::new();
        let record_claims = |hold: &usize, out: &mut Vec<Res>| {
            out.push(Res::Hold(*hold));
            if let Some(h) = self.model().holds.get(hold) {
                out.extend(h.claims.iter().map(Spec::target));
            }
        };
        match op {
            Op::Reserve { hold, claims, .. } | Op::Check { hold, claims, .. } => {
                record_claims(hold, &mut out);
                out.extend(claims.iter().map(Spec::target));
            }
            Op::Settle { hold, .. } | Op::Extend { hold, .. } => record_claims(hold, &mut out),
            Op::Refund { refund, .. } => {
                out.push(Res::Refund(*refund));
                out.push(Res::Budget(self.model().refund_budget(*refund)));
            }
            Op::SetSpent { budget, .. } | Op::Budget(budget) => out.push(Res::Budget(*budget)),
            Op::Owner(v) | Op::Remove(v) => out.push(Res::Value(*v)),
            _ => {}
        }
        out
    }

    fn disjoint(&self, ops: &[Op]) -> bool {
        let mut seen = Vec::new();
        for op in ops {
            let f = self.footprint(op);
            if f.iter().any(|r| seen.contains(r)) {
                return false;
            }
            seen.extend(f);
        }
        true
    }

    /// Applies `op` to `m` as at `now` (its Cluster groups at `group_now`).
    fn apply(m: &mut Model, op: &Op, now: u64, group_now: u64) -> Answer {
        match op {
            Op::Reserve {
                hold,
                claims,
                lease,
            } => m.reserve(*hold, claims, *lease, now, group_now, true),
            Op::Check {
                hold,
                claims,
                lease,
            } => m.reserve(*hold, claims, *lease, now, group_now, false),
            Op::Settle {
                hold,
                commit,
                actual,
                memo,
                keep,
            } => m.settle(*hold, *commit, *actual, memo.map(memo_bytes), *keep, now),
            Op::Extend { hold, lease } => m.extend(*hold, *lease, now, group_now),
            Op::Refund {
                refund,
                amount,
                back,
                retain,
            } => {
                // `back` was measured on the store's clock when sent; the window it names is
                // that of the send time less `back`, at most a few ms from `now - back`.
                m.refund(
                    *refund,
                    *amount,
                    back.map(|b| now.saturating_sub(b)),
                    *retain,
                    now,
                )
            }
            Op::SetSpent { budget, spent } => m.set_spent(*budget, *spent, now),
            Op::Budget(b) => m.budget(*b, now),
            Op::Owner(v) => m.owner_of(*v, now),
            Op::Remove(v) => m.remove(*v, now),
            other => unreachable!("not a plain operation: {other:?}"),
        }
    }

    /// The lease end a fresh grant or an extension answered, with the lease it asked for: the
    /// two name the instant the operation ran at. `None` for any other answer.
    fn fresh_end(op: &Op, got: &Got) -> Option<(u64, u64)> {
        match (got.lease_end, Self::lease_of(op), &got.answer) {
            (_, _, Answer::Granted { replayed: true, .. }) => None,
            (Some(end), Some(lease), _) => Some((end, lease)),
            _ => None,
        }
    }

    fn lease_of(op: &Op) -> Option<u64> {
        match op {
            Op::Reserve { lease, .. } | Op::Check { lease, .. } | Op::Extend { lease, .. } => {
                Some(*lease)
            }
            _ => None,
        }
    }

    /// Keeps the worlds in which the model, at some instant of `[t0, t1]`, answers `got`: each
    /// world's state after it (deduplicated, at most `WORLDS`). An answer that does not depend
    /// on the instant (a `set_spent`'s) may still leave states that do (the window it landed
    /// in), so every instant that fits is kept until a later answer tells them apart.
    /// `lenient`: the operation is a retry of one whose outcome was unknown, so "applied" and
    /// "replayed" are one answer.
    fn judge(&mut self, op: &Op, t0: u64, t1: u64, got: &Got, lenient: bool) -> Result<(), String> {
        let (t0, t1) = (t0.saturating_sub(2), t1 + 2);
        let fresh_end = Self::fresh_end(op, got);
        if let Some((end, lease)) = fresh_end {
            let at = end.saturating_sub(lease);
            if at < t0 || at > t1 {
                return Err(format!(
                    "lease end {end} is not {lease} ms after an instant of the call [{t0}, {t1}]"
                ));
            }
        }
        let mut kept: Vec<Model> = Vec::new();
        let mut first = None;
        let mut worlds = self.worlds.clone();
        if lenient
            && matches!(op, Op::Extend { .. })
            && let Some((end, lease)) = fresh_end
        {
            // The first attempt of a retried extension may have landed, unseen, at any instant
            // before the retry ran: the retry then extends what it extended.
            let at = end.saturating_sub(lease);
            for world in &self.worlds {
                let mut times = vec![t0];
                times.extend(world.boundaries(t0, at));
                for landed in times {
                    let mut m = world.clone();
                    if Self::apply(&mut m, op, landed, landed) == Answer::Extended {
                        worlds.push(m);
                    }
                }
            }
        }
        for world in &worlds {
            // A fresh grant or an extension names the instant it ran at.
            // The instants tried, and the spans between them whose two ends are joined below:
            // `t0`, each boundary and the instant after it, `t1`; paired in turn (`t0` with the
            // first boundary, the instant after it with the next, and so on), and each stretch
            // between two boundaries also up to the instant before the later one. Where a
            // boundary changes the state (a window turns, say), its pair cannot be joined, and the
            // instants before it would otherwise stand only for the stretch's first: a record the
            // call wrote would go at that instant's retention alone, not at any of the stretch's.
            let (candidates, spans) = match fresh_end {
                Some((end, lease)) => (vec![end - lease], Vec::new()),
                None => {
                    let mut c = vec![t0];
                    let mut before = Vec::new();
                    let mut from = t0;
                    for b in world.boundaries(t0, t1) {
                        c.push(b);
                        c.push(b + 1);
                        if b - 1 > from {
                            before.push((from, b - 1));
                        }
                        from = b + 1;
                    }
                    c.push(t1);
                    let mut spans: Vec<(u64, u64)> = c
                        .chunks(2)
                        .filter_map(|span| match *span {
                            [lo, hi] => Some((lo, hi)),
                            _ => None,
                        })
                        .collect();
                    c.extend(before.iter().map(|&(_, hi)| hi));
                    spans.extend(before);
                    (c, spans)
                }
            };
            let mut pairs = Vec::new();
            for &t in &candidates {
                pairs.push((t, t));
                // On a Cluster a group is reserved (or extended) after its home: within the
                // call, but later by as much as a slow node made it.
                if world.shape.group_grace > 0
                    && matches!(
                        op,
                        Op::Reserve { .. } | Op::Check { .. } | Op::Extend { .. }
                    )
                {
                    // As late as the call's last instant, however short the call was: a
                    // jump to just before the group's lease end would otherwise find the store
                    // still holding what the model let go.
                    let mut later: Vec<u64> = world.boundaries(t, t1);
                    if t1 > t {
                        later.push(t1);
                    }
                    pairs.extend(later.into_iter().map(|g| (t, g)));
                }
            }
            let mut matched: Vec<(u64, u64, Model)> = Vec::new();
            for &(t, g) in &pairs {
                for mut m in world.split_drops(t) {
                    let want = Self::apply(&mut m, op, t, g);
                    if first.is_none() {
                        first = Some(want.clone());
                    }
                    if !same(&want, &got.answer, lenient) {
                        continue;
                    }
                    if let (Answer::Granted { replayed: true, .. }, Some(end)) =
                        (&got.answer, got.lease_end)
                        && let Op::Reserve { hold, .. } | Op::Check { hold, .. } = op
                    {
                        match m.holds.get_mut(hold) {
                            // A replay names the lease end the hold has.
                            Some(h) if h.expires != end && !lenient => continue,
                            // The attempt that landed set the lease.
                            Some(h) if lenient => {
                                h.expires = end;
                                h.drop_at = end + m.shape.retain_ms;
                                h.drop_from = h.drop_at;
                            }
                            _ => {}
                        }
                    }
                    matched.push((t, g, m));
                }
            }
            // Between two candidates with no boundary in between the answer is the same, and
            // what the call wrote differs only in when its records go: one world, whose records
            // go at an instant between, stands for every instant of the interval.
            let mut joined = Vec::new();
            for &(lo, hi) in &spans {
                for (a, b) in matched
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| (w.0, w.1) == (lo, lo))
                {
                    for (c, d) in matched
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| (w.0, w.1) == (hi, hi))
                    {
                        if a != c
                            && let Some(j) = b.2.join_drops(&d.2)
                        {
                            joined.push((a, c, j));
                        }
                    }
                }
            }
            let mut used = vec![false; matched.len()];
            for (a, c, j) in joined {
                used[a] = true;
                used[c] = true;
                if !kept.contains(&j) {
                    kept.push(j);
                }
            }
            for (i, (_, _, m)) in matched.into_iter().enumerate() {
                if !used[i] && !kept.contains(&m) {
                    kept.push(m);
                }
            }
        }
        if kept.is_empty() {
            let first = first.expect("one candidate");
            return Err(format!(
                "model: {first:?}\n  store: {:?}{}",
                got.answer,
                diagnose(op, Some(&first), &got.answer)
            ));
        }
        if kept.len() > WORLDS {
            // The states differ in instants within a call or two; which of them the store is in
            // is then left to later answers among the ones kept. They are kept spread out, the
            // first and the last included: each world's candidates run from the call's first
            // instant to its last, so keeping only the first ones would lose the worlds where
            // the call ran late (and a record it wrote is dropped later).
            self.line(format!(
                "    ({} possible states, {WORLDS} kept)",
                kept.len()
            ));
            kept = prune(kept);
        }
        self.worlds = kept;
        Ok(())
    }

    /// The world the generator and the footprints look at.
    pub fn model(&self) -> &Model {
        &self.worlds[0]
    }

    fn line(&mut self, s: String) {
        if self.record {
            self.history.push(s);
        }
    }

    /// Runs plain operations (at once when they touch nothing in common), judges them, and
    /// settles those whose outcome is unknown by retrying them.
    pub async fn group(&mut self, ops: &[Op], step: usize) -> Result<(), Failure> {
        if self.disjoint(ops) {
            let results = self.exec(ops).await;
            return self.judge_all(ops, results, step).await;
        }
        // One at a time, each judged (and, if its outcome is unknown, settled) before the next
        // that may touch what it did.
        for op in ops {
            let one = std::slice::from_ref(op);
            let results = self.exec(one).await;
            self.judge_all(one, results, step).await?;
        }
        Ok(())
    }

    /// The operations of `ops` that touch nothing an earlier one touches: those run during a
    /// fault, all at once, so that an outcome the fault hides never stands between two answers.
    fn disjoint_subset(&self, ops: &[Op]) -> Vec<Op> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for op in ops {
            let f = self.footprint(op);
            if !f.iter().any(|r| seen.contains(r)) {
                seen.extend(f);
                out.push(op.clone());
            }
        }
        out
    }

    async fn exec(&self, ops: &[Op]) -> Vec<(u64, u64, Got)> {
        if self.disjoint(ops) {
            let t0 = self.now();
            let gots = join_all(ops.iter().map(|op| self.send(op))).await;
            let t1 = self.now();
            gots.into_iter().map(|g| (t0, t1, g)).collect()
        } else {
            let mut out = Vec::new();
            for op in ops {
                let t0 = self.now();
                let g = self.send(op).await;
                out.push((t0, self.now(), g));
            }
            out
        }
    }

    async fn judge_all(
        &mut self,
        ops: &[Op],
        results: Vec<(u64, u64, Got)>,
        step: usize,
    ) -> Result<(), Failure> {
        let pending = self.judge_known(ops, results, step)?;
        self.resolve_all(pending, step).await
    }

    /// Judges the answers that are known; answers the operations whose outcome is not (with
    /// when they were sent), to settle later.
    fn judge_known(
        &mut self,
        ops: &[Op],
        results: Vec<(u64, u64, Got)>,
        step: usize,
    ) -> Result<Vec<(Op, u64)>, Failure> {
        let mut pending = Vec::new();
        let mut known = Vec::new();
        for (op, (t0, t1, got)) in ops.iter().zip(results) {
            self.line(format!("    {op:?} -> {:?}", got.answer));
            if unknown(&got) {
                pending.push((op.clone(), t0));
                continue;
            }
            known.push((op, t0, t1, got));
        }
        // Each answer is applied at its own instants, and the model's time moves on with it (an
        // in-flight marker or a bucket it lets go): answers of operations that ran at once are
        // judged in the order given, and also by their earliest instants and by their latest,
        // and the worlds of every order that fits are kept. In the order given alone, a check
        // granted late, judged first, lets a marker go that a commit judged next, at an earlier
        // instant, still had.
        let instant =
            |(op, t0, t1, got): &(&Op, u64, u64, Got), late: bool| match Self::fresh_end(op, got) {
                Some((end, lease)) => end - lease,
                None if late => *t1,
                None => *t0,
            };
        let given: Vec<usize> = (0..known.len()).collect();
        let mut orders = vec![given.clone()];
        for late in [false, true] {
            let mut order = given.clone();
            order.sort_by_key(|&i| instant(&known[i], late));
            if !orders.contains(&order) {
                orders.push(order);
            }
        }
        let start = self.worlds.clone();
        let (mut found, mut failure): (Vec<Model>, Option<Failure>) = (Vec::new(), None);
        for order in orders {
            self.worlds = start.clone();
            for &i in &order {
                let (op, t0, t1, got) = &known[i];
                if let Err(what) = self.judge(op, *t0, *t1, got, false) {
                    failure.get_or_insert(Failure {
                        step,
                        what: format!("{op:?}\n  {what}"),
                    });
                    self.worlds.clear();
                    break;
                }
            }
            for world in self.worlds.drain(..) {
                if !found.contains(&world) {
                    found.push(world);
                }
            }
        }
        if found.is_empty() {
            self.worlds = start;
            return Err(failure.expect("an order that did not fit"));
        }
        self.worlds = if found.len() > WORLDS {
            prune(found)
        } else {
            found
        };
        Ok(pending)
    }

    /// Resolves operations whose outcome is unknown (with when each was first sent), then gives
    /// up on the hold ids whose state no answer could tell. Giving up moves the clock past every
    /// lease, so it waits until every other retry has been answered: a retry sent after that
    /// jump would be a new operation (a refund id, say, is remembered only for its retention).
    pub async fn resolve_all(
        &mut self,
        pending: Vec<(Op, u64)>,
        step: usize,
    ) -> Result<(), Failure> {
        let mut unknowable = Vec::new();
        for (op, t0) in pending {
            unknowable.extend(self.resolve(&op, t0, step).await?);
        }
        for hold in unknowable {
            self.poison(hold).await;
        }
        Ok(())
    }

    /// Retries an operation whose outcome is unknown until the store answers it; the model
    /// accepts either outcome of the first attempt. Answers the hold id whose state the retry
    /// could not tell, for [`Self::resolve_all`] to give up on.
    async fn resolve(&mut self, op: &Op, t0: u64, step: usize) -> Result<Option<usize>, Failure> {
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut last = None;
        while Instant::now() < deadline {
            let got = self.send(op).await;
            let t1 = self.now();
            if !unknown(&got) {
                self.line(format!("    retried {op:?} -> {:?}", got.answer));
                if let (Op::Reserve { hold, .. }, Answer::Err(ErrorKind::Expired, _)) =
                    (op, &got.answer)
                {
                    // The first attempt landed and its lease ended before the retry: what its
                    // lease end was is unknown, so the id is not used again.
                    return Ok(Some(*hold));
                }
                return self
                    .judge(op, t0, t1, &got, true)
                    .map(|()| None)
                    .map_err(|what| Failure {
                        step,
                        what: format!("retry of {op:?} after an unknown outcome\n  {what}"),
                    });
            }
            last = Some(got.answer);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let (
            Op::Reserve { hold, .. } | Op::Settle { hold, .. },
            Some(Answer::Err(ErrorKind::InFlight, _)),
        ) = (op, &last)
        {
            // A reservation across slots left half-made by a fault: its leases give it back.
            return Ok(Some(*hold));
        }
        Err(Failure {
            step,
            what: format!("{op:?} never got an answer after a fault: {last:?}"),
        })
    }

    /// Gives up on a hold id whose state the run cannot know, once its lease is surely over.
    async fn poison(&mut self, hold: usize) {
        self.line(format!("    hold {hold} is left alone from here"));
        let by = 60_000 + 1_000;
        self.advance(by).await;
        for m in &mut self.worlds {
            m.holds.remove(&hold);
            m.poisoned.insert(hold);
            for p in &mut m.pending {
                if p.is_some_and(|(h, _)| h == hold) {
                    *p = None;
                }
            }
        }
    }

    /// Reads every budget and owner and holds them to the model.
    pub async fn audit(&mut self, step: usize) -> Result<(), Failure> {
        let mut ops: Vec<Op> = (0..self.model().shape.limits.len())
            .map(Op::Budget)
            .collect();
        ops.extend((0..self.model().shape.values).map(Op::Owner));
        let results = self.exec(&ops).await;
        for (op, (t0, t1, got)) in ops.iter().zip(results) {
            if unknown(&got) {
                continue;
            }
            if let Err(what) = self.judge(op, t0, t1, &got, false) {
                return Err(Failure {
                    step,
                    what: format!("audit after the step: {op:?}\n  {what}"),
                });
            }
        }
        Ok(())
    }

    /// Runs one step of a history, then the audit. Not after a clock jump: the audit's reads
    /// clear expired buckets themselves, and the operation after a jump must be the first to
    /// meet what the jump expired (a denial that clears them and saves nothing, say).
    pub async fn step(&mut self, op: &Op, step: usize) -> Result<(), Failure> {
        let now = self.now();
        if let Op::Jump { .. } | Op::Advance(_) = op {
            self.clock(op, now, step).await;
            return Ok(());
        }
        match op {
            Op::Together(ops) => {
                self.line(format!("{step}: together"));
                self.group(ops, step).await?;
            }
            Op::Fault(fault, ops) => {
                self.line(format!("{step}: fault {fault:?}"));
                self.fault(*fault, ops, step).await?;
            }
            op => {
                self.line(format!("{step}:"));
                self.group(std::slice::from_ref(op), step).await?;
            }
        }
        self.audit(step).await
    }

    async fn clock(&mut self, op: &Op, now: u64, step: usize) {
        let by = match op {
            Op::Jump { pick, offset } => {
                let ups = self.model().upcoming(now);
                if ups.is_empty() {
                    1_000
                } else {
                    let target = ups[pick % ups.len()] as i64 + offset;
                    (target - now as i64).max(0) as u64
                }
            }
            Op::Advance(by) => *by,
            _ => 0,
        };
        self.line(format!("{step}: clock +{by} ms ({op:?})"));
        self.advance(by).await;
    }

    async fn fault(&mut self, fault: Fault, ops: &[Op], step: usize) -> Result<(), Failure> {
        let ops = &self.disjoint_subset(ops)[..];
        match fault {
            Fault::Kill => {
                let kill = self.env.all_nodes(&["CLIENT", "KILL", "TYPE", "normal"]);
                let (results, _) = tokio::join!(self.exec(ops), async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    kill.await
                });
                self.judge_all(ops, results, step).await
            }
            Fault::Pause(ms) => {
                let ms_text = ms.to_string();
                self.env
                    .all_nodes(&["CLIENT", "PAUSE", &ms_text, "ALL"])
                    .await;
                let started = Instant::now();
                let results = self.exec(ops).await;
                let rest = Duration::from_millis(ms + 100).saturating_sub(started.elapsed());
                tokio::time::sleep(rest).await;
                self.judge_all(ops, results, step).await
            }
            Fault::Flush => {
                let flush = self.env.all_nodes(&["FUNCTION", "FLUSH"]);
                let (results, _) = tokio::join!(self.exec(ops), flush);
                self.judge_all(ops, results, step).await
            }
            Fault::Restart => {
                let pid = self.env.pid(0);
                let (results, _) = tokio::join!(self.exec(ops), async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    crate::env::signal(pid, "KILL").await
                });
                drop(results);
                self.env.restart_node();
                // Everything it held is gone; what the operations in flight did may have
                // landed on the new, empty server (the connection retries): settle each again.
                self.worlds = vec![Model::new(self.model().shape.clone())];
                self.line("    the node restarted empty".to_owned());
                let t0 = self.now();
                let pending = ops.iter().map(|op| (op.clone(), t0)).collect();
                self.resolve_all(pending, step).await
            }
            Fault::Stop { pick, ms } => self.stop(pick, ms, ops, step).await,
            Fault::Migrate { budget } => self.migrate(budget, ops, step).await,
        }
    }

    /// Stops a node for `ms`. On a Cluster, a node serving a group of a live hold across
    /// slots, while that hold, its lease about to end, is committed.
    async fn stop(&mut self, pick: usize, ms: u64, ops: &[Op], step: usize) -> Result<(), Failure> {
        let now = self.now();
        let mut ops = ops.to_vec();
        let mut node = pick % self.env.nodes();
        if self.env.nodes() > 1 {
            let map = self.env.slot_map().await;
            let node_of = |slot: u16| {
                map.iter()
                    .find(|(a, b, _)| (*a..=*b).contains(&slot))
                    .map(|(_, _, n)| *n)
            };
            let mut across: Vec<(usize, usize, u64)> = Vec::new();
            for (h, rec) in &self.model().holds {
                if rec.phase != Phase::Held || rec.expires <= now + 50 {
                    continue;
                }
                let home = node_of(self.u.ids[*h].slot());
                for c in &rec.claims {
                    let n = node_of(self.u.slot(c));
                    if let (Some(n), Some(home)) = (n, home)
                        && n != home
                        && !across.iter().any(|(x, y, _)| *x == *h && *y == n)
                    {
                        across.push((*h, n, rec.expires));
                    }
                }
            }
            if !across.is_empty() {
                let (hold, n, expires) = across[pick % across.len()];
                node = n;
                // The lease nearly over; the commit reaches the home in time, its group after
                // the group's own lease.
                let left = expires.saturating_sub(self.now());
                if left > 150 {
                    self.line(format!("    clock +{} ms", left - 150));
                    self.advance(left - 150).await;
                }
                ops.retain(|op| !self.footprint(op).contains(&Res::Hold(hold)));
                ops.insert(
                    0,
                    Op::Settle {
                        hold,
                        commit: true,
                        actual: None,
                        memo: None,
                        keep: Keep::Default,
                    },
                );
                ops = self.disjoint_subset(&ops);
                self.line(format!("    node {node} serves a group of hold {hold}"));
            }
        }
        let pid = self.env.pid(node);
        crate::env::signal(pid, "STOP").await;
        let (results, _) = tokio::join!(self.exec(&ops), async {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            crate::env::signal(pid, "CONT").await
        });
        self.judge_all(&ops, results, step).await
    }

    /// Moves a budget's slot to another primary, key by key, running the operations between
    /// the moves.
    async fn migrate(&mut self, budget: usize, ops: &[Op], step: usize) -> Result<(), Failure> {
        let slot = slot_of(self.u.budgets[budget % self.u.budgets.len()].key());
        let Some((from, to)) = self.env.start_migration(slot).await else {
            return self.group(ops, step).await;
        };
        self.line(format!("    slot {slot}: node {from} -> node {to}"));
        let keys = self.env.keys_in_slot(from, slot).await;
        let mut ops = ops.iter();
        let mut unsettled: Vec<(Op, u64)> = Vec::new();
        for key in &keys {
            let began = self.now();
            self.env.migrate_key(from, to, key).await;
            self.moved(slot, began);
            // Between two moves, a live hold whose record lives in this slot is committed: its
            // record and its budget may now be on two nodes. Else the next operation runs.
            let now = self.now();
            let local = self.model().holds.iter().find_map(|(h, rec)| {
                (rec.phase == Phase::Held
                    && rec.expires > now + 100
                    && self.model().shape.hold_slots[*h] == slot)
                    .then_some(*h)
            });
            let op = match local {
                Some(hold) => Some(Op::Settle {
                    hold,
                    commit: true,
                    actual: None,
                    memo: None,
                    keep: Keep::Default,
                }),
                None => ops.next().cloned(),
            };
            // An operation whose outcome the move hid is settled once the slot has moved (until
            // then it may answer "unavailable" again and again); nothing that shares an id,
            // budget or value with it runs before.
            let Some(op) = op else { continue };
            let f = self.footprint(&op);
            if unsettled
                .iter()
                .any(|(u, _)| self.footprint(u).iter().any(|r| f.contains(r)))
            {
                continue;
            }
            let one = std::slice::from_ref(&op);
            let results = self.exec(one).await;
            unsettled.extend(self.judge_known(one, results, step)?);
        }
        let began = self.now();
        let finished = self.env.finish_migration(slot, from, to).await;
        self.moved(slot, began);
        if let Err(what) = finished {
            return Err(Failure { step, what });
        }
        self.resolve_all(unsettled, step).await?;
        let rest: Vec<Op> = ops.cloned().collect();
        self.group(&rest, step).await
    }

    /// Keys of `slot` moved from `began` until now: in every world, its records may go that much
    /// later (see [`Model::delay_drops`]).
    fn moved(&mut self, slot: u16, began: u64) {
        let by = self.now().saturating_sub(began);
        for m in &mut self.worlds {
            m.delay_drops(slot, began, by);
        }
    }

    /// Records, memos, group records, refunds' records, in-flight markers, windowed budgets and
    /// calls' nonces (`#`) of this run that the store still keeps.
    async fn stale_keys(&self) -> Vec<String> {
        let left = self.env.keys_matching(&format!("*{}*", self.u.tag)).await;
        left.into_iter()
            .filter(|k| {
                [":h:", ":m:", ":g:", ":f:", ":s", "#"]
                    .iter()
                    .any(|part| k.contains(part))
                    || k.ends_with(":p")
            })
            .collect()
    }

    /// After the run: far past every lease, retention and window, the store keeps only what is
    /// owned or spent for good.
    pub async fn census(&mut self, step: usize) -> Result<(), Failure> {
        // A memo is kept once, with its home record: never more memo keys than records keep
        // one in some world the answers allow (a settlement answered after a pause may have run
        // at any instant of its call, and its record is dropped that much later).
        let now = self.now();
        let memos = self
            .env
            .keys_matching(&format!("*{}*", self.u.tag))
            .await
            .into_iter()
            .filter(|k| k.contains(":m:"))
            .count();
        let kept = self
            .worlds
            .iter()
            .map(|m| {
                m.holds
                    .values()
                    .filter(|h| h.memo.is_some() && h.drop_at + 50 > now)
                    .count()
            })
            .max()
            .unwrap_or(0);
        if memos > kept {
            return Err(Failure {
                step,
                what: format!(
                    "{memos} memo keys for {kept} records that keep a memo (a memo stored more than once)"
                ),
            });
        }
        self.advance(3 * 86_400_000).await;
        self.audit(step).await?;
        let mut stale = self.stale_keys().await;
        if !stale.is_empty() {
            // A reserve whose answer a fault hid is given back in the background, for up to
            // about 3 s (`ABANDON_TRIES`); what that writes (a marker that answers a late
            // retry, kept for its own time) may land after the jump above. A leak outlives
            // the wait and a second jump.
            tokio::time::sleep(Duration::from_secs(4)).await;
            self.advance(3 * 86_400_000).await;
            stale = self.stale_keys().await;
        }
        if !stale.is_empty() {
            return Err(Failure {
                step,
                what: format!(
                    "records kept after every lease, retention and window ended (leak): {stale:?}"
                ),
            });
        }
        Ok(())
    }
}

/// Whether the model's answer and the store's are one; `lenient` for a retry after an unknown
/// outcome.
fn same(want: &Answer, got: &Answer, lenient: bool) -> bool {
    if want == got {
        return true;
    }
    if !lenient {
        return false;
    }
    match (want, got) {
        (Answer::Settled(_), Answer::Settled(_)) => true,
        (Answer::Granted { remaining: a, .. }, Answer::Granted { remaining: b, .. }) => a == b,
        (Answer::Removed(_), Answer::Removed(_)) => true,
        _ => false,
    }
}

/// Names the invariant a disagreement breaks.
fn diagnose(op: &Op, want: Option<&Answer>, got: &Answer) -> String {
    let mut out = String::new();
    match (want, got) {
        (
            Some(Answer::Budget {
                spent: ws,
                held: wh,
                ..
            }),
            Answer::Budget {
                spent: gs,
                held: gh,
                ..
            },
        ) => {
            if gh > wh {
                let _ = write!(
                    out,
                    "\n  broken: held above the live holds (phantom capacity: {} too much)",
                    gh - wh
                );
            }
            if gh < wh {
                let _ = write!(
                    out,
                    "\n  broken: a live hold is not counted (capacity lost)"
                );
            }
            if gs > ws {
                let _ = write!(
                    out,
                    "\n  broken: spent above what was committed (charged twice, or a refund lost)"
                );
            }
            if gs < ws {
                let _ = write!(
                    out,
                    "\n  broken: spent below what was committed (a commit lost, or a refund counted twice)"
                );
            }
        }
        (Some(Answer::Owner(w)), Answer::Owner(g)) if w != g => {
            let _ = write!(
                out,
                "\n  broken: the value's owner (lost by a commit, or owned by another)"
            );
        }
        (Some(Answer::Err(ErrorKind::Committed, _)), Answer::Granted { .. }) => {
            let _ = write!(
                out,
                "\n  broken: a committed id was granted again (its record went before its retention)"
            );
        }
        (Some(Answer::Settled(Settled::Replayed)), Answer::Settled(Settled::Applied)) => {
            if let Op::Refund { .. } = op {
                let _ = write!(out, "\n  broken: a refund id counted twice");
            }
        }
        _ => {}
    }
    out
}
