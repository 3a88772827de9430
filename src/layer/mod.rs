//! The tower layer: request → claims → store → handler → settle.
//!
//! - [`extract`]: the strategy that turns a request into claims, and building blocks for it.
//! - [`ReserveLayer`] (`layer.rs`): configuration; [`Reserve`] (`service.rs`): reads the body
//!   within a limit, runs the checks and the extractor, reserves.
//! - [`ResponseFuture`] (`future.rs`): runs the handler under the hold's lease, then settles.
//! - [`Hold`] (`settle.rs`): what the handler sees and steers; the drop guard that releases.
//! - [`Rejection`] (`rejection.rs`): every refusal, as `application/problem+json`.

mod body;
pub mod extract;
mod future;
pub mod idempotency;
#[allow(clippy::module_inception)]
mod layer;
mod metrics;
mod rejection;
mod remaining;
mod service;
mod settle;
mod usage;

/// A boxed future the layer keeps or hands on: the steps before the handler, a store call, an
/// extractor or a check behind a trait object.
type BoxFuture<T> = futures_util::future::BoxFuture<'static, T>;

pub use self::body::RequestBody;
pub use self::extract::{ExtractClaims, Extracted, Routes};
pub use self::future::{ResponseBody, ResponseFuture};
pub use self::idempotency::Idempotency;
pub use self::layer::{DEFAULT_BODY_LIMIT, Disconnect, ReserveLayer, Validate};
pub use self::rejection::{Rejection, RejectionKind};
pub use self::service::Reserve;
pub use self::settle::{ACTUAL_HEADER, Actual, Hold};
pub use self::usage::{BudgetOf, Spend, Usage, usage};
