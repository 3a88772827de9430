//! The crate's error type.

use std::fmt;

/// Any error, boxed: what bodies and sources carry across the crate.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error from building a reservation or from a [`Store`](crate::Store).
///
/// Opaque on purpose: match on [`Error::kind`] or ask the `is_*` predicates; the underlying cause
/// (a Redis error, say) is behind [`std::error::Error::source`].
///
/// ```
/// use tower_reserve::{Budget, Claim, Reservation};
/// use std::time::Duration;
///
/// // An amount of zero is refused before anything reaches a store.
/// let err = Reservation::builder()
///     .lease(Duration::from_secs(30))
///     .claim(Claim::spend(Budget::new("customer-1", 50_000), 0))
///     .build()
///     .unwrap_err();
/// assert!(err.is_invalid_input());
/// ```
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
    memo: Option<bytes::Bytes>,
}

/// What went wrong, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input was refused before anything was written: an amount of zero, an amount or limit
    /// above 2^53 - 1, an empty or over-long key, an empty reservation, two claims on one key.
    InvalidInput,
    /// A reservation was retried with the same id but other claims.
    Conflict,
    /// No hold with this id is known (never reserved, or its record has expired).
    UnknownHold,
    /// The hold's lease ran out before it was committed or extended: its capacity is back.
    Expired,
    /// The hold was already committed, so it cannot be released or reserved again.
    Committed,
    /// The hold was already released (or released before it was reserved).
    Released,
    /// A commit named an actual amount above what its hold holds; nothing changed.
    ExceedsHold,
    /// A refund asked for more than the budget's window has spent; nothing changed.
    ExceedsSpent,
    /// Another attempt with this id is being reserved right now (on a Redis Cluster, a
    /// reservation across slots is reserved slot by slot); ask again shortly.
    InFlight,
    /// The store could not be reached or did not answer in time. Nothing can be assumed about
    /// the call, but whatever it may have held is bounded by its lease.
    Unavailable,
    /// The store answered something this crate does not understand.
    Protocol,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                source: None,
                memo: None,
            }),
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// The same kind and message, for answering one failure to several callers (the cause
    /// itself stays with the first).
    pub(crate) fn duplicate(&self) -> Self {
        Self::new(self.kind(), self.inner.message.clone())
    }

    pub(crate) fn with_memo(mut self, memo: Option<bytes::Bytes>) -> Self {
        self.inner.memo = memo;
        self
    }

    /// A store's refusal of an operation on hold `id`.
    pub(crate) fn refused(kind: ErrorKind, id: &crate::HoldId) -> Self {
        let what = match kind {
            ErrorKind::Conflict => "was reserved with other claims",
            ErrorKind::UnknownHold => "is not known",
            ErrorKind::Expired => "has expired",
            ErrorKind::Committed => "is already committed",
            ErrorKind::Released => "is already released",
            ErrorKind::ExceedsHold => "holds less than the actual amount named",
            ErrorKind::ExceedsSpent => "would refund more than was spent",
            ErrorKind::InFlight => "is being reserved by another attempt",
            _ => "was refused",
        };
        Self::new(kind, format!("hold {id} {what}"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The input was refused and nothing was written.
    pub fn is_invalid_input(&self) -> bool {
        self.kind() == ErrorKind::InvalidInput
    }

    /// The same reservation id was used with other claims.
    pub fn is_conflict(&self) -> bool {
        self.kind() == ErrorKind::Conflict
    }

    /// No hold with this id is known.
    pub fn is_unknown_hold(&self) -> bool {
        self.kind() == ErrorKind::UnknownHold
    }

    /// The hold's lease ran out.
    pub fn is_expired(&self) -> bool {
        self.kind() == ErrorKind::Expired
    }

    /// The hold was already committed.
    pub fn is_committed(&self) -> bool {
        self.kind() == ErrorKind::Committed
    }

    /// The hold was already released.
    pub fn is_released(&self) -> bool {
        self.kind() == ErrorKind::Released
    }

    /// The store could not be reached or timed out.
    pub fn is_unavailable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// What the settler of the hold kept with its record ([`Settlement::memo`](crate::Settlement::memo)),
    /// on the error of a reserve that retried a settled hold's id.
    pub fn memo(&self) -> Option<&[u8]> {
        self.inner.memo.as_deref()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("tower_reserve::Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        // A connection that failed or dropped, or a server that is loading, busy, failing over
        // or re-sharding, leaves the call's fate unknown; only the lease bounds what it may
        // have held. Anything else (a script error, a reply of the wrong type) is a fault on
        // one side or the other, not an outage.
        let transient = err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_cluster_error()
            || !matches!(err.retry_method(), redis::RetryMethod::NoRetry);
        let kind = if transient {
            ErrorKind::Unavailable
        } else {
            ErrorKind::Protocol
        };
        Error::new(kind, format!("redis: {err}")).with_source(err)
    }
}
