//! Histories the simulator found, shrunk, written out: each replays the same way on every store
//! (no faults, the clock moved by fixed amounts), so a defect they caught stays caught.

use crate::generate::Op;
use crate::model::{Keep, Spec};

fn spend(budget: usize, amount: u64) -> Spec {
    Spec::Spend { budget, amount }
}

fn own(value: usize, owner: usize) -> Spec {
    Spec::Own { value, owner }
}

fn reserve(hold: usize, claims: &[Spec], lease: u64) -> Op {
    Op::Reserve {
        hold,
        claims: claims.to_vec(),
        lease,
    }
}

fn settle(hold: usize, commit: bool, keep: Keep) -> Op {
    Op::Settle {
        hold,
        commit,
        actual: None,
        memo: None,
        keep,
    }
}

/// Named histories. The store's retention is 3 s in each (see `main.rs`); budget 0 is a
/// lifetime budget of 100, budget 1 one of 100 per 2 s, budget 3 a lifetime one of 60; hold 3
/// is `x@s` and hold 4 `x:m@s`, where `s` is budget 0's slot.
pub fn all() -> Vec<(&'static str, Vec<Op>)> {
    vec![
        (
            // Two holds in two buckets; the first expires; a denial meets it first.
            "a denial after a lease ended leaves no phantom held",
            vec![
                reserve(0, &[spend(0, 10)], 1_000),
                reserve(1, &[spend(0, 10)], 3_000),
                Op::Advance(1_200),
                reserve(2, &[spend(0, 95)], 1_000),
                Op::Budget(0),
            ],
        ),
        (
            "a check after a lease ended leaves no phantom held",
            vec![
                reserve(0, &[spend(3, 40)], 1_500),
                reserve(1, &[spend(3, 4)], 60_000),
                Op::Advance(2_000),
                Op::Check {
                    hold: 2,
                    claims: vec![spend(3, 5)],
                    lease: 1_000,
                },
                Op::Budget(3),
            ],
        ),
        (
            // A replayed commit asks for longer: the record is kept that long.
            "a settle again with a longer retention keeps the record that long",
            vec![
                reserve(0, &[own(0, 0)], 10_000),
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: None,
                    memo: Some(0),
                    keep: Keep::Default,
                },
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: None,
                    memo: None,
                    keep: Keep::For(60_000),
                },
                Op::Advance(4_000),
                reserve(0, &[own(0, 0)], 10_000),
            ],
        ),
        (
            // A memo added by a replay lives as long as its record.
            "a memo kept by a replay lives as long as the record",
            vec![
                reserve(0, &[spend(0, 5)], 10_000),
                settle(0, true, Keep::For(60_000)),
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: None,
                    memo: Some(1),
                    keep: Keep::Default,
                },
                Op::Advance(4_000),
                reserve(0, &[spend(0, 5)], 10_000),
            ],
        ),
        (
            // A release (forgotten) of a committed id is refused and must change nothing.
            "a refused release does not shorten a committed record's retention",
            vec![
                reserve(0, &[spend(0, 5)], 10_000),
                settle(0, true, Keep::For(60_000)),
                settle(0, false, Keep::Forget),
                Op::Advance(4_000),
                reserve(0, &[spend(0, 5)], 10_000),
            ],
        ),
        (
            // A refused actual amount changes nothing, the record's deadline included.
            "a refused actual amount does not shorten a live hold's record",
            vec![
                reserve(0, &[spend(0, 10)], 60_000),
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: Some((0, 11)),
                    memo: None,
                    keep: Keep::Forget,
                },
                Op::Advance(4_000),
                settle(0, true, Keep::Default),
                Op::Budget(0),
            ],
        ),
        (
            "a refund id counts once, in whatever window it lands",
            vec![
                reserve(0, &[spend(1, 50)], 10_000),
                settle(0, true, Keep::Default),
                Op::Refund {
                    refund: 1,
                    amount: 10,
                    back: None,
                    retain: 86_400_000,
                },
                Op::Advance(2_000),
                reserve(1, &[spend(1, 50)], 10_000),
                settle(1, true, Keep::Default),
                Op::Refund {
                    refund: 1,
                    amount: 10,
                    back: None,
                    retain: 86_400_000,
                },
                Op::Budget(1),
            ],
        ),
        (
            // `x@s`'s memo must not be `x:m@s`'s record.
            "ids that differ never share a key",
            vec![
                reserve(3, &[spend(0, 5)], 10_000),
                Op::Settle {
                    hold: 3,
                    commit: true,
                    actual: None,
                    memo: Some(0),
                    keep: Keep::Default,
                },
                reserve(4, &[spend(0, 5)], 10_000),
                settle(4, true, Keep::Default),
                reserve(3, &[spend(0, 5)], 10_000),
            ],
        ),
        (
            "a forgotten release leaves no record",
            vec![
                reserve(0, &[spend(1, 30), own(1, 2)], 10_000),
                settle(0, false, Keep::Forget),
                settle(0, false, Keep::Default),
            ],
        ),
        (
            "a forgotten commit leaves no record",
            vec![
                reserve(0, &[own(1, 1), spend(3, 6)], 10_000),
                settle(0, true, Keep::Forget),
                reserve(0, &[own(1, 1), spend(3, 6)], 10_000),
            ],
        ),
        (
            "a refused actual amount with forget changes nothing",
            vec![
                reserve(0, &[spend(1, 2), own(1, 1)], 10_000),
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: Some((1, 3)),
                    memo: None,
                    keep: Keep::Forget,
                },
                settle(0, true, Keep::Default),
            ],
        ),
        (
            "a commit settled again within its retention is replayed",
            vec![
                reserve(0, &[spend(3, 10), spend(0, 10)], 10_000),
                settle(0, true, Keep::For(60_000)),
                Op::Advance(4_000),
                settle(0, true, Keep::Default),
            ],
        ),
        (
            // On a Cluster the hold has groups; the memo belongs to its home.
            "a memo is kept once",
            vec![
                reserve(0, &[spend(1, 5), own(1, 1)], 10_000),
                Op::Settle {
                    hold: 0,
                    commit: true,
                    actual: None,
                    memo: Some(0),
                    keep: Keep::For(60_000),
                },
            ],
        ),
        (
            // On a Cluster hold 3's home is budget 0's slot, where the second claim fails; the
            // first fails in a group: the answer names the first, wherever it lives.
            "a denial names the first claim that fails",
            vec![reserve(
                3,
                &[Spec::ReleaseOnCommit { value: 2, owner: 2 }, spend(0, 110)],
                10_000,
            )],
        ),
        (
            // A forgotten commit across slots leaves group records behind for a while: a check
            // of the same id answers from its claims, not from those records.
            "a check after a forgotten commit answers from its claims",
            vec![
                reserve(5, &[spend(3, 37), spend(0, 23)], 10_000),
                settle(5, true, Keep::Forget),
                Op::Check {
                    hold: 5,
                    claims: vec![
                        spend(3, 26),
                        spend(1, 24),
                        Spec::ReleaseOnCommit { value: 2, owner: 2 },
                    ],
                    lease: 800,
                },
            ],
        ),
        (
            // A commit refused for its actual amounts extends nothing: the value is free once
            // the hold's own lease has ended.
            "a commit refused for its actual amounts extends nothing",
            vec![
                reserve(7, &[own(0, 0)], 10_000),
                Op::Settle {
                    hold: 7,
                    commit: true,
                    actual: Some((1, 1)),
                    memo: None,
                    keep: Keep::For(15_000),
                },
                Op::Advance(16_000),
                reserve(4, &[own(0, 0)], 1_500),
            ],
        ),
        (
            // A hold across slots ends; its commit finds it expired; a forgetting release drops
            // it; a later commit finds nothing of it.
            "a commit after an expired hold across slots was forgotten finds no hold",
            vec![
                reserve(1, &[spend(2, 3), own(1, 1)], 250),
                Op::Advance(2_101),
                Op::Settle {
                    hold: 1,
                    commit: true,
                    actual: None,
                    memo: Some(0),
                    keep: Keep::For(2_500),
                },
                Op::Settle {
                    hold: 1,
                    commit: false,
                    actual: None,
                    memo: Some(0),
                    keep: Keep::Forget,
                },
                settle(1, true, Keep::For(2_500)),
            ],
        ),
        (
            "a check of a live hold answers what each budget has left",
            vec![
                reserve(0, &[spend(1, 40)], 10_000),
                Op::Check {
                    hold: 0,
                    claims: vec![spend(1, 40)],
                    lease: 10_000,
                },
            ],
        ),
    ]
}
