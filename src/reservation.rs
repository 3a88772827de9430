//! Reservations: all the claims of one command, and what a store answers about them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::Error;
use crate::claim::{Claim, SLOTS, hex, slot_of};

/// The longest lease a hold may have: one day.
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// The id of a reservation, and so of its hold: the reservation's idempotency key.
///
/// A name of 1 to 128 characters of `[A-Za-z0-9_.:-]`, optionally followed by `@` and a slot
/// number (0 to 16 383) that says where the hold's record lives: beside the claims of that
/// Redis Cluster slot, so that a reservation whose claims share one slot is one store call, and
/// any process finds the hold by its id alone. Ids the builder generates carry the slot of the
/// reservation's first claim; an id without one lives in the slot of the whole id.
///
/// [`HoldId::random`] makes a fresh id; [`HoldId::derive`] turns any client-supplied key (an
/// `Idempotency-Key` header, say) into one.
///
/// ```
/// use tower_reserve::HoldId;
///
/// let id = HoldId::new("order-2024-0001").unwrap();
/// assert_eq!(id.as_str(), "order-2024-0001");
/// assert!(HoldId::new("has space").is_err());
/// assert_eq!(HoldId::new("Xk2vR8@5798").unwrap().slot(), 5798);
/// assert!(HoldId::new("Xk2vR8@16384").is_err());
/// assert_eq!(HoldId::derive(["POST /orders", "key 1"]), HoldId::derive(["POST /orders", "key 1"]));
/// ```
#[derive(Clone)]
pub struct HoldId {
    /// An id is cloned into the grant, the store's record and its deadline, the hold and every
    /// settlement of it: a short one is copied, a long one shared.
    text: IdText,
    /// Where the record lives, read from the text once: every store call asks.
    slot: u16,
}

impl HoldId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        let (name, slot) = match id.split_once('@') {
            Some((name, slot)) => (name, Some(slot)),
            None => (id.as_str(), None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        let slot_ok = slot.is_none_or(|slot| {
            !slot.is_empty()
                && slot.len() <= 5
                && slot.bytes().all(|b| b.is_ascii_digit())
                && (slot == "0" || !slot.starts_with('0'))
                && slot.parse::<u16>().is_ok_and(|n| n < SLOTS)
        });
        if name_ok && slot_ok {
            Ok(Self::placed_by_text(&id))
        } else {
            Err(Error::invalid(
                "a hold id must be 1 to 128 characters of [A-Za-z0-9_.:-], optionally followed by @ and a slot 0 to 16383",
            ))
        }
    }

    /// A checked id's text, with the slot it names or, naming none, that of the whole text.
    fn placed_by_text(text: &str) -> Self {
        let slot = match text.split_once('@') {
            Some((_, slot)) => slot.parse().expect("a checked slot"),
            None => slot_of(text.as_bytes()),
        };
        Self {
            text: IdText::new(text),
            slot,
        }
    }

    /// A fresh random id: 96 random bits in 16 URL-safe base64 characters, placed by its own
    /// text.
    pub fn random() -> Self {
        let mut buf = [0; RANDOM_NAME];
        Self::placed_by_text(random_name(&mut buf))
    }

    /// A fresh random id whose record lives in `slot`.
    pub(crate) fn random_in(slot: u16) -> Self {
        // The name, `@` and at most five digits, written in place: one allocation, the id's.
        let mut buf = [0; RANDOM_NAME + 6];
        random_name(&mut buf[..RANDOM_NAME]);
        buf[RANDOM_NAME] = b'@';
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(slot).as_bytes();
        let len = RANDOM_NAME + 1 + digits.len();
        buf[RANDOM_NAME + 1..len].copy_from_slice(digits);
        let text = std::str::from_utf8(&buf[..len]).expect("base64, @ and digits are ASCII");
        Self {
            text: IdText::new(text),
            slot,
        }
    }

    /// A stable id digested from `parts`, e.g. a route and a client's idempotency key.
    pub fn derive<I, P>(parts: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut hasher = Sha256::new();
        for part in parts {
            let part = part.as_ref();
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Self::placed_by_text(&hex(&hasher.finalize()[..16]))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    /// The slot the hold's record lives in: the one after `@`, or else that of the whole id.
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The name and the slot of an id that names its slot.
    pub(crate) fn placed(&self) -> Option<(&str, u16)> {
        let (name, _) = self.text.as_str().split_once('@')?;
        Some((name, self.slot))
    }
}

// One id, one text: the slot follows from the text, so only the text is compared and hashed.
impl PartialEq for HoldId {
    fn eq(&self, other: &Self) -> bool {
        self.text.as_bytes() == other.text.as_bytes()
    }
}

impl Eq for HoldId {}

impl std::hash::Hash for HoldId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes itself.
        state.write(self.text.as_bytes());
        state.write_u8(0xff);
    }
}

impl PartialOrd for HoldId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HoldId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.as_bytes().cmp(other.text.as_bytes())
    }
}

impl std::fmt::Debug for HoldId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HoldId").field(&self.text.as_str()).finish()
    }
}

/// The longest id kept in place: a generated one (16 characters, `@` and a slot of up to five
/// digits), so that minting an id allocates nothing and cloning one touches no shared counter.
const INLINE_ID: usize = RANDOM_NAME + 6;

/// A hold id's text: in place up to [`INLINE_ID`] bytes, shared beyond (a derived id, a caller's).
#[derive(Clone)]
enum IdText {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Shared(Arc<str>),
}

impl IdText {
    fn new(text: &str) -> Self {
        if text.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            IdText::Inline {
                len: text.len() as u8,
                bytes,
            }
        } else {
            IdText::Shared(Arc::from(text))
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("copied from a str")
    }

    /// The text's bytes, unchecked: what ids are compared, ordered and hashed by (as their
    /// text would be), on every lookup of a store's maps.
    fn as_bytes(&self) -> &[u8] {
        match self {
            IdText::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IdText::Shared(text) => text.as_bytes(),
        }
    }
}

/// The length of a random name: 12 bytes in URL-safe base64.
const RANDOM_NAME: usize = 16;

/// 96 random bits in 16 URL-safe base64 characters, written into `buf`. Short on purpose: it
/// names a record in Redis, and a key of at most 28 bytes is stored in a smaller allocation.
fn random_name(buf: &mut [u8]) -> &str {
    use base64::Engine;
    let bytes: [u8; 12] = rand::random();
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode_slice(bytes, buf)
        .expect("16 bytes hold 12 in base64");
    std::str::from_utf8(&buf[..n]).expect("base64 is ASCII")
}

impl std::fmt::Display for HoldId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text.as_str())
    }
}

impl std::str::FromStr for HoldId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// All the claims of one command, with an id and a lease. Built and checked by
/// [`Reservation::builder`]; a `Reservation` that exists is valid.
///
/// ```
/// use std::time::Duration;
/// use tower_reserve::{Budget, Claim, Reservation, Unique};
///
/// let reservation = Reservation::builder()
///     .lease(Duration::from_secs(10))
///     .claim(Claim::spend(Budget::new("customer-42", 50_000), 2_000))
///     .claim(Claim::own(Unique::email("accounts", "ann@example.com"), "account-7"))
///     .build()
///     .unwrap();
/// assert_eq!(reservation.claims().len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct Reservation {
    id: HoldId,
    lease: Duration,
    claims: Vec<Claim>,
    /// A digest of the command's own payload, when it has one (see
    /// [`ReservationBuilder::payload`]).
    payload: Option<Fingerprint>,
    /// Computed on first use: only a store that records the hold needs it.
    fingerprint: std::sync::OnceLock<Fingerprint>,
}

impl Reservation {
    /// Starts a reservation with a random id and a 30 second lease.
    pub fn builder() -> ReservationBuilder {
        ReservationBuilder {
            id: None,
            lease: Duration::from_secs(30),
            claims: Vec::new(),
            payload: None,
        }
    }

    /// The reservation's id.
    pub fn id(&self) -> &HoldId {
        &self.id
    }

    /// How long the hold lives unless it is committed, released or extended.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The claims, in the order given.
    pub fn claims(&self) -> &[Claim] {
        &self.claims
    }

    /// A digest of the claims: a retry with the same id must carry the same one.
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        self.fingerprint
            .get_or_init(|| fingerprint(&self.claims, self.payload.as_ref()))
    }

    /// The digest of the command's payload, when it has one.
    pub(crate) fn payload_digest(&self) -> Option<&Fingerprint> {
        self.payload.as_ref()
    }

    /// The claims, taken out.
    pub(crate) fn into_claims(self) -> Vec<Claim> {
        self.claims
    }
}

/// Builds a [`Reservation`]; see there.
#[derive(Debug, Clone)]
pub struct ReservationBuilder {
    id: Option<HoldId>,
    lease: Duration,
    claims: Vec<Claim>,
    payload: Option<Fingerprint>,
}

impl ReservationBuilder {
    /// Sets the id (the idempotency key). Without one a random id is used.
    pub fn id(mut self, id: HoldId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the lease: 1 ms to [`MAX_LEASE`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Makes the command's payload (a request body, say) what identifies it, in place of its
    /// claims: a retry with the same id and payload is the same reservation, whatever claims it
    /// works out this time (its first attempt's stand; a claim built from a freshly minted id or
    /// a price that changed meanwhile does not make it another); the same id with another
    /// payload is a [`Conflict`](crate::ErrorKind::Conflict). This is what an idempotency key
    /// promises (IETF *The Idempotency-Key HTTP Header Field*: the key and the payload). Only a
    /// digest is kept.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        let mut digest = [0; 8];
        digest.copy_from_slice(&Sha256::digest(payload)[..8]);
        self.payload = Some(digest);
        self
    }

    /// Adds a claim.
    pub fn claim(mut self, claim: Claim) -> Self {
        self.claims.push(claim);
        self
    }

    /// Adds claims.
    pub fn claims(mut self, claims: impl IntoIterator<Item = Claim>) -> Self {
        if self.claims.is_empty() {
            // Collecting a `Vec`'s own iterator reuses its allocation.
            self.claims = claims.into_iter().collect();
        } else {
            self.claims.extend(claims);
        }
        self
    }

    /// Checks everything and builds the reservation.
    ///
    /// Refused with [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput): no claims, more
    /// than 64, a lease out of range, an invalid claim, or two claims on one budget window or
    /// one unique value.
    pub fn build(self) -> Result<Reservation, Error> {
        if self.claims.is_empty() {
            return Err(Error::invalid("a reservation needs at least one claim"));
        }
        if self.claims.len() > MAX_CLAIMS {
            return Err(Error::invalid(format!(
                "a reservation may hold at most {MAX_CLAIMS} claims"
            )));
        }
        check_lease(self.lease)?;
        for (i, claim) in self.claims.iter().enumerate() {
            claim
                .validate()
                .map_err(|e| Error::invalid(format!("claim {i}: {e}")))?;
            for earlier in &self.claims[..i] {
                if same_target(earlier, claim) {
                    return Err(Error::invalid(format!(
                        "claim {i} targets the same key as an earlier claim; merge them"
                    )));
                }
            }
        }
        // A generated id lives beside the first claim, so that a reservation whose claims share
        // a slot is one call to one place.
        let id = self
            .id
            .unwrap_or_else(|| HoldId::random_in(self.claims[0].slot()));
        Ok(Reservation {
            id,
            lease: self.lease,
            claims: self.claims,
            payload: self.payload,
            fingerprint: std::sync::OnceLock::new(),
        })
    }
}

/// A lease must be 1 ms to [`MAX_LEASE`], on reserve and on extend alike.
pub(crate) fn check_lease(lease: Duration) -> Result<(), Error> {
    if lease < Duration::from_millis(1) || lease > MAX_LEASE {
        return Err(Error::invalid("a lease must be 1 ms to 1 day"));
    }
    Ok(())
}

/// The most claims one reservation may carry, so that one script call stays short.
pub const MAX_CLAIMS: usize = 64;

fn same_target(a: &Claim, b: &Claim) -> bool {
    match (a, b) {
        (Claim::Spend { budget: x, .. }, Claim::Spend { budget: y, .. }) => {
            x.key() == y.key() && x.window() == y.window()
        }
        (
            Claim::Own { value: x, .. } | Claim::ReleaseOnCommit { value: x, .. },
            Claim::Own { value: y, .. } | Claim::ReleaseOnCommit { value: y, .. },
        ) => x == y,
        _ => false,
    }
}

/// A digest of a reservation's claims: 64 bits of SHA-256, kept as raw bytes (Redis strings are
/// binary-safe, and every hold record carries one). It tells a retry from a reuse of an id with
/// other claims; 64 bits make an accidental match vanishingly unlikely.
pub(crate) type Fingerprint = [u8; 8];

fn fingerprint(claims: &[Claim], payload: Option<&Fingerprint>) -> Fingerprint {
    let mut h = Sha256::new();
    identify(claims, payload, |bytes| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    });
    let mut digest = [0; 8];
    digest.copy_from_slice(&h.finalize()[..8]);
    digest
}

/// What tells a retry from a reuse of an id with other claims, one field at a time, for a digest
/// to take in (each field with its length, so that fields cannot run into each other): the
/// payload alone, when there is one; otherwise each claim's kind, target and amount or owner.
fn identify(claims: &[Claim], payload: Option<&Fingerprint>, mut field: impl FnMut(&[u8])) {
    if let Some(payload) = payload {
        // A payload identifies the command by itself: its claims do not enter.
        field(b"payload");
        field(payload);
        return;
    }
    for claim in claims {
        match claim {
            Claim::Spend { budget, amount } => {
                field(b"spend");
                field(budget.key().as_bytes());
                field(&budget.limit().to_be_bytes());
                field(budget.window().spec().as_bytes());
                field(&amount.to_be_bytes());
            }
            Claim::Own { value, owner } => {
                field(b"own");
                field(value.namespace().as_bytes());
                field(value.digest_hex().as_bytes());
                field(owner.as_bytes());
            }
            Claim::ReleaseOnCommit { value, owner } => {
                field(b"release-on-commit");
                field(value.namespace().as_bytes());
                field(value.digest_hex().as_bytes());
                field(owner.as_bytes());
            }
        }
    }
}

/// What [`Store::reserve`](crate::Store::reserve) answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Every claim is held.
    Granted(Grant),
    /// No claim is held; the first claim that failed says why.
    Denied(Denial),
}

/// A hold: every claim of a reservation, held until its lease ends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grant {
    /// The hold's id (the reservation's).
    pub id: HoldId,
    /// When the lease ends, in Unix milliseconds by the store's clock.
    pub expires_at_ms: u64,
    /// For each claim in order: the budget left after this hold, for spend claims; `None` for
    /// the others.
    pub remaining: Vec<Option<u64>>,
    /// `true` when this answers a retry of a reservation that was already held.
    pub replayed: bool,
}

impl Grant {
    /// When the lease ends.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.expires_at_ms)
    }
}

/// Why a reservation was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Denial {
    /// The index of the first claim that failed.
    pub claim: usize,
    /// Why it failed.
    pub reason: DenialReason,
}

/// Why a claim failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenialReason {
    /// Spent plus held plus the amount would pass the limit.
    OverBudget {
        /// The amount asked for.
        requested: u64,
        /// What is left: limit minus spent minus held (never below zero).
        remaining: u64,
        /// When the window this was counted in ends, in Unix milliseconds by the store's clock
        /// (the budget is whole again then, but for what later windows hold); `None` for a
        /// lifetime budget, which never resets.
        resets_at_ms: Option<u64>,
    },
    /// The value is owned, or held by another command in flight, on behalf of someone else.
    Taken,
    /// A release-on-commit claim names a value its owner does not own.
    NotOwner,
}

/// What commit and release answer when they succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The hold was settled by this call.
    Applied,
    /// The hold had already been settled the same way; nothing changed.
    Replayed,
    /// Release only: no hold with this id existed, so a tombstone now refuses a late reserve.
    Tombstoned,
}

/// A budget as seen now: limit, spent, held (by unexpired holds) and what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// The limit asked about.
    pub limit: u64,
    /// Spent by committed holds (or set by [`Store::set_spent`](crate::Store::set_spent)).
    pub spent: u64,
    /// Held by holds whose lease has not ended.
    pub held: u64,
    /// `limit - spent - held`, never below zero.
    pub remaining: u64,
    /// When the current window ends, in Unix milliseconds; `None` for a lifetime budget.
    pub resets_at_ms: Option<u64>,
}

impl BudgetStatus {
    pub(crate) fn new(limit: u64, spent: u64, held: u64, resets_at_ms: Option<u64>) -> Self {
        Self {
            limit,
            spent,
            held,
            remaining: limit.saturating_sub(spent).saturating_sub(held),
            resets_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, RandomState};

    use super::*;

    /// Ids kept in place and shared ones, on either side of the boundary, read, compare, order
    /// and hash as their texts do.
    #[test]
    fn an_id_behaves_as_its_text_in_place_or_shared() {
        let texts = [
            "a".to_owned(),
            "b".repeat(INLINE_ID),
            "b".repeat(INLINE_ID + 1),
            "a".repeat(INLINE_ID + 1),
            format!("{}@42", "c".repeat(INLINE_ID - 3)),
        ];
        let ids: Vec<HoldId> = texts
            .iter()
            .map(|t| HoldId::new(t.as_str()).unwrap())
            .collect();
        assert!(matches!(ids[1].text, IdText::Inline { .. }));
        assert!(matches!(ids[2].text, IdText::Shared(_)));
        assert_eq!(ids[4].slot(), 42);
        let state = RandomState::new();
        for (a, text_a) in ids.iter().zip(&texts) {
            assert_eq!(a.as_str(), text_a);
            assert_eq!(a.to_string(), *text_a);
            assert_eq!(state.hash_one(a), state.hash_one(text_a.as_str()));
            for (b, text_b) in ids.iter().zip(&texts) {
                assert_eq!(a == b, text_a == text_b, "{text_a} == {text_b}");
                assert_eq!(a.cmp(b), text_a.cmp(text_b), "{text_a} against {text_b}");
            }
        }
        let minted = HoldId::random_in(16_383);
        assert!(matches!(minted.text, IdText::Inline { .. }), "{minted}");
        assert_eq!(HoldId::new(minted.as_str()).unwrap(), minted);
    }
}
