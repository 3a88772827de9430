//! Reserve what a command needs, atomically, before its handler runs; commit or release it by
//! the handler's outcome.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod claim;
mod error;
mod layer;
mod reservation;
pub mod store;

pub use claim::{Budget, Claim, MAX_AMOUNT, MAX_KEY_LEN, Unique, Window, normalize_email};
pub use error::{Error, ErrorKind};
pub use layer::{
    DEFAULT_BODY_LIMIT, ExtractClaims, Extracted, Hold, Rejection, RejectionKind, Reserve,
    ReserveLayer, ResponseBody, ResponseFuture, Routes, Validate, extract,
};
pub use reservation::{
    BudgetStatus, Denial, DenialReason, Grant, HoldId, MAX_CLAIMS, MAX_LEASE, Reservation,
    ReservationBuilder, Reserved, Settled,
};
pub use store::{MemoryStore, RedisStore, RedisStoreBuilder, Store};
