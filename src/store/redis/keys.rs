//! Key names. Every key of one budget, one unique value or one hold carries one hash tag, so
//! that it lives on one Redis Cluster slot (see `lua/common.lua` for the layout).

use std::sync::LazyLock;

use crate::claim::{SLOTS, slot_of};
use crate::{Budget, HoldId, Unique};

/// Names the keys of one store (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: String) -> Self {
        Self { prefix }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The record of a hold, by its id alone: in the slot the id names (`name@slot`), or else in
    /// the slot of the whole id.
    pub(crate) fn record(&self, id: &HoldId) -> String {
        match id.placed() {
            Some((name, slot)) => [&self.prefix, ":h:{", slot_tag(slot), "}", name].concat(),
            None => [&self.prefix, ":h:{", id.as_str(), "}"].concat(),
        }
    }

    /// The record of one slot group of a reservation across slots: in the slot of `tag`. Its
    /// type (`g`) keeps it apart from every id's own record.
    pub(crate) fn group_record(&self, tag: &str, id: &HoldId) -> String {
        [&self.prefix, ":g:{", tag, "}", id.as_str()].concat()
    }

    /// Whether `record` is a slot group's record, not a hold's own.
    pub(crate) fn is_group(&self, record: &str) -> bool {
        record
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with(":g:"))
    }

    /// A budget's key without its window's suffix (the scripts add it).
    pub(crate) fn budget(&self, budget: &Budget) -> String {
        [&self.prefix, ":b:{", budget.key(), "}"].concat()
    }

    /// A refund's record: beside its budget, one for every window (a refund id counts once
    /// whatever window it lands in). `#` is in no id and no budget key's window.
    pub(crate) fn refund(&self, budget: &Budget, id: &HoldId) -> String {
        [&self.prefix, ":f:{", budget.key(), "}#", id.as_str()].concat()
    }

    pub(crate) fn unique(&self, value: &Unique) -> String {
        [&self.prefix, ":u:{", &value.tag(), "}"].concat()
    }
}

/// A short hash tag for each slot: `slot_tag(s)` is a string whose slot is `s`, the first base-36
/// string in order that lands in it (keys written by earlier releases depend on that rule). Built
/// once, in about 170 000 tries.
pub(crate) fn slot_tag(slot: u16) -> &'static str {
    let tag = &SLOT_TAGS[slot as usize];
    let len = tag.iter().position(|b| *b == 0).unwrap_or(TAG_BYTES);
    std::str::from_utf8(&tag[..len]).expect("base-36 digits")
}

/// The longest tag: every slot has one of at most four base-36 digits (the last is found near
/// 170 000, well below 36^4).
const TAG_BYTES: usize = 4;

/// Every slot's tag, NUL-padded, in one 64 KiB table: it stays in the CPU's cache, where a
/// `String` per slot (16 384 allocations across the heap) cost a cache miss or two for every
/// record's key.
static SLOT_TAGS: LazyLock<Vec<[u8; TAG_BYTES]>> = LazyLock::new(|| {
    let mut tags = vec![[0; TAG_BYTES]; SLOTS as usize];
    let mut missing = SLOTS as usize;
    let mut n: u64 = 0;
    while missing > 0 {
        let tag = base36(n);
        let slot = slot_of(tag.as_bytes()) as usize;
        if tags[slot][0] == 0 {
            tags[slot][..tag.len()].copy_from_slice(tag.as_bytes());
            missing -= 1;
        }
        n += 1;
    }
    tags
});

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_of_its_own_slot() {
        for slot in 0..SLOTS {
            assert_eq!(slot_of(slot_tag(slot).as_bytes()), slot);
        }
    }

    /// Records and groups that earlier releases wrote are named by these tags: each slot's is
    /// the first base-36 string in order that lands in it.
    #[test]
    fn a_slots_tag_is_the_first_base36_string_that_lands_in_it() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..2_000 {
            let tag = base36(n);
            let slot = slot_of(tag.as_bytes());
            if seen.insert(slot) {
                assert_eq!(slot_tag(slot), tag);
            }
        }
        assert!(seen.len() > 1_000);
    }

    #[test]
    fn a_generated_id_lives_beside_its_first_claim() {
        let keys = Keys::new("p".into());
        let budget = Budget::new("customer-42", 100);
        let slot = slot_of(b"customer-42");
        let id = HoldId::new(format!("abc@{slot}")).unwrap();
        let record = keys.record(&id);
        let tag = &record[record.find('{').unwrap() + 1..record.find('}').unwrap()];
        assert_eq!(slot_of(tag.as_bytes()), slot);
        assert!(keys.budget(&budget).contains("{customer-42}"));
        assert_eq!(keys.record(&HoldId::new("plain").unwrap()), "p:h:{plain}");
    }

    #[test]
    fn no_two_ids_share_a_key() {
        // A memo is its record's key with another type, in the Lua: `x:m@5`'s record must not be
        // `x@5`'s memo, and no group record any id's own.
        let keys = Keys::new("p".into());
        let memo = |record: String| record.replacen(":h:", ":m:", 1);
        let a = keys.record(&HoldId::new("x@5").unwrap());
        let b = keys.record(&HoldId::new("x:m@5").unwrap());
        assert_ne!(memo(a.clone()), b);
        assert_ne!(a, b);
        let tag = slot_tag(5);
        let group = keys.group_record(tag, &HoldId::new("y").unwrap());
        assert_ne!(group, keys.record(&HoldId::new(":y@5").unwrap()));
        assert_ne!(group, keys.record(&HoldId::new("y@5").unwrap()));
    }
}
