//! The wire between the store and `lua/batch.lua`: each operation is a MessagePack sequence (its
//! code, then its fields; no array, which the script would have to build a table for), written
//! in the caller's task; a batch is its operations one after the other; the answer is the array
//! of their answers, each handed back to its caller as a slice of the one reply.

use bytes::Bytes;
use rmp::Marker;
use rmpv::ValueRef;
use smallvec::SmallVec;

use crate::{Error, ErrorKind};

/// One operation for the script, with what routes it.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    /// The operation: its code and fields, MessagePack values one after the other.
    pub(crate) bytes: Vec<u8>,
    /// The first key it touches: on a Cluster, the batch is routed by its first operation's.
    pub(crate) key: String,
    /// The slot of `key`.
    pub(crate) slot: u16,
    /// How much work it is, in claims (a batch is bounded by its total).
    pub(crate) work: usize,
}

/// How many values every operation is: its code and nine fields, the unused ones nil, so that
/// `batch.lua` reads each in one call (`OP_VALUES` there).
const OP_VALUES: usize = 10;

/// Writes an operation, or a sequence of values to embed in one. Writing to a `Vec` cannot fail,
/// so the writes answer nothing.
pub(crate) struct Writer {
    buf: Vec<u8>,
    /// Values written at the top level (an embedded sequence is one).
    values: usize,
}

impl Writer {
    /// An operation: its code, then (written next) its fields, as `hold.lua` and `budget.lua`
    /// list them.
    pub(crate) fn op(code: u8) -> Self {
        let mut w = Writer {
            buf: Vec::with_capacity(128),
            values: 0,
        };
        w.uint(u64::from(code));
        w
    }

    /// A sequence of values of its own, to be embedded as bytes.
    pub(crate) fn sequence() -> Self {
        Writer {
            buf: Vec::with_capacity(64),
            values: 0,
        }
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// An array header (answers are arrays; operations are not).
    #[cfg(test)]
    pub(crate) fn array(&mut self, len: u32) -> &mut Self {
        rmp::encode::write_array_len(&mut self.buf, len).expect("writing to a Vec");
        self.values += 1;
        self
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        rmp::encode::write_str(&mut self.buf, s).expect("writing to a Vec");
        self.values += 1;
        self
    }

    /// Any bytes, as a MessagePack string: Redis's `cmsgpack` reads no `bin` type, and a Lua
    /// string is any bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        rmp::encode::write_str_len(&mut self.buf, b.len() as u32).expect("writing to a Vec");
        self.buf.extend_from_slice(b);
        self.values += 1;
        self
    }

    pub(crate) fn uint(&mut self, n: u64) -> &mut Self {
        rmp::encode::write_uint(&mut self.buf, n).expect("writing to a Vec");
        self.values += 1;
        self
    }

    pub(crate) fn bool(&mut self, b: bool) -> &mut Self {
        rmp::encode::write_bool(&mut self.buf, b).expect("writing to a Vec");
        self.values += 1;
        self
    }

    fn nil(&mut self) -> &mut Self {
        rmp::encode::write_nil(&mut self.buf).expect("writing to a Vec");
        self.values += 1;
        self
    }

    /// Bytes, or nil for none.
    pub(crate) fn bytes_or_nil(&mut self, b: Option<&[u8]>) -> &mut Self {
        match b {
            Some(b) => self.bytes(b),
            None => self.nil(),
        }
    }

    /// The operation, its fields padded with nil to `OP_VALUES`.
    pub(crate) fn done(mut self, key: String, work: usize) -> Op {
        assert!(
            self.values <= OP_VALUES,
            "an operation has at most nine fields"
        );
        while self.values < OP_VALUES {
            self.nil();
        }
        let slot = crate::claim::slot_of(hash_tag(&key));
        Op {
            bytes: self.buf,
            key,
            slot,
            work,
        }
    }
}

/// The hash tag of a key of this store (every key has one).
fn hash_tag(key: &str) -> &[u8] {
    let bytes = key.as_bytes();
    match (key.find('{'), key.find('}')) {
        (Some(open), Some(close)) if close > open + 1 => &bytes[open + 1..close],
        _ => bytes,
    }
}

/// The answer `{ 'M' }` of an operation whose keys its node does not serve, in MessagePack (an
/// array of one 1-byte string), as `batch.lua` answers it.
pub(crate) const MOVED: &[u8] = &[0x91, 0xa1, b'M'];

/// A whole batch: its operations one after the other.
pub(crate) fn batch<'a>(ops: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(ops.len() * 128);
    for op in ops {
        out.extend_from_slice(op);
    }
    out
}

/// The answer of a batch of `n` operations that its node turned away: each "moved", as the
/// script answers one whose keys its node does not serve.
pub(crate) fn all_moved(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + n * MOVED.len());
    rmp::encode::write_array_len(&mut out, n as u32).expect("writing to a Vec");
    for _ in 0..n {
        out.extend_from_slice(MOVED);
    }
    out
}

/// Splits a batch's answer into one slice per operation.
pub(crate) fn split(reply: Bytes, expected: usize) -> Result<Vec<Bytes>, Error> {
    let mut rest: &[u8] = &reply;
    let len = rmp::decode::read_array_len(&mut rest).map_err(|_| protocol("batch answer"))?;
    if len as usize != expected {
        return Err(protocol("batch answer length"));
    }
    let mut answers = Vec::with_capacity(expected);
    for _ in 0..len {
        let start = reply.len() - rest.len();
        skip_value(&mut rest).ok_or_else(|| protocol("batch answer item"))?;
        let end = reply.len() - rest.len();
        answers.push(reply.slice(start..end));
    }
    Ok(answers)
}

/// Moves `rest` past one MessagePack value, the values inside it included, building nothing
/// (`rmpv` would build the value, only for it to be dropped). `None` for a value cut short or
/// malformed. It counts the values still to skip rather than recursing, and refuses at once a
/// count larger than the bytes left (each value takes one at least).
fn skip_value(rest: &mut &[u8]) -> Option<()> {
    let mut left: u64 = 1;
    while left > 0 {
        left -= 1;
        let marker = rmp::decode::read_marker(rest).ok()?;
        // The bytes after the marker (and any length), and the values inside.
        let (bytes, values) = match marker {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(len) => (u64::from(len), 0),
            Marker::Str8 | Marker::Bin8 => (read_len(rest, 1)?, 0),
            Marker::Str16 | Marker::Bin16 => (read_len(rest, 2)?, 0),
            Marker::Str32 | Marker::Bin32 => (read_len(rest, 4)?, 0),
            Marker::FixArray(len) => (0, u64::from(len)),
            Marker::Array16 => (0, read_len(rest, 2)?),
            Marker::Array32 => (0, read_len(rest, 4)?),
            Marker::FixMap(len) => (0, 2 * u64::from(len)),
            Marker::Map16 => (0, 2 * read_len(rest, 2)?),
            Marker::Map32 => (0, 2 * read_len(rest, 4)?),
            // An extension's type byte, then its data.
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (read_len(rest, 1)? + 1, 0),
            Marker::Ext16 => (read_len(rest, 2)? + 1, 0),
            Marker::Ext32 => (read_len(rest, 4)? + 1, 0),
            Marker::Reserved => return None,
        };
        let bytes = usize::try_from(bytes).ok().filter(|b| *b <= rest.len())?;
        *rest = &rest[bytes..];
        left += values;
        if left > rest.len() as u64 {
            return None;
        }
    }
    Some(())
}

/// A big-endian length of `width` bytes.
fn read_len(rest: &mut &[u8], width: usize) -> Option<u64> {
    let (len, after) = rest.split_at_checked(width)?;
    *rest = after;
    Some(len.iter().fold(0, |n, b| n << 8 | u64::from(*b)))
}

/// One operation's answer, read.
pub(crate) struct Answer<'a> {
    /// Held in place up to eight (every answer but a long reservation's grant): reading an
    /// answer allocates nothing.
    items: SmallVec<[ValueRef<'a>; 8]>,
}

impl<'a> Answer<'a> {
    pub(crate) fn read(bytes: &'a [u8]) -> Result<Self, Error> {
        let not_an_array = || protocol("an answer that is not an array");
        let mut rest = bytes;
        let len = rmp::decode::read_array_len(&mut rest).map_err(|_| not_an_array())?;
        if len as usize > rest.len() {
            return Err(not_an_array());
        }
        let mut items = SmallVec::with_capacity(len as usize);
        for _ in 0..len {
            items.push(rmpv::decode::read_value_ref(&mut rest).map_err(|_| not_an_array())?);
        }
        Ok(Self { items })
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// The word at `at` (`'G'`, `'OK'`, a reason).
    pub(crate) fn word(&self, at: usize) -> Result<&'a str, Error> {
        match self.items.get(at).cloned() {
            Some(ValueRef::String(s)) => s.into_str().ok_or_else(|| protocol("utf-8")),
            Some(ValueRef::Binary(b)) => std::str::from_utf8(b).map_err(|_| protocol("utf-8")),
            other => Err(protocol(&format!("a word, not {other:?}"))),
        }
    }

    /// The integer at `at`.
    pub(crate) fn int(&self, at: usize) -> Result<i64, Error> {
        match self.items.get(at) {
            Some(ValueRef::Integer(i)) => i
                .as_i64()
                .or_else(|| i.as_u64().map(|u| u as i64))
                .ok_or_else(|| protocol("integer range")),
            // Lua answers integral doubles as integers; a double here is an integer too.
            Some(ValueRef::F64(f)) if f.fract() == 0.0 => Ok(*f as i64),
            other => Err(protocol(&format!("an integer, not {other:?}"))),
        }
    }

    /// The bytes at `at`, if there is a string there (a memo: any bytes, not only UTF-8).
    pub(crate) fn bytes(&self, at: usize) -> Option<Bytes> {
        match self.items.get(at) {
            Some(ValueRef::String(s)) => Some(Bytes::copy_from_slice(s.as_bytes())),
            Some(ValueRef::Binary(b)) => Some(Bytes::copy_from_slice(b)),
            _ => None,
        }
    }

    /// The words of the array at `at` (a home's list of group records); empty when absent.
    pub(crate) fn words(&self, at: usize) -> Result<Vec<String>, Error> {
        match self.items.get(at) {
            None => Ok(Vec::new()),
            Some(ValueRef::Array(items)) => items
                .iter()
                .map(|v| match v {
                    ValueRef::String(s) => s
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| protocol("utf-8")),
                    _ => Err(protocol("a list of words")),
                })
                .collect(),
            // An empty Lua table may come back as an empty map.
            Some(ValueRef::Map(m)) if m.is_empty() => Ok(Vec::new()),
            Some(other) => Err(protocol(&format!("a list, not {other:?}"))),
        }
    }
}

pub(crate) fn protocol(what: &str) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("unexpected answer from the tower-reserve script: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_into_its_answers() {
        let mut reply = Vec::new();
        rmp::encode::write_array_len(&mut reply, 3).unwrap();
        let mut a = Writer::sequence();
        a.array(3).uint(1).str("G").uint(12);
        let mut b = Writer::sequence();
        b.array(2).uint(2).str("OK");
        let mut c = Writer::sequence();
        c.array(3).uint(3).array(2).str("x").bytes(b"\x00\xff");
        c.uint(u64::MAX);
        for w in [&a, &b, &c] {
            reply.extend_from_slice(&w.buf);
        }
        let parts = split(Bytes::from(reply), 3).unwrap();
        assert_eq!(&parts[0][..], &a.buf[..]);
        assert_eq!(&parts[1][..], &b.buf[..]);
        assert_eq!(&parts[2][..], &c.buf[..]);
        let answer = Answer::read(&parts[0]).unwrap();
        assert_eq!(answer.int(0).unwrap(), 1);
        assert_eq!(answer.word(1).unwrap(), "G");
        assert_eq!(answer.int(2).unwrap(), 12);
        assert!(split(parts[0].clone(), 2).is_err());
    }

    /// Every kind of MessagePack value, in each of its lengths' encodings.
    fn every_kind_of_value() -> Vec<rmpv::Value> {
        use rmpv::Value;
        let text = |len: usize| Value::from("x".repeat(len));
        let ext = |len: usize| Value::Ext(7, vec![1; len]);
        vec![
            Value::Nil,
            Value::Boolean(true),
            Value::Boolean(false),
            Value::from(0),
            Value::from(127),
            Value::from(-1),
            Value::from(-33),
            Value::from(200u8),
            Value::from(-100i8),
            Value::from(60_000u16),
            Value::from(-30_000i16),
            Value::from(u32::MAX),
            Value::from(i32::MIN),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::F32(1.5),
            Value::F64(2.5),
            text(31),
            text(32),
            text(300),
            text(70_000),
            Value::Binary(vec![0; 3]),
            Value::Binary(vec![0; 300]),
            Value::Binary(vec![0; 70_000]),
            Value::Array((0..20).map(Value::from).collect()),
            Value::Array(vec![Value::Array(vec![Value::Nil; 3]); 16]),
            Value::Array(vec![Value::from(1); 70_000]),
            Value::Map(vec![(Value::from("k"), Value::Array(vec![]))]),
            Value::Map((0..20).map(|i| (Value::from(i), Value::Nil)).collect()),
            ext(1),
            ext(2),
            ext(4),
            ext(8),
            ext(16),
            ext(3),
            ext(300),
            ext(70_000),
        ]
    }

    #[test]
    fn skipping_a_value_moves_past_exactly_what_reading_it_would() {
        let values = every_kind_of_value();
        let mut all = Vec::new();
        for value in &values {
            let mut one = Vec::new();
            rmpv::encode::write_value(&mut one, value).unwrap();
            let mut rest = &one[..];
            assert!(skip_value(&mut rest).is_some(), "{value:?}");
            assert!(rest.is_empty(), "{value:?}");
            for cut in [0, 1, one.len() / 2, one.len() - 1]
                .into_iter()
                .filter(|c| *c < one.len())
            {
                let mut rest = &one[..cut];
                assert!(skip_value(&mut rest).is_none(), "{value:?} cut at {cut}");
            }
            all.extend_from_slice(&one);
        }
        let (mut skipped, mut read) = (&all[..], &all[..]);
        for _ in &values {
            skip_value(&mut skipped).unwrap();
            rmpv::decode::read_value_ref(&mut read).unwrap();
            assert_eq!(skipped.len(), read.len());
        }
    }

    #[test]
    fn a_value_that_claims_more_than_is_left_is_refused_at_once() {
        // An array of 2^32 - 1 values, then one.
        let mut rest: &[u8] = &[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0];
        assert!(skip_value(&mut rest).is_none());
        // A map of 15 pairs, then two values.
        let mut rest: &[u8] = &[0x8f, 0xc0, 0xc0];
        assert!(skip_value(&mut rest).is_none());
        // The marker MessagePack leaves unused.
        let mut rest: &[u8] = &[0xc1];
        assert!(skip_value(&mut rest).is_none());
    }

    #[test]
    fn an_answer_longer_than_its_room_in_place_is_read_whole() {
        let mut w = Writer::sequence();
        w.array(12).str("G").uint(1_700_000_000_000).uint(0);
        for left in 0..9 {
            w.uint(left * 10);
        }
        let answer = Answer::read(&w.buf).unwrap();
        assert_eq!(answer.len(), 12);
        assert_eq!(answer.word(0).unwrap(), "G");
        assert_eq!(answer.int(11).unwrap(), 80);
        assert!(Answer::read(&w.buf[..w.buf.len() - 1]).is_err());
        assert!(Answer::read(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn the_moved_answer_is_what_the_function_answers_for_a_key_elsewhere() {
        let mut w = Writer::sequence();
        w.array(1).str("M");
        assert_eq!(&w.buf[..], MOVED);
        assert!(super::super::ops::is_moved(MOVED));
        let moved = split(Bytes::from(all_moved(3)), 3).unwrap();
        assert!(
            moved
                .iter()
                .all(|answer| super::super::ops::is_moved(answer))
        );
    }

    #[test]
    fn ops_are_routed_by_their_first_key() {
        let op = Writer::op(6).done("p:b:{customer-42}".into(), 1);
        assert_eq!(op.slot, crate::claim::slot_of(b"customer-42"));
        // The code, then nine nil fields: every operation is read in one call.
        assert_eq!(op.bytes, [&[6][..], &[0xc0; 9][..]].concat());
    }
}
