//! The seeded generator: operations over a tiny universe, chosen to collide, with clock jumps
//! aimed at the model's next boundaries and faults.

use rand::RngExt;
use rand::rngs::StdRng;

use crate::model::{Keep, Model, Phase, Spec};

/// What a step does. Everything a step needs is in it, so that a recorded history replays
/// without the generator (the shrinker replays sub-histories). Choices that depend on the
/// state (which boundary a jump aims at, which node a fault hits) are made when it runs, from
/// the model, by index.
#[derive(Debug, Clone)]
pub enum Op {
    Reserve {
        hold: usize,
        claims: Vec<Spec>,
        lease: u64,
    },
    Check {
        hold: usize,
        claims: Vec<Spec>,
        lease: u64,
    },
    Settle {
        hold: usize,
        commit: bool,
        actual: Option<(usize, u64)>,
        memo: Option<u8>,
        keep: Keep,
    },
    Extend {
        hold: usize,
        lease: u64,
    },
    Refund {
        refund: usize,
        amount: u64,
        /// Into the window of this long ago (`None`: the current one).
        back: Option<u64>,
        retain: u64,
    },
    SetSpent {
        budget: usize,
        spent: u64,
    },
    Budget(usize),
    Owner(usize),
    Remove(usize),
    /// Moves the clock to the `pick`-th upcoming boundary of the model, plus `offset` ms.
    Jump {
        pick: usize,
        offset: i64,
    },
    /// Moves the clock this many ms.
    Advance(u64),
    /// Sent at once. Operations that touch one id, budget, value or refund run one after the
    /// other instead, so that every answer has one linearization.
    Together(Vec<Op>),
    /// A fault, with the operations that run while it lasts.
    Fault(Fault, Vec<Op>),
}

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// `CLIENT KILL TYPE normal` on every node while the operations are in flight.
    Kill,
    /// `CLIENT PAUSE` for this long on every node, longer than the store's time limit: calls
    /// time out and their writes land afterwards.
    Pause(u64),
    /// `SIGSTOP` of one node for this long, then `SIGCONT`. On a Cluster it picks a node that
    /// serves a group of a live hold across slots and commits that hold meanwhile, with its
    /// lease about to end.
    Stop { pick: usize, ms: u64 },
    /// `FUNCTION FLUSH` on every node while the operations are in flight.
    Flush,
    /// One node killed and started again, empty (one node only): the model starts over.
    Restart,
    /// On a Cluster: the slot of a budget moves to another primary, key by key, with the
    /// operations run between the moves.
    Migrate { budget: usize },
}

/// What kinds of store the generator feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Node,
    Cluster,
}

pub struct Gen {
    pub rng: StdRng,
    /// The claims last reserved under each id, to retry them.
    last: Vec<Option<Vec<Spec>>>,
    pub faults: bool,
    pub kind: Kind,
    /// Whether the last step moved the clock: the next one is then often a reservation, the
    /// first call to meet what the jump expired.
    jumped: bool,
}

/// Whether `SIM_WITHOUT` (a comma-separated list) leaves `what` out of the generated histories,
/// to look past a known failure: `window-refunds`, `forget`, `release-forget`, `retain`, `resettle` (no
/// settle of a settled id), `check`, `colliding-ids`, `shared-keys`
/// (through the layer: each caller its own key names), `faults:<name>` (`kill`, `pause`, `stop`,
/// `flush`, `restart`, `migrate`).
///
pub fn without(what: &str) -> bool {
    std::env::var("SIM_WITHOUT").is_ok_and(|list| list.split(',').any(|w| w.trim() == what))
}

/// Whether this is the bounded run (neither `SIM_SECONDS` nor `SIM_RANDOM=1`), which must pass or
/// fail by the code alone: its pauses and stops last twice the client's time limit or more, so
/// that every call they catch times out and its write lands afterwards. A long run also draws
/// lengths around the limit, where a call may be answered late or time out.
pub fn bounded() -> bool {
    std::env::var("SIM_SECONDS").is_err() && std::env::var("SIM_RANDOM").as_deref() != Ok("1")
}

const LEASES: [u64; 6] = [250, 800, 1_500, 3_000, 10_000, 60_000];

impl Gen {
    pub fn new(rng: StdRng, holds: usize, faults: bool, kind: Kind) -> Self {
        Self {
            rng,
            last: vec![None; holds],
            faults,
            kind,
            jumped: false,
        }
    }

    fn lease(&mut self) -> u64 {
        LEASES[self.rng.random_range(0..LEASES.len())]
    }

    fn spec(&mut self, m: &Model) -> Spec {
        let shape = &m.shape;
        match self.rng.random_range(0..7) {
            0..=3 => {
                let budget = self.rng.random_range(0..shape.limits.len());
                let amount = match self.rng.random_range(0..4) {
                    0 => self.rng.random_range(1..=5),
                    1 | 2 => self.rng.random_range(5..=40),
                    _ => self.rng.random_range(40..=shape.limits[budget] + 10),
                };
                Spec::Spend { budget, amount }
            }
            4 | 5 => {
                let value = self.rng.random_range(0..shape.values);
                Spec::Own {
                    value,
                    owner: self.owner_for(value, shape.owners),
                }
            }
            _ => {
                let value = self.rng.random_range(0..shape.values);
                Spec::ReleaseOnCommit {
                    value,
                    owner: self.owner_for(value, shape.owners),
                }
            }
        }
    }

    /// Mostly the value's "natural" owner, so that owning, owning again and giving up meet.
    fn owner_for(&mut self, value: usize, owners: usize) -> usize {
        if self.rng.random_bool(0.8) {
            value % owners
        } else {
            self.rng.random_range(0..owners)
        }
    }

    fn usable(&self, m: &Model, hold: usize) -> bool {
        !m.poisoned.contains(&hold)
    }

    /// A hold id: often one the model knows (a live hold, to settle it), sometimes any.
    fn hold(&mut self, m: &Model, now: u64, live: bool) -> usize {
        let known: Vec<usize> = m
            .holds
            .iter()
            .filter(|(h, rec)| {
                self.usable(m, **h)
                    && rec.drop_at > now
                    && (!live || (rec.phase == Phase::Held && rec.expires > now))
            })
            .map(|(h, _)| *h)
            .collect();
        if !known.is_empty() && self.rng.random_bool(0.75) {
            return known[self.rng.random_range(0..known.len())];
        }
        for _ in 0..8 {
            let h = self.rng.random_range(0..self.last.len());
            if self.usable(m, h) {
                return h;
            }
        }
        0
    }

    fn claims(&mut self, m: &Model, hold: usize) -> Vec<Spec> {
        // A known id mostly retries its own claims (replays, refusals after settling); other
        // claims make a conflict.
        if let Some(h) = m.holds.get(&hold)
            && !h.claims.is_empty()
            && self.rng.random_bool(0.7)
        {
            return h.claims.clone();
        }
        if let Some(last) = &self.last[hold]
            && self.rng.random_bool(0.25)
        {
            return last.clone();
        }
        let n = self.rng.random_range(1..=3);
        let mut claims: Vec<Spec> = (0..n).map(|_| self.spec(m)).collect();
        if self.rng.random_bool(0.95) {
            let mut seen = Vec::new();
            claims.retain(|c| {
                let fresh = !seen.contains(&c.target());
                seen.push(c.target());
                fresh
            });
        }
        self.last[hold] = Some(claims.clone());
        claims
    }

    /// One operation that a group may carry: no jumps, no faults.
    pub fn simple(&mut self, m: &Model, now: u64) -> Op {
        let shape = m.shape.clone();
        match self.rng.random_range(0..100) {
            0..=27 => {
                let hold = self.hold(m, now, false);
                let claims = self.claims(m, hold);
                Op::Reserve {
                    hold,
                    claims,
                    lease: self.lease(),
                }
            }
            28..=51 => {
                let hold = self.hold(m, now, true);
                if without("resettle") && m.holds.get(&hold).is_some_and(|h| h.phase != Phase::Held)
                {
                    return Op::Budget(hold % shape.limits.len());
                }
                let commit = self.rng.random_bool(0.7);
                let actual = match m.holds.get(&hold) {
                    Some(h) if commit && self.rng.random_bool(0.3) => {
                        let spends: Vec<(usize, u64)> = h
                            .claims
                            .iter()
                            .filter_map(|c| match *c {
                                Spec::Spend { budget, amount } => Some((budget, amount)),
                                _ => None,
                            })
                            .collect();
                        if spends.is_empty() || self.rng.random_bool(0.1) {
                            Some((self.rng.random_range(0..shape.limits.len()), 1))
                        } else {
                            let (b, held) = spends[self.rng.random_range(0..spends.len())];
                            Some((b, self.rng.random_range(0..=held + 3)))
                        }
                    }
                    _ => None,
                };
                let memo = self
                    .rng
                    .random_bool(0.35)
                    .then(|| self.rng.random_range(0..4));
                // A release names no retention of its own: a tombstone's retention is the
                // store's (the two stores differ on a release before reserve with `retain`).
                let keep = match self.rng.random_range(0..10) {
                    0..=3 => Keep::Default,
                    4..=6 if commit && !without("retain") => {
                        let r = shape.retain_ms;
                        let choices = [r / 2, r * 3, 60_000, 86_400_000];
                        Keep::For(choices[self.rng.random_range(0..choices.len())])
                    }
                    _ if without("forget") || (!commit && without("release-forget")) => {
                        Keep::Default
                    }
                    _ => Keep::Forget,
                };
                Op::Settle {
                    hold,
                    commit,
                    actual,
                    memo,
                    keep,
                }
            }
            52..=56 => Op::Extend {
                hold: self.hold(m, now, true),
                lease: self.lease(),
            },
            57..=61 if !without("check") => {
                let hold = self.hold(m, now, false);
                let claims = self.claims(m, hold);
                Op::Check {
                    hold,
                    claims,
                    lease: self.lease(),
                }
            }
            62..=73 => {
                let mut refund = self.rng.random_range(0..shape.refunds);
                if without("window-refunds") {
                    // Only into lifetime budgets (refund r goes to budget r % budgets).
                    refund = [0, 3][refund % 2];
                }
                // Few amounts, so that a retry repeats one.
                let amount = [5, 10, 25][self.rng.random_range(0..3)];
                let back = self
                    .rng
                    .random_bool(0.3)
                    .then(|| self.rng.random_range(0..4_000));
                // A refund whose answer a fault hid lands at a moment the model cannot place,
                // and its retry may come after a short record has gone (then it counts again, as
                // documented): with faults, records outlive any retry.
                let retain = if self.faults {
                    [86_400_000, 6_000][self.rng.random_range(0..2)]
                } else {
                    [86_400_000, 1_500, 6_000][self.rng.random_range(0..3)]
                };
                Op::Refund {
                    refund,
                    amount,
                    back,
                    retain,
                }
            }
            74..=76 => {
                let budget = self.rng.random_range(0..shape.limits.len());
                Op::SetSpent {
                    budget,
                    spent: self.rng.random_range(0..=shape.limits[budget]),
                }
            }
            77..=87 => Op::Budget(self.rng.random_range(0..shape.limits.len())),
            88..=94 => Op::Owner(self.rng.random_range(0..shape.values)),
            _ => Op::Remove(self.rng.random_range(0..shape.values)),
        }
    }

    fn group(&mut self, m: &Model, now: u64, min: usize, max: usize) -> Vec<Op> {
        let n = self.rng.random_range(min..=max);
        (0..n).map(|_| self.simple(m, now)).collect()
    }

    /// The next step.
    pub fn step(&mut self, m: &Model, now: u64) -> Op {
        let jumped = std::mem::take(&mut self.jumped);
        if jumped && self.rng.random_bool(0.5) {
            // A new id that spends from budgets that have holds, often more than is left.
            let free: Vec<usize> = (0..self.last.len())
                .filter(|h| !m.holds.contains_key(h) && self.usable(m, *h))
                .collect();
            let hold = if free.is_empty() {
                self.hold(m, now, false)
            } else {
                free[self.rng.random_range(0..free.len())]
            };
            let busy: Vec<usize> = m
                .holds
                .values()
                .filter(|h| h.phase == Phase::Held)
                .flat_map(|h| h.claims.iter())
                .filter_map(|c| match *c {
                    Spec::Spend { budget, .. } => Some(budget),
                    _ => None,
                })
                .collect();
            let mut claims = vec![self.spec(m)];
            if !busy.is_empty() {
                let budget = busy[self.rng.random_range(0..busy.len())];
                let amount = self.rng.random_range(1..=m.shape.limits[budget] + 10);
                claims.insert(self.rng.random_range(0..=1), Spec::Spend { budget, amount });
                claims.dedup_by_key(|c| c.target());
                if claims.len() == 2 && claims[0].target() == claims[1].target() {
                    claims.pop();
                }
            }
            self.last[hold] = Some(claims.clone());
            let lease = self.lease();
            return if self.rng.random_bool(0.8) {
                Op::Reserve {
                    hold,
                    claims,
                    lease,
                }
            } else {
                Op::Check {
                    hold,
                    claims,
                    lease,
                }
            };
        }
        let roll = self.rng.random_range(0..100);
        if roll <= 16 {
            self.jumped = true;
        }
        match roll {
            0..=13 => {
                let offsets = [-400, -120, -30, -2, 3, 30, 120, 400, 1_500];
                Op::Jump {
                    pick: self.rng.random_range(0..6),
                    offset: offsets[self.rng.random_range(0..offsets.len())],
                }
            }
            14..=16 => {
                let r = m.shape.retain_ms;
                let choices = [r, r + 150, 2_000, 10_000, 86_400_000];
                Op::Advance(choices[self.rng.random_range(0..choices.len())])
            }
            17..=28 => Op::Together(self.group(m, now, 2, 5)),
            29..=32 if self.faults && self.kind != Kind::Memory => {
                let fault = self.fault();
                let ops = self.group(m, now, 2, 5);
                Op::Fault(fault, ops)
            }
            _ => self.simple(m, now),
        }
    }

    fn fault(&mut self) -> Fault {
        let lengths = if bounded() { 1_200..1_500 } else { 300..900 };
        loop {
            let f = match self.rng.random_range(0..12) {
                0 | 1 => Fault::Kill,
                2 | 3 => Fault::Pause(self.rng.random_range(lengths.clone())),
                4..=6 => Fault::Stop {
                    pick: self.rng.random_range(0..16),
                    ms: self.rng.random_range(lengths.clone()),
                },
                7 | 8 => Fault::Flush,
                9 => Fault::Restart,
                _ => Fault::Migrate {
                    budget: self.rng.random_range(0..4),
                },
            };
            let (fits, name) = match f {
                Fault::Restart => (self.kind == Kind::Node, "restart"),
                Fault::Migrate { .. } => (self.kind == Kind::Cluster, "migrate"),
                Fault::Kill => (true, "kill"),
                Fault::Pause(_) => (true, "pause"),
                Fault::Stop { .. } => (true, "stop"),
                Fault::Flush => (true, "flush"),
            };
            let fits = fits && !without(&format!("faults:{name}"));
            if fits {
                return f;
            }
        }
    }
}
