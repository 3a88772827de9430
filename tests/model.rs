//! A randomized model test: random sequences of reserve, commit, release, extend and reads,
//! run against a plain in-test model of the semantics and against each store, which must answer
//! exactly as the model does at every step.
//!
//! The universe of one case is small on purpose, so that holds collide: three lifetime budgets,
//! three unique values in one namespace, three owners and six hold ids, all under fresh keys.
//! Every lease is long (60 s), so nothing expires during a case.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use support::fresh;
use support::redis_server::{RedisCluster, RedisServer};
use tower_reserve::{
    Budget, Claim, DenialReason, ErrorKind, HoldId, MemoryStore, RedisStore, Refund, Reservation,
    Reserved, Settled, Settlement, Store, Unique,
};

const LEASE: Duration = Duration::from_secs(60);
const LIMITS: [u64; 3] = [100, 250, 1000];
const VALUES: usize = 3;
const OWNERS: [&str; 3] = ["alice", "bob", "carol"];
const HOLDS: usize = 6;
const REFUNDS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// One claim, by index into the case's universe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    Spend { budget: usize, amount: u64 },
    Own { value: usize, owner: usize },
    ReleaseOnCommit { value: usize, owner: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Budget(usize),
    Value(usize),
}

impl Spec {
    fn target(&self) -> Target {
        match *self {
            Spec::Spend { budget, .. } => Target::Budget(budget),
            Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } => Target::Value(value),
        }
    }
}

/// What a case runs: every reserve carries its claims explicitly.
#[derive(Debug, Clone)]
enum Op {
    Reserve {
        hold: usize,
        claims: Vec<Spec>,
    },
    Commit(usize),
    /// Commits `amount` of the hold's claim on `budget` (a partial commit).
    CommitActual {
        hold: usize,
        budget: usize,
        amount: u64,
    },
    Release(usize),
    Extend(usize),
    Refund {
        refund: usize,
        budget: usize,
        amount: u64,
    },
    Budget(usize),
    Owner(usize),
    /// These, sent at once: on Redis they land in one batch (or a few), applied in order.
    Together(Vec<Op>),
}

/// What is generated. `Retry` resends the claims last sent with that hold id, so that replays,
/// and refusals of a reserve after commit or release, are frequent; `CommitLatest` and
/// `ReleaseLatest` settle the hold id most recently reserved, so that settlements often meet a
/// live hold.
///
/// A reserve's claims are cut to one per target unless `keep_duplicates`; a reservation that
/// keeps two claims on one budget or value must be refused by `build()` as invalid input.
#[derive(Debug, Clone)]
enum RawOp {
    Reserve {
        hold: usize,
        claims: Vec<Spec>,
        keep_duplicates: bool,
    },
    Retry(usize),
    Commit(usize),
    CommitLatest,
    CommitActual {
        latest: bool,
        hold: usize,
        budget: usize,
        amount: u64,
    },
    Release(usize),
    ReleaseLatest,
    Extend(usize),
    Refund {
        refund: usize,
        budget: usize,
        amount: u64,
    },
    Budget(usize),
    Owner(usize),
    Together(Vec<RawOp>),
}

/// A value and who claims it: mostly the value's "natural" owner, so that owning, owning again
/// and giving up meet often; sometimes anyone, so that values are taken.
fn value_and_owner() -> impl Strategy<Value = (usize, usize)> {
    (0..VALUES, prop::bool::weighted(0.8), 0..OWNERS.len()).prop_map(|(value, natural, owner)| {
        (value, if natural { value % OWNERS.len() } else { owner })
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        3 => (0..LIMITS.len(), 1..=400u64)
            .prop_map(|(budget, amount)| Spec::Spend { budget, amount }),
        3 => value_and_owner().prop_map(|(value, owner)| Spec::Own { value, owner }),
        1 => value_and_owner().prop_map(|(value, owner)| Spec::ReleaseOnCommit { value, owner }),
    ]
}

fn simple_raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        6 => (0..HOLDS, vec(spec(), 1..=3), prop::bool::weighted(0.15)).prop_map(
            |(hold, claims, keep_duplicates)| RawOp::Reserve { hold, claims, keep_duplicates }
        ),
        2 => (0..HOLDS).prop_map(RawOp::Retry),
        1 => (0..HOLDS).prop_map(RawOp::Commit),
        3 => Just(RawOp::CommitLatest),
        2 => (prop::bool::weighted(0.8), 0..HOLDS, 0..LIMITS.len(), 0..=300u64).prop_map(
            |(latest, hold, budget, amount)| RawOp::CommitActual { latest, hold, budget, amount }
        ),
        1 => (0..HOLDS).prop_map(RawOp::Release),
        1 => Just(RawOp::ReleaseLatest),
        1 => (0..HOLDS).prop_map(RawOp::Extend),
        1 => (0..REFUNDS, 0..LIMITS.len(), 1..=300u64)
            .prop_map(|(refund, budget, amount)| RawOp::Refund { refund, budget, amount }),
        1 => (0..LIMITS.len()).prop_map(RawOp::Budget),
        1 => (0..VALUES).prop_map(RawOp::Owner),
    ]
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    prop_oneof![
        8 => simple_raw_op(),
        2 => vec(simple_raw_op(), 2..=4).prop_map(RawOp::Together),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    vec(raw_op(), 20..=40).prop_map(resolve)
}

fn resolve(raw: Vec<RawOp>) -> Vec<Op> {
    let mut last: HashMap<usize, Vec<Spec>> = HashMap::new();
    let mut latest = None;
    raw.into_iter()
        .map(|op| resolve_one(op, &mut last, &mut latest))
        .collect()
}

fn resolve_one(op: RawOp, last: &mut HashMap<usize, Vec<Spec>>, latest: &mut Option<usize>) -> Op {
    match op {
        RawOp::Reserve {
            hold,
            mut claims,
            keep_duplicates,
        } => {
            if !keep_duplicates {
                let mut seen = Vec::new();
                claims.retain(|c| {
                    let fresh = !seen.contains(&c.target());
                    seen.push(c.target());
                    fresh
                });
            }
            last.insert(hold, claims.clone());
            *latest = Some(hold);
            Op::Reserve { hold, claims }
        }
        RawOp::Retry(hold) => {
            let claims = last
                .entry(hold)
                .or_insert_with(|| {
                    vec![Spec::Spend {
                        budget: hold % LIMITS.len(),
                        amount: 1,
                    }]
                })
                .clone();
            *latest = Some(hold);
            Op::Reserve { hold, claims }
        }
        RawOp::Commit(h) => Op::Commit(h),
        // Before any reserve there is nothing to settle: read instead of tombstoning an id.
        RawOp::CommitLatest => latest.map_or(Op::Budget(0), Op::Commit),
        RawOp::CommitActual {
            latest: use_latest,
            hold,
            budget,
            amount,
        } => {
            let hold = if use_latest {
                latest.unwrap_or(hold)
            } else {
                hold
            };
            // Mostly the budget the hold spends from, so that partial commits happen.
            let budget = last
                .get(&hold)
                .and_then(|claims| {
                    claims.iter().find_map(|c| match c {
                        Spec::Spend { budget: b, .. } if amount % 5 != 0 => Some(*b),
                        _ => None,
                    })
                })
                .unwrap_or(budget);
            Op::CommitActual {
                hold,
                budget,
                amount,
            }
        }
        RawOp::Release(h) => Op::Release(h),
        RawOp::ReleaseLatest => latest.map_or(Op::Owner(0), Op::Release),
        RawOp::Extend(h) => Op::Extend(h),
        RawOp::Refund {
            refund,
            budget,
            amount,
        } => Op::Refund {
            refund,
            budget,
            amount,
        },
        RawOp::Budget(b) => Op::Budget(b),
        RawOp::Owner(v) => Op::Owner(v),
        RawOp::Together(ops) => Op::Together(
            ops.into_iter()
                .map(|op| resolve_one(op, last, latest))
                .collect(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Answers, normalized so that the model's and a store's can be compared
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Granted {
        remaining: Vec<Option<u64>>,
        replayed: bool,
        /// The grant names the reservation's id and, for a replay, the lease end last answered
        /// for that hold (by the first grant or the last extend).
        same_hold: bool,
    },
    Denied {
        claim: usize,
        reason: DenialReason,
    },
    Settled(Settled),
    Extended,
    Budget {
        limit: u64,
        spent: u64,
        held: u64,
        remaining: u64,
        resets_at_ms: Option<u64>,
    },
    Owner(Option<String>),
    Err(ErrorKind),
    /// The answers of `Op::Together`, in order.
    Many(Vec<Answer>),
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Held,
    Committed,
    Released,
    Tombstone,
}

#[derive(Debug)]
struct Hold {
    phase: Phase,
    /// The claims as reserved; the fingerprint is the list itself.
    claims: Vec<Spec>,
}

#[derive(Debug, Default)]
struct Model {
    spent: [u64; 3],
    held: [u64; 3],
    /// The owner of each value, by owner index.
    owner: [Option<usize>; VALUES],
    /// The hold holding each value in flight, by hold index.
    pending: [Option<usize>; VALUES],
    holds: HashMap<usize, Hold>,
    /// Refunds done, by refund id and budget: the amount.
    refunds: HashMap<(usize, usize), u64>,
    /// What happened, for the coverage check.
    events: Vec<&'static str>,
}

impl Model {
    fn remaining(&self, budget: usize) -> u64 {
        LIMITS[budget]
            .saturating_sub(self.spent[budget])
            .saturating_sub(self.held[budget])
    }

    fn apply(&mut self, op: &Op) -> Answer {
        match op {
            Op::Reserve { hold, claims } => self.reserve(*hold, claims),
            Op::Commit(hold) => self.commit(*hold, None),
            Op::CommitActual {
                hold,
                budget,
                amount,
            } => self.commit(*hold, Some((*budget, *amount))),
            Op::Release(hold) => self.release(*hold),
            Op::Refund {
                refund,
                budget,
                amount,
            } => self.refund(*refund, *budget, *amount),
            Op::Together(ops) => {
                self.events.push("together");
                Answer::Many(ops.iter().map(|op| self.apply(op)).collect())
            }
            Op::Extend(hold) => self.extend(*hold),
            Op::Budget(b) => Answer::Budget {
                limit: LIMITS[*b],
                spent: self.spent[*b],
                held: self.held[*b],
                remaining: self.remaining(*b),
                resets_at_ms: None,
            },
            Op::Owner(v) => Answer::Owner(self.owner[*v].map(|o| OWNERS[o].to_owned())),
        }
    }

    fn reserve(&mut self, hold: usize, claims: &[Spec]) -> Answer {
        let duplicate = claims
            .iter()
            .enumerate()
            .any(|(i, c)| claims[..i].iter().any(|e| e.target() == c.target()));
        if duplicate {
            self.events.push("invalid input");
            return Answer::Err(ErrorKind::InvalidInput);
        }

        if let Some(existing) = self.holds.get(&hold) {
            if existing.phase != Phase::Tombstone && existing.claims != claims {
                self.events.push("conflict");
                return Answer::Err(ErrorKind::Conflict);
            }
            return match existing.phase {
                Phase::Held => {
                    self.events.push("replayed grant");
                    Answer::Granted {
                        remaining: existing
                            .claims
                            .iter()
                            .map(|c| match *c {
                                Spec::Spend { budget, .. } => Some(self.remaining(budget)),
                                _ => None,
                            })
                            .collect(),
                        replayed: true,
                        same_hold: true,
                    }
                }
                Phase::Committed => {
                    self.events.push("reserve after commit");
                    Answer::Err(ErrorKind::Committed)
                }
                Phase::Released | Phase::Tombstone => {
                    self.events.push("reserve after release");
                    Answer::Err(ErrorKind::Released)
                }
            };
        }

        // Check every claim, in order; the first that fails is the answer. A value is in flight
        // for one hold at a time, whatever the claim (own, or release on commit).
        let mut remaining = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let denied = |reason| Answer::Denied { claim: i, reason };
            match *claim {
                Spec::Spend { budget, amount } => {
                    let left = self.remaining(budget);
                    if amount > left {
                        self.events.push("over budget");
                        return denied(DenialReason::OverBudget {
                            requested: amount,
                            remaining: left,
                            resets_at_ms: None,
                        });
                    }
                    remaining.push(Some(left - amount));
                }
                Spec::Own { value, owner } => {
                    let owned_by_other = self.owner[value].is_some_and(|o| o != owner);
                    if owned_by_other || self.pending[value].is_some() {
                        self.events.push("taken");
                        return denied(DenialReason::Taken);
                    }
                    if self.owner[value].is_some() {
                        self.events.push("own what one owns");
                    }
                    remaining.push(None);
                }
                Spec::ReleaseOnCommit { value, owner } => {
                    if self.owner[value] != Some(owner) {
                        self.events.push("not owner");
                        return denied(DenialReason::NotOwner);
                    }
                    if self.pending[value].is_some() {
                        self.events.push("taken");
                        return denied(DenialReason::Taken);
                    }
                    remaining.push(None);
                }
            }
        }

        for claim in claims {
            match *claim {
                Spec::Spend { budget, amount } => self.held[budget] += amount,
                Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. } => {
                    self.pending[value] = Some(hold);
                }
            }
        }
        self.holds.insert(
            hold,
            Hold {
                phase: Phase::Held,
                claims: claims.to_vec(),
            },
        );
        self.events.push("fresh grant");
        Answer::Granted {
            remaining,
            replayed: false,
            same_hold: true,
        }
    }

    /// Commits a hold: whole, or (`actual`) with that amount of its claim on that budget.
    fn commit(&mut self, hold: usize, actual: Option<(usize, u64)>) -> Answer {
        let Some(h) = self.holds.get_mut(&hold) else {
            self.events.push("unknown hold");
            return Answer::Err(ErrorKind::UnknownHold);
        };
        match h.phase {
            Phase::Committed => {
                self.events.push("commit replayed");
                return Answer::Settled(Settled::Replayed);
            }
            Phase::Released | Phase::Tombstone => {
                self.events.push("commit after release");
                return Answer::Err(ErrorKind::Released);
            }
            Phase::Held => {}
        }
        if let Some((budget, amount)) = actual {
            // Checked before anything changes: the budget must be one the hold spends from, and
            // the amount at most what it holds there.
            let held = h.claims.iter().find_map(|c| match *c {
                Spec::Spend { budget: b, amount } if b == budget => Some(amount),
                _ => None,
            });
            match held {
                None => {
                    self.events.push("actual of a budget not held");
                    return Answer::Err(ErrorKind::InvalidInput);
                }
                Some(held) if amount > held => {
                    self.events.push("actual above what is held");
                    return Answer::Err(ErrorKind::ExceedsHold);
                }
                Some(_) => self.events.push("partial commit"),
            }
        }
        h.phase = Phase::Committed;
        for claim in &h.claims {
            match *claim {
                Spec::Spend { budget, amount } => {
                    self.held[budget] -= amount;
                    self.spent[budget] += match actual {
                        Some((b, used)) if b == budget => used,
                        _ => amount,
                    };
                }
                Spec::Own { value, owner } => {
                    // The hold had the value in flight: it is the owner's now.
                    if self.pending[value] == Some(hold) {
                        self.owner[value] = Some(owner);
                        self.pending[value] = None;
                    }
                }
                Spec::ReleaseOnCommit { value, owner } => {
                    if self.pending[value] == Some(hold) {
                        self.pending[value] = None;
                    }
                    if self.owner[value] == Some(owner) {
                        self.owner[value] = None;
                        self.events.push("freed on commit");
                    }
                }
            }
        }
        self.events.push("commit applied");
        Answer::Settled(Settled::Applied)
    }

    fn release(&mut self, hold: usize) -> Answer {
        let Some(h) = self.holds.get_mut(&hold) else {
            self.holds.insert(
                hold,
                Hold {
                    phase: Phase::Tombstone,
                    claims: Vec::new(),
                },
            );
            self.events.push("tombstoned");
            return Answer::Settled(Settled::Tombstoned);
        };
        match h.phase {
            Phase::Committed => {
                self.events.push("release after commit");
                return Answer::Err(ErrorKind::Committed);
            }
            Phase::Released | Phase::Tombstone => {
                self.events.push("release replayed");
                return Answer::Settled(Settled::Replayed);
            }
            Phase::Held => {}
        }
        h.phase = Phase::Released;
        for claim in &h.claims {
            match *claim {
                Spec::Spend { budget, amount } => self.held[budget] -= amount,
                Spec::Own { value, .. } | Spec::ReleaseOnCommit { value, .. }
                    if self.pending[value] == Some(hold) =>
                {
                    self.pending[value] = None;
                }
                _ => {}
            }
        }
        self.events.push("release applied");
        Answer::Settled(Settled::Applied)
    }

    fn refund(&mut self, refund: usize, budget: usize, amount: u64) -> Answer {
        if let Some(&done) = self.refunds.get(&(refund, budget)) {
            if done == amount {
                self.events.push("refund replayed");
                return Answer::Settled(Settled::Replayed);
            }
            self.events.push("refund conflict");
            return Answer::Err(ErrorKind::Conflict);
        }
        if amount > self.spent[budget] {
            self.events.push("refund above spent");
            return Answer::Err(ErrorKind::ExceedsSpent);
        }
        self.spent[budget] -= amount;
        self.refunds.insert((refund, budget), amount);
        self.events.push("refund applied");
        Answer::Settled(Settled::Applied)
    }

    fn extend(&mut self, hold: usize) -> Answer {
        match self.holds.get(&hold).map(|h| h.phase) {
            None => Answer::Err(ErrorKind::UnknownHold),
            Some(Phase::Committed) => Answer::Err(ErrorKind::Committed),
            Some(Phase::Released | Phase::Tombstone) => Answer::Err(ErrorKind::Released),
            Some(Phase::Held) => {
                self.events.push("extended");
                Answer::Extended
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case against a store
// ---------------------------------------------------------------------------------------------

/// The concrete budgets, values and ids of one case, under keys no other case uses.
struct Universe {
    budgets: Vec<Budget>,
    values: Vec<Unique>,
    ids: Vec<HoldId>,
    refunds: Vec<HoldId>,
    /// The lease end last answered for each hold, to check that a replay answers the same hold.
    expiries: HashMap<usize, u64>,
}

impl Universe {
    fn new() -> Self {
        let tag = fresh("model");
        Self {
            budgets: LIMITS
                .iter()
                .enumerate()
                .map(|(i, &limit)| Budget::new(format!("{tag}-budget-{i}"), limit))
                .collect(),
            values: (0..VALUES)
                .map(|i| Unique::new(format!("{tag}-names"), &format!("value-{i}")))
                .collect(),
            ids: (0..HOLDS)
                .map(|i| HoldId::new(format!("{tag}-hold-{i}")).expect("a valid hold id"))
                .collect(),
            refunds: (0..REFUNDS)
                .map(|i| HoldId::new(format!("{tag}-refund-{i}")).expect("a valid refund id"))
                .collect(),
            expiries: HashMap::new(),
        }
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

    /// Applies `op` to the store. `Together` sends its operations at once when `at_once`, so
    /// that they reach the store together, in order; otherwise one after the other.
    async fn apply<S: Store>(&mut self, store: &S, op: &Op, at_once: bool) -> Answer {
        match op {
            Op::Together(ops) if at_once => {
                let sent =
                    futures_util::future::join_all(ops.iter().map(|op| self.send(store, op)));
                let outcomes = sent.await;
                Answer::Many(
                    ops.iter()
                        .zip(outcomes)
                        .map(|(op, outcome)| self.answer(op, outcome))
                        .collect(),
                )
            }
            Op::Together(ops) => {
                let mut answers = Vec::with_capacity(ops.len());
                for op in ops {
                    let outcome = self.send(store, op).await;
                    answers.push(self.answer(op, outcome));
                }
                Answer::Many(answers)
            }
            op => {
                let outcome = self.send(store, op).await;
                self.answer(op, outcome)
            }
        }
    }

    /// Sends one (non-`Together`) operation.
    async fn send<S: Store>(&self, store: &S, op: &Op) -> Outcome {
        match op {
            Op::Reserve { claims, hold } => {
                let built = Reservation::builder()
                    .id(self.ids[*hold].clone())
                    .lease(LEASE)
                    .claims(claims.iter().map(|c| self.claim(c)))
                    .build();
                match built {
                    Ok(reservation) => Outcome::Reserved(store.reserve(&reservation).await),
                    Err(e) => Outcome::Answer(Answer::Err(e.kind())),
                }
            }
            Op::Commit(hold) => settle_outcome(store.commit(&self.ids[*hold]).await),
            Op::CommitActual {
                hold,
                budget,
                amount,
            } => {
                let settlement = Settlement::commit().actual(&self.budgets[*budget], *amount);
                settle_outcome(store.settle(&self.ids[*hold], &settlement).await)
            }
            Op::Release(hold) => settle_outcome(store.release(&self.ids[*hold]).await),
            Op::Extend(hold) => Outcome::Extended(store.extend(&self.ids[*hold], LEASE).await),
            Op::Refund {
                refund,
                budget,
                amount,
            } => {
                let refund = Refund::new(
                    self.refunds[*refund].clone(),
                    self.budgets[*budget].clone(),
                    *amount,
                );
                settle_outcome(store.refund(&refund).await)
            }
            Op::Budget(b) => Outcome::Answer(match store.budget(&self.budgets[*b]).await {
                Ok(s) => Answer::Budget {
                    limit: s.limit,
                    spent: s.spent,
                    held: s.held,
                    remaining: s.remaining,
                    resets_at_ms: s.resets_at_ms,
                },
                Err(e) => Answer::Err(e.kind()),
            }),
            Op::Owner(v) => Outcome::Answer(match store.owner(&self.values[*v]).await {
                Ok(owner) => Answer::Owner(owner),
                Err(e) => Answer::Err(e.kind()),
            }),
            Op::Together(_) => unreachable!("Together is not nested"),
        }
    }

    /// The answer an outcome stands for, noting lease ends for later replays.
    fn answer(&mut self, op: &Op, outcome: Outcome) -> Answer {
        match (op, outcome) {
            (Op::Reserve { hold, .. }, Outcome::Reserved(Ok(answer))) => {
                self.reserved(*hold, answer)
            }
            (Op::Extend(hold), Outcome::Extended(Ok(ends))) => {
                self.expiries.insert(*hold, ends);
                Answer::Extended
            }
            (_, Outcome::Reserved(Err(e)) | Outcome::Extended(Err(e))) => Answer::Err(e.kind()),
            (_, Outcome::Answer(answer)) => answer,
            (op, _) => unreachable!("no such outcome of {op:?}"),
        }
    }

    fn reserved(&mut self, hold: usize, answer: Reserved) -> Answer {
        match answer {
            Reserved::Granted(grant) => {
                let mut same_hold = grant.id == self.ids[hold];
                if grant.replayed {
                    same_hold &= self.expiries.get(&hold) == Some(&grant.expires_at_ms);
                } else {
                    self.expiries.insert(hold, grant.expires_at_ms);
                }
                Answer::Granted {
                    remaining: grant.remaining,
                    replayed: grant.replayed,
                    same_hold,
                }
            }
            Reserved::Denied(denial) => Answer::Denied {
                claim: denial.claim,
                reason: denial.reason,
            },
        }
    }
}

/// What a store answered one operation, before it is normalized.
enum Outcome {
    Reserved(Result<Reserved, tower_reserve::Error>),
    Extended(Result<u64, tower_reserve::Error>),
    Answer(Answer),
}

fn settle_outcome(result: Result<Settled, tower_reserve::Error>) -> Outcome {
    Outcome::Answer(result.map_or_else(|e| Answer::Err(e.kind()), Answer::Settled))
}

/// Runs one sequence against the model and the store side by side; the first step where they
/// disagree fails the case, with the transcript up to it. Answers what happened in the model.
async fn run_case<S: Store>(
    store: &S,
    ops: &[Op],
    at_once: bool,
) -> Result<Vec<&'static str>, TestCaseError> {
    let mut model = Model::default();
    let mut universe = Universe::new();
    let mut transcript = String::new();
    for (step, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = universe.apply(store, op, at_once).await;
        if want != got {
            return Err(TestCaseError::fail(format!(
                "step {step}: {op:?}\n  model: {want:?}\n  store: {got:?}\nsteps before it:\n{transcript}"
            )));
        }
        let _ = writeln!(transcript, "  {step:>2}: {op:?} -> {want:?}");
    }
    Ok(model.events)
}

/// `at_once`: whether `Together` sends its operations at once. On one node they then reach the
/// store in order and the model applies them in that order. On a Cluster a reservation across
/// slots takes several calls, so operations sent at once may interleave there; the Cluster is
/// checked one operation at a time (its batches across slots are checked in the Cluster suite).
fn check_against_model<S: Store>(rt: &tokio::runtime::Runtime, store: &S, at_once: bool) {
    // The written scenarios first: they reach what random sequences over six hold ids rarely do.
    for (i, scenario) in scenarios().into_iter().enumerate() {
        let ops: Vec<Op> = scenario.into_iter().map(|(op, _)| op).collect();
        if let Err(e) = rt.block_on(run_case(store, &ops, at_once)) {
            panic!("scenario {i}: the store disagrees with the model: {e}");
        }
    }

    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let coverage = RefCell::new(BTreeMap::<&'static str, usize>::new());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&ops(), |ops| {
        let events = rt.block_on(run_case(store, &ops, at_once))?;
        let mut coverage = coverage.borrow_mut();
        for event in events {
            *coverage.entry(event).or_default() += 1;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("the store disagrees with the model: {e}");
    }

    // The generator must reach the interesting paths, or agreement proves little. Each of these
    // happened at least 6 times in every one of 150 trial runs of 48 cases; the rarer ones
    // (freeing on commit, owning what one owns, reserving after commit) are only reported here
    // and are reached for certain by the written scenarios.
    let coverage = coverage.into_inner();
    eprintln!("model events over 48 random cases: {coverage:#?}");
    for event in [
        "fresh grant",
        "replayed grant",
        "over budget",
        "taken",
        "not owner",
        "invalid input",
        "conflict",
        "reserve after release",
        "commit applied",
        "commit replayed",
        "commit after release",
        "release applied",
        "release replayed",
        "release after commit",
        "tombstoned",
        "unknown hold",
        "together",
        "partial commit",
        "actual above what is held",
        "refund applied",
        "refund above spent",
    ] {
        assert!(
            coverage.get(event).is_some_and(|&n| n > 0),
            "no random case reached {event:?}: {coverage:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Written scenarios, with the answers worked out by hand
// ---------------------------------------------------------------------------------------------

fn reserve(hold: usize, claims: &[Spec]) -> Op {
    Op::Reserve {
        hold,
        claims: claims.to_vec(),
    }
}

fn spend(budget: usize, amount: u64) -> Spec {
    Spec::Spend { budget, amount }
}

fn own(value: usize, owner: usize) -> Spec {
    Spec::Own { value, owner }
}

fn roc(value: usize, owner: usize) -> Spec {
    Spec::ReleaseOnCommit { value, owner }
}

fn grant(remaining: &[Option<u64>]) -> Answer {
    Answer::Granted {
        remaining: remaining.to_vec(),
        replayed: false,
        same_hold: true,
    }
}

fn replay(remaining: &[Option<u64>]) -> Answer {
    Answer::Granted {
        remaining: remaining.to_vec(),
        replayed: true,
        same_hold: true,
    }
}

fn over(claim: usize, requested: u64, remaining: u64) -> Answer {
    Answer::Denied {
        claim,
        reason: DenialReason::OverBudget {
            requested,
            remaining,
            resets_at_ms: None,
        },
    }
}

fn denied(claim: usize, reason: DenialReason) -> Answer {
    Answer::Denied { claim, reason }
}

fn settled(how: Settled) -> Answer {
    Answer::Settled(how)
}

fn err(kind: ErrorKind) -> Answer {
    Answer::Err(kind)
}

fn owned_by(owner: Option<usize>) -> Answer {
    Answer::Owner(owner.map(|o| OWNERS[o].to_owned()))
}

fn budget(b: usize, spent: u64, held: u64) -> Answer {
    Answer::Budget {
        limit: LIMITS[b],
        spent,
        held,
        remaining: LIMITS[b] - spent - held,
        resets_at_ms: None,
    }
}

/// Owners 0 and 1 are alice and bob; budget 0 has a limit of 100, budget 1 of 250, budget 2 of
/// 1000.
fn scenarios() -> Vec<Vec<(Op, Answer)>> {
    use DenialReason::{NotOwner, Taken};
    use ErrorKind::{Committed, Conflict, InvalidInput, Released, UnknownHold};
    use Settled::{Applied, Replayed, Tombstoned};
    let (alice, bob) = (0, 1);
    let ownership = vec![
        (reserve(0, &[own(0, alice)]), grant(&[None])),
        (Op::Commit(0), settled(Applied)),
        (Op::Owner(0), owned_by(Some(alice))),
        // An e-mail change: own value 1, give value 0 up on commit. Both are in flight for it.
        (
            reserve(1, &[own(1, alice), roc(0, alice)]),
            grant(&[None, None]),
        ),
        // The owner claiming what it owns meets the change in flight: taken.
        (reserve(2, &[own(0, alice)]), denied(0, Taken)),
        (Op::Owner(0), owned_by(Some(alice))),
        (Op::Commit(1), settled(Applied)),
        (Op::Owner(0), owned_by(None)),
        (Op::Owner(1), owned_by(Some(alice))),
        (reserve(3, &[own(0, bob)]), grant(&[None])),
        // Held in flight by hold 3: taken, even for alice.
        (reserve(4, &[own(0, alice)]), denied(0, Taken)),
        (Op::Commit(3), settled(Applied)),
        (Op::Owner(0), owned_by(Some(bob))),
        // The owner claims what it owns: granted, and the value is in flight for it meanwhile.
        (reserve(2, &[own(0, bob)]), grant(&[None])),
        (reserve(5, &[roc(0, bob)]), denied(0, Taken)),
        (Op::Commit(2), settled(Applied)),
        (Op::Owner(0), owned_by(Some(bob))),
        (
            reserve(4, &[spend(0, 100), roc(1, alice)]),
            grant(&[Some(0), None]),
        ),
        (reserve(5, &[roc(1, alice)]), denied(0, Taken)),
        (Op::Commit(4), settled(Applied)),
        (Op::Owner(1), owned_by(None)),
        (Op::Budget(0), budget(0, 100, 0)),
        (reserve(0, &[own(0, alice)]), err(Committed)),
        (reserve(1, &[own(1, alice)]), err(Conflict)),
        (Op::Release(1), err(Committed)),
        (Op::Extend(4), err(Committed)),
        // A release-on-commit that is released gives nothing up.
        (reserve(5, &[roc(0, bob)]), grant(&[None])),
        (Op::Release(5), settled(Applied)),
        (Op::Owner(0), owned_by(Some(bob))),
    ];
    let same = [spend(1, 200), own(0, alice)];
    let lifecycle = vec![
        (Op::Release(0), settled(Tombstoned)),
        (Op::Release(0), settled(Replayed)),
        (reserve(0, &[spend(0, 10)]), err(Released)),
        (Op::Commit(0), err(Released)),
        (Op::Extend(0), err(Released)),
        // The first claim that fails is the answer; nothing is held.
        (
            reserve(1, &[spend(1, 200), own(0, alice), spend(0, 101)]),
            over(2, 101, 100),
        ),
        (Op::Budget(1), budget(1, 0, 0)),
        (reserve(1, &same), grant(&[Some(50), None])),
        (reserve(1, &same), replay(&[Some(50), None])),
        (reserve(2, &[spend(1, 51)]), over(0, 51, 50)),
        (reserve(2, &[own(0, bob)]), denied(0, Taken)),
        (reserve(2, &[own(0, alice)]), denied(0, Taken)),
        (Op::Budget(1), budget(1, 0, 200)),
        (Op::Extend(1), Answer::Extended),
        (reserve(1, &same), replay(&[Some(50), None])),
        (reserve(1, &[spend(1, 200)]), err(Conflict)),
        (Op::Release(1), settled(Applied)),
        (Op::Release(1), settled(Replayed)),
        (Op::Commit(1), err(Released)),
        (Op::Extend(1), err(Released)),
        (reserve(1, &same), err(Released)),
        (Op::Budget(1), budget(1, 0, 0)),
        (
            reserve(2, &[own(0, bob), spend(1, 250)]),
            grant(&[None, Some(0)]),
        ),
        (reserve(3, &[spend(2, 1000), spend(1, 1)]), over(1, 1, 0)),
        (Op::Budget(2), budget(2, 0, 0)),
        (Op::Commit(2), settled(Applied)),
        (Op::Commit(2), settled(Replayed)),
        (Op::Budget(1), budget(1, 250, 0)),
        (reserve(3, &[roc(0, alice)]), denied(0, NotOwner)),
        (
            reserve(3, &[roc(0, bob), spend(0, 1), spend(0, 2)]),
            err(InvalidInput),
        ),
        (reserve(3, &[roc(0, bob)]), grant(&[None])),
        (Op::Release(3), settled(Applied)),
        (Op::Owner(0), owned_by(Some(bob))),
        (Op::Commit(5), err(UnknownHold)),
        (Op::Extend(5), err(UnknownHold)),
    ];
    let carol = 2;
    let exclusive = vec![
        (reserve(0, &[own(2, carol)]), grant(&[None])),
        (Op::Commit(0), settled(Applied)),
        (reserve(1, &[roc(2, carol)]), grant(&[None])),
        // Two changes of one owner's value: the second waits for the first to end.
        (reserve(2, &[roc(2, carol), spend(2, 5)]), denied(0, Taken)),
        (Op::Budget(2), budget(2, 0, 0)),
        (Op::Commit(1), settled(Applied)),
        (Op::Owner(2), owned_by(None)),
        // Then it finds the value no longer carol's.
        (
            reserve(2, &[roc(2, carol), spend(2, 5)]),
            denied(0, NotOwner),
        ),
        (reserve(3, &[own(2, bob)]), grant(&[None])),
        (Op::Commit(3), settled(Applied)),
        (Op::Owner(2), owned_by(Some(bob))),
        (Op::Budget(2), budget(2, 0, 0)),
    ];
    // Sent together: on Redis these reach one batch, applied in order.
    let together = vec![
        // The same hold reserved and released in one batch.
        (
            Op::Together(vec![reserve(0, &[spend(0, 60)]), Op::Release(0)]),
            Answer::Many(vec![grant(&[Some(40)]), settled(Applied)]),
        ),
        (Op::Budget(0), budget(0, 0, 0)),
        // Two reservations racing for the last cents of one budget in one batch: the first
        // sent wins them.
        (reserve(1, &[spend(0, 70)]), grant(&[Some(30)])),
        (
            Op::Together(vec![
                reserve(2, &[spend(0, 30)]),
                reserve(3, &[spend(0, 30)]),
                Op::Budget(0),
            ]),
            Answer::Many(vec![grant(&[Some(0)]), over(0, 30, 0), budget(0, 0, 100)]),
        ),
        // A commit and a release of two holds, and a reserve that needs what the release
        // gives back, in one batch.
        (
            Op::Together(vec![
                Op::Commit(1),
                Op::Release(2),
                reserve(4, &[spend(0, 30)]),
            ]),
            Answer::Many(vec![settled(Applied), settled(Applied), grant(&[Some(0)])]),
        ),
        (Op::Budget(0), budget(0, 70, 30)),
    ];
    // Partial commits and refunds.
    let actual = vec![
        (
            reserve(0, &[spend(1, 200), spend(2, 300)]),
            grant(&[Some(50), Some(700)]),
        ),
        // Above what is held: refused, nothing changes.
        (
            Op::CommitActual {
                hold: 0,
                budget: 1,
                amount: 201,
            },
            err(ErrorKind::ExceedsHold),
        ),
        // A budget the hold does not spend from: refused.
        (
            Op::CommitActual {
                hold: 0,
                budget: 0,
                amount: 1,
            },
            err(InvalidInput),
        ),
        (Op::Budget(1), budget(1, 0, 200)),
        // 120 of budget 1 is spent, 80 goes back; budget 2 commits whole.
        (
            Op::CommitActual {
                hold: 0,
                budget: 1,
                amount: 120,
            },
            settled(Applied),
        ),
        (Op::Budget(1), budget(1, 120, 0)),
        (Op::Budget(2), budget(2, 300, 0)),
        (Op::Commit(0), settled(Replayed)),
        // Zero spends nothing of that budget.
        (reserve(1, &[spend(1, 50)]), grant(&[Some(80)])),
        (
            Op::CommitActual {
                hold: 1,
                budget: 1,
                amount: 0,
            },
            settled(Applied),
        ),
        (Op::Budget(1), budget(1, 120, 0)),
        // Refunds: once per id, never below zero.
        (
            Op::Refund {
                refund: 0,
                budget: 1,
                amount: 100,
            },
            settled(Applied),
        ),
        (
            Op::Refund {
                refund: 0,
                budget: 1,
                amount: 100,
            },
            settled(Replayed),
        ),
        (
            Op::Refund {
                refund: 0,
                budget: 1,
                amount: 5,
            },
            err(Conflict),
        ),
        (
            Op::Refund {
                refund: 1,
                budget: 1,
                amount: 21,
            },
            err(ErrorKind::ExceedsSpent),
        ),
        (Op::Budget(1), budget(1, 20, 0)),
        (reserve(2, &[spend(1, 230)]), grant(&[Some(0)])),
    ];
    vec![ownership, lifecycle, exclusive, together, actual]
}

/// The model itself answers the written scenarios as worked out by hand, and they reach what
/// the random sequences seldom do.
#[test]
fn the_model_answers_the_scenarios_as_written() {
    let mut events = Vec::new();
    for (i, scenario) in scenarios().into_iter().enumerate() {
        let mut model = Model::default();
        for (step, (op, want)) in scenario.iter().enumerate() {
            assert_eq!(&model.apply(op), want, "scenario {i}, step {step}: {op:?}");
        }
        events.extend(model.events);
    }
    for event in [
        "freed on commit",
        "own what one owns",
        "reserve after commit",
        "extended",
        "replayed grant",
        "tombstoned",
        "together",
        "partial commit",
        "actual of a budget not held",
        "refund replayed",
        "refund conflict",
    ] {
        assert!(events.contains(&event), "no scenario reached {event:?}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn memory_store_agrees_with_the_model() {
    let rt = runtime();
    check_against_model(&rt, &MemoryStore::new(), true);
}

#[test]
fn redis_store_agrees_with_the_model() {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt
        .block_on(patient().connect(&server.url()))
        .expect("connect to redis");
    check_against_model(&rt, &store, true);
    // Operations sent together go out together: a burst of reads queued at once, behind the
    // first call, shares calls.
    let before = store.batch_stats();
    rt.block_on(futures_util::future::join_all((0..64).map(|i| {
        let budget = Budget::new(format!("burst-{i}"), 1);
        let store = store.clone();
        async move { store.budget(&budget).await.expect("read") }
    })));
    let after = store.batch_stats();
    assert!(
        after.ops - before.ops > after.calls - before.calls,
        "{before:?} {after:?}"
    );
}

/// Stores for the model test wait as long as a loaded machine needs: a call that timed out
/// would be an answer the model cannot predict.
fn patient() -> tower_reserve::RedisStoreBuilder {
    RedisStore::builder().timeout(Duration::from_secs(30))
}

#[test]
fn cluster_store_agrees_with_the_model() {
    // The model's hold ids are named, so their claims sit on other slots than their records:
    // nearly every reservation here crosses slots (a home and its groups).
    let cluster = RedisCluster::start(3, 0);
    let rt = runtime();
    let store = rt
        .block_on(patient().connect_cluster(cluster.urls()))
        .expect("connect to the cluster");
    check_against_model(&rt, &store, false);
}
