//! The wire between the store and `lua/batch.lua`: each operation is a MessagePack sequence (its
//! code, then its fields; no array, which the script would have to build a table for), written
//! in the caller's task; a batch is its operations one after the other; the answer is the array
//! of their answers, each handed back to its caller as a slice of the one reply.

use bytes::Bytes;
use rmpv::ValueRef;

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
        rmpv::decode::read_value_ref(&mut rest).map_err(|_| protocol("batch answer item"))?;
        let end = reply.len() - rest.len();
        answers.push(reply.slice(start..end));
    }
    Ok(answers)
}

/// One operation's answer, read.
pub(crate) struct Answer<'a> {
    items: Vec<ValueRef<'a>>,
}

impl<'a> Answer<'a> {
    pub(crate) fn read(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut rest = bytes;
        match rmpv::decode::read_value_ref(&mut rest) {
            Ok(ValueRef::Array(items)) => Ok(Self { items }),
            _ => Err(protocol("an answer that is not an array")),
        }
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
