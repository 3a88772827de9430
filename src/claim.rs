//! Claims: the things one command needs.
//!
//! A [`Claim`] is either *spend an amount against a [`Budget`]*, *own a [`Unique`] value*, or
//! *give up an owned unique value when the command commits*. Claims are plain values; a
//! [`Reservation`](crate::Reservation) groups them and validates them together.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::Error;

/// The largest amount or limit a claim may carry: 2^53 - 1.
///
/// Redis runs its scripts in Lua, whose numbers are doubles; every integer up to this bound is
/// exact there, and this crate refuses anything above it rather than round it.
pub const MAX_AMOUNT: u64 = (1 << 53) - 1;

/// The longest key, namespace, owner or unique value accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// A spending limit on one key: a customer's lifetime budget, a tenant's daily quota.
///
/// Amounts are integer minor units (cents, not dollars). The window is decided by the store's
/// clock (Redis `TIME`), never by the caller's.
///
/// ```
/// use tower_reserve::{Budget, Window};
///
/// let lifetime = Budget::new("customer-42", 50_000);
/// let daily = Budget::new("customer-42", 10_000).per(Window::Day);
/// assert_eq!(daily.limit(), 10_000);
/// assert_ne!(lifetime, daily);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Budget {
    key: String,
    limit: u64,
    window: Window,
}

impl Budget {
    /// A lifetime budget of `limit` minor units on `key`.
    pub fn new(key: impl Into<String>, limit: u64) -> Self {
        Self {
            key: key.into(),
            limit,
            window: Window::Lifetime,
        }
    }

    /// The same budget, counted per `window` instead of for all time.
    pub fn per(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// The budget's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The limit, in minor units.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window the limit applies to.
    pub fn window(&self) -> Window {
        self.window
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        check_tag("budget key", &self.key)?;
        if self.limit > MAX_AMOUNT {
            return Err(Error::invalid(format!(
                "budget limit {} is above {MAX_AMOUNT}",
                self.limit
            )));
        }
        self.window.validate()
    }
}

/// The longest [`Window::Every`]: 100 years of 365.25 days. Window arithmetic stays exact in
/// milliseconds, in Rust and in Lua's doubles alike.
pub const MAX_WINDOW: Duration = Duration::from_secs(100 * 31_557_600);

/// The period a [`Budget`]'s limit applies to, in UTC by the store's clock.
///
/// Windows compare by the period they name: `Window::Day` and `Window::Every(86 400 s)` are
/// one window, counted in one stored budget.
///
/// ```
/// use std::time::Duration;
/// use tower_reserve::Window;
///
/// assert_eq!(Window::Day, Window::Every(Duration::from_secs(86_400)));
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Window {
    /// For all time.
    Lifetime,
    /// Fixed windows of this many whole seconds, aligned to the Unix epoch.
    Every(Duration),
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.period() == other.period()
    }
}

impl Eq for Window {}

impl std::hash::Hash for Window {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.period().hash(state);
    }
}

/// Where a point in time falls in a [`Window`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowSlot {
    /// Appended to the budget's storage key; empty for [`Window::Lifetime`].
    pub(crate) suffix: String,
    /// When this window ends, in Unix milliseconds; `None` for [`Window::Lifetime`].
    pub(crate) ends_at_ms: Option<u64>,
}

/// A window in its one canonical spelling: what the stores key budgets by.
#[derive(PartialEq, Eq, Hash)]
enum Period {
    Lifetime,
    Seconds(Duration),
    Month,
}

impl Window {
    fn period(&self) -> Period {
        match *self {
            Window::Lifetime => Period::Lifetime,
            Window::Day => Period::Seconds(Duration::from_secs(86_400)),
            Window::Every(d) => Period::Seconds(d),
            Window::Month => Period::Month,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if let Window::Every(d) = self
            && (d.subsec_nanos() != 0 || d.is_zero() || *d > MAX_WINDOW)
        {
            return Err(Error::invalid(
                "a budget window must be a whole number of seconds, 1 s to 100 years",
            ));
        }
        Ok(())
    }

    /// The window's encoding for the Lua scripts: `0`, `s<seconds>` or `m`.
    pub(crate) fn spec(&self) -> Cow<'static, str> {
        match self {
            Window::Lifetime => Cow::Borrowed("0"),
            Window::Day => Cow::Borrowed("s86400"),
            Window::Every(d) => Cow::Owned(format!("s{}", d.as_secs())),
            Window::Month => Cow::Borrowed("m"),
        }
    }

    /// The slot that `now_ms` (Unix milliseconds) falls in. The Lua function `window` in
    /// `store/lua/common.lua` computes the same; a test holds the two together.
    pub(crate) fn slot(&self, now_ms: u64) -> WindowSlot {
        match self {
            Window::Lifetime => WindowSlot {
                suffix: String::new(),
                ends_at_ms: None,
            },
            Window::Day | Window::Every(_) => {
                let secs = match self {
                    Window::Every(d) => d.as_secs(),
                    _ => 86_400,
                };
                let index = now_ms / (secs * 1000);
                WindowSlot {
                    suffix: format!(":s{secs}.{index}"),
                    ends_at_ms: Some((index + 1) * secs * 1000),
                }
            }
            Window::Month => {
                let days = (now_ms / 86_400_000) as i64;
                let (y, m, _) = civil_from_days(days);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                WindowSlot {
                    suffix: format!(":m{y:04}{m:02}"),
                    ends_at_ms: Some(days_from_civil(ny, nm, 1) as u64 * 86_400_000),
                }
            }
        }
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Howard Hinnant's `days_from_civil`: (year, month, day) to days since 1970-01-01.
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A deployment's secret that keys the digests of unique values ([`Unique::keyed`]), so that
/// the digests in the store and in the logs cannot be tested against guessed values. Keep it
/// with the deployment's other secrets, the same for every process sharing a store; a changed
/// key makes every claimed value free again under the new one.
///
/// Its `Debug` shows nothing of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey(std::sync::Arc<[u8]>);

impl DigestKey {
    /// The fewest bytes a key may have.
    pub const MIN_LEN: usize = 16;

    /// A key from a secret of at least [`DigestKey::MIN_LEN`] bytes (refused with
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) otherwise).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, Error> {
        let secret = secret.as_ref();
        if secret.len() < Self::MIN_LEN {
            return Err(Error::invalid(format!(
                "a digest key has at least {} bytes, not {}",
                Self::MIN_LEN,
                secret.len()
            )));
        }
        Ok(Self(secret.into()))
    }
}

impl fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

/// A value that at most one owner may hold within a namespace: an e-mail address among
/// accounts, a username, a licence plate.
///
/// Only a digest of the normalized value is kept, so an e-mail address never appears in a Redis
/// key or a log line. An unkeyed digest can still be tested against a guessed address by anyone
/// who reads one: give a deployment a [`DigestKey`] and claim with [`Unique::keyed_email`].
///
/// ```
/// use tower_reserve::Unique;
///
/// let a = Unique::email("accounts", " Ann@Example.COM");
/// let b = Unique::email("accounts", "ann@example.com");
/// assert_eq!(a, b);
/// assert_ne!(a, Unique::new("accounts", "Ann@Example.COM"));
/// ```
#[derive(Clone)]
pub struct Unique {
    namespace: String,
    digest: [u8; 16],
    empty: bool,
    /// How the client's request names the value, for what the client is told: no part of its
    /// identity.
    words: Option<Cow<'static, str>>,
}

impl PartialEq for Unique {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.digest, self.empty)
            == (&other.namespace, &other.digest, other.empty)
    }
}

impl Eq for Unique {}

impl std::hash::Hash for Unique {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.namespace, &self.digest, self.empty).hash(state);
    }
}

impl Unique {
    /// The value exactly as given.
    pub fn new(namespace: impl Into<String>, value: &str) -> Self {
        Self::normalized(namespace, value, Cow::Borrowed)
    }

    /// The value after `normalize`, so that values the caller deems equal claim the same slot.
    pub fn normalized<'a>(
        namespace: impl Into<String>,
        value: &'a str,
        normalize: impl FnOnce(&'a str) -> Cow<'a, str>,
    ) -> Self {
        Self::digested(namespace.into(), &normalize(value), None)
    }

    /// The value after `normalize`, its digest keyed by `key` (HMAC-SHA256 instead of SHA-256):
    /// whoever reads the store or the logs without the key cannot test a guess (*has
    /// ann@example.com an account?*) by hashing it. Values claimed under one key are other
    /// slots than the same values under another key, or none.
    pub fn keyed<'a>(
        namespace: impl Into<String>,
        value: &'a str,
        normalize: impl FnOnce(&'a str) -> Cow<'a, str>,
        key: &DigestKey,
    ) -> Self {
        Self::digested(namespace.into(), &normalize(value), Some(key))
    }

    /// An e-mail address, normalized by [`normalize_email`], its digest keyed by `key` (see
    /// [`Unique::keyed`]): what a deployment should use for addresses.
    ///
    /// ```
    /// use tower_reserve::{DigestKey, Unique};
    ///
    /// let key = DigestKey::new(b"a deployment secret, 16+ bytes").unwrap();
    /// let a = Unique::keyed_email("accounts", " Ann@Example.COM", &key);
    /// assert_eq!(a, Unique::keyed_email("accounts", "ann@example.com", &key));
    /// assert_ne!(a, Unique::email("accounts", "ann@example.com"));
    /// ```
    pub fn keyed_email(namespace: impl Into<String>, address: &str, key: &DigestKey) -> Self {
        Self::keyed(namespace, address, |v| Cow::Owned(normalize_email(v)), key)
    }

    fn digested(namespace: String, value: &str, key: Option<&DigestKey>) -> Self {
        let full: [u8; 32] = match key {
            None => {
                let mut hasher = Sha256::new();
                hasher.update((namespace.len() as u64).to_be_bytes());
                hasher.update(namespace.as_bytes());
                hasher.update(value.as_bytes());
                hasher.finalize().into()
            }
            Some(key) => {
                let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0)
                    .expect("HMAC takes a key of any length");
                mac.update(&(namespace.len() as u64).to_be_bytes());
                mac.update(namespace.as_bytes());
                mac.update(value.as_bytes());
                mac.finalize().into_bytes().into()
            }
        };
        let mut digest = [0; 16];
        digest.copy_from_slice(&full[..16]);
        Self {
            namespace,
            digest,
            empty: value.is_empty() || value.len() > MAX_KEY_LEN,
            words: None,
        }
    }

    /// Says how the client's request names this value (`"the value at /email"`, `"the header
    /// x-username"`), so that a refusal tells the client which of its values is taken in its own
    /// words, as the `400`s name a header or a JSON pointer: `409` with the detail *the value at
    /// /email is already taken*. Without it the detail says *the value is already taken*. The
    /// words are not part of the value's identity (two claims of one value with other words are
    /// one value), and are never stored.
    ///
    /// ```
    /// use tower_reserve::Unique;
    ///
    /// let email = Unique::email("accounts", "ann@example.com").described_as("the value at /email");
    /// assert_eq!(email.description(), Some("the value at /email"));
    /// assert_eq!(email, Unique::email("accounts", "ann@example.com"));
    /// ```
    pub fn described_as(mut self, words: impl Into<Cow<'static, str>>) -> Self {
        self.words = Some(words.into());
        self
    }

    /// How the client's request names this value, if [`Unique::described_as`] said.
    pub fn description(&self) -> Option<&str> {
        self.words.as_deref()
    }

    /// An e-mail address, normalized by [`normalize_email`].
    pub fn email(namespace: impl Into<String>, address: &str) -> Self {
        Self::normalized(namespace, address, |v| Cow::Owned(normalize_email(v)))
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The digest of the normalized value, as lower-case hex.
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }

    /// `namespace:digest`: the value's identity in a store, and its hash tag.
    pub(crate) fn tag(&self) -> String {
        let mut tag = String::with_capacity(self.namespace.len() + 33);
        tag.push_str(&self.namespace);
        tag.push(':');
        tag.push_str(&hex(&self.digest));
        tag
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        check_tag("unique namespace", &self.namespace)?;
        if self.empty {
            return Err(Error::invalid(format!(
                "a unique value must be 1 to {MAX_KEY_LEN} bytes once normalized"
            )));
        }
        Ok(())
    }
}

impl fmt::Debug for Unique {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unique")
            .field("namespace", &self.namespace)
            .field("digest", &self.digest_hex())
            .finish()
    }
}

/// Trims surrounding white space and lower-cases the whole address.
///
/// ```
/// assert_eq!(tower_reserve::normalize_email("  Ann@Example.COM "), "ann@example.com");
/// ```
pub fn normalize_email(address: &str) -> String {
    address.trim().to_lowercase()
}

/// One thing a command needs. See the [crate docs](crate#semantics) for what each does on
/// reserve, commit and release.
///
/// ```
/// use tower_reserve::{Budget, Claim, Unique};
///
/// let spend = Claim::spend(Budget::new("customer-42", 50_000), 2_000);
/// let own = Claim::own(Unique::email("accounts", "ann@example.com"), "account-7");
/// let free = Claim::release_on_commit(Unique::email("accounts", "old@example.com"), "account-7");
/// # let _ = (spend, own, free);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Claim {
    /// Spend `amount` against `budget`: held on reserve, spent on commit.
    Spend {
        /// The budget.
        budget: Budget,
        /// The amount, in minor units, 1 to [`MAX_AMOUNT`].
        amount: u64,
    },
    /// Own `value` on behalf of `owner`: held on reserve, owned on commit. Claiming a value the
    /// same owner already owns succeeds and changes nothing.
    Own {
        /// The value.
        value: Unique,
        /// Who will own it, e.g. an account id.
        owner: String,
    },
    /// Give up `value`, which `owner` must own when reserving; freed only on commit.
    ReleaseOnCommit {
        /// The value.
        value: Unique,
        /// Its current owner.
        owner: String,
    },
}

/// The number of Redis Cluster hash slots. Stores place what belongs together by slot: Redis
/// Cluster by its own rule, the embedded store by shard.
pub(crate) const SLOTS: u16 = 16_384;

/// The Redis Cluster slot of `tag`: CRC16 (XMODEM) modulo 16 384, as Redis computes it for a
/// key whose hash tag is `tag`.
pub(crate) fn slot_of(tag: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS
}

impl Claim {
    /// Spend `amount` minor units against `budget`.
    pub fn spend(budget: Budget, amount: u64) -> Self {
        Claim::Spend { budget, amount }
    }

    /// Own `value` on behalf of `owner`.
    pub fn own(value: Unique, owner: impl Into<String>) -> Self {
        Claim::Own {
            value,
            owner: owner.into(),
        }
    }

    /// Free `value`, owned by `owner`, when the command commits.
    pub fn release_on_commit(value: Unique, owner: impl Into<String>) -> Self {
        Claim::ReleaseOnCommit {
            value,
            owner: owner.into(),
        }
    }

    /// What places the claim: every key the stores keep for it shares this one hash tag (a
    /// budget's key, a unique value's namespace and digest).
    pub(crate) fn tag(&self) -> Cow<'_, str> {
        match self {
            Claim::Spend { budget, .. } => Cow::Borrowed(budget.key()),
            Claim::Own { value, .. } | Claim::ReleaseOnCommit { value, .. } => {
                Cow::Owned(value.tag())
            }
        }
    }

    /// The slot of [`Claim::tag`].
    pub(crate) fn slot(&self) -> u16 {
        slot_of(self.tag().as_bytes())
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        match self {
            Claim::Spend { budget, amount } => {
                budget.validate()?;
                if *amount == 0 {
                    return Err(Error::invalid("an amount must be at least 1"));
                }
                if *amount > MAX_AMOUNT {
                    return Err(Error::invalid(format!(
                        "amount {amount} is above {MAX_AMOUNT}"
                    )));
                }
                Ok(())
            }
            Claim::Own { value, owner } | Claim::ReleaseOnCommit { value, owner } => {
                value.validate()?;
                check_key("owner", owner)
            }
        }
    }
}

pub(crate) fn check_key(what: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::invalid(format!(
            "a {what} must be 1 to {MAX_KEY_LEN} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

/// A key that becomes a Redis Cluster hash tag must not carry braces of its own, or its keys
/// could land on different slots.
pub(crate) fn check_tag(what: &str, key: &str) -> Result<(), Error> {
    check_key(what, key)?;
    if key.contains(['{', '}']) {
        return Err(Error::invalid(format!(
            "a {what} must not contain braces: they choose the Redis Cluster slot"
        )));
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(
            days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 1),
            29
        );
    }

    #[test]
    fn month_window_ends_on_the_first() {
        // 2024-02-10T12:00:00Z
        let now = days_from_civil(2024, 2, 10) as u64 * 86_400_000 + 43_200_000;
        let slot = Window::Month.slot(now);
        assert_eq!(slot.suffix, ":m202402");
        assert_eq!(
            slot.ends_at_ms,
            Some(days_from_civil(2024, 3, 1) as u64 * 86_400_000)
        );
        let december = days_from_civil(2025, 12, 31) as u64 * 86_400_000;
        assert_eq!(
            Window::Month.slot(december).ends_at_ms,
            Some(days_from_civil(2026, 1, 1) as u64 * 86_400_000)
        );
    }

    #[test]
    fn fixed_windows_align_to_the_epoch() {
        let slot = Window::Every(Duration::from_secs(60)).slot(125_000);
        assert_eq!(slot.suffix, ":s60.2");
        assert_eq!(slot.ends_at_ms, Some(180_000));
        assert_eq!(Window::Day.slot(86_400_000).suffix, ":s86400.1");
    }
}
