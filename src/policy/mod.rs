//! Limits as data: a route's claims from a policy file instead of a closure.
//!
//! A [`Policy`] maps routes (a method and a path pattern) to what they reserve: budgets whose
//! key, amount and limit are read from the request or looked up in tables, and unique values.
//! [`PolicyLayer`] serves it: each route becomes its own [`ReserveLayer`](crate::ReserveLayer)
//! whose claims come from a [`RouteClaims`], the same [`ExtractClaims`](crate::ExtractClaims) a
//! closure is, so the layer does not know whether a route's claims came from a closure or a
//! file. Requests that match no route go to the inner service untouched, their bodies streamed.
//! The policy can be [replaced](PolicyLayer::reload) while requests flow; `examples/gateway/`
//! puts all of it in front of any HTTP service.
//!
//! All of it is behind the `policy` feature, on by default: the `toml` parser is the one
//! dependency it adds, and a build that only reserves from closures can leave it out.
//!
//! The same model is built in Rust with [`Policy::new`], [`Route`], [`BudgetRule`] and
//! [`UniqueRule`]; closures (with [`Routes`](crate::Routes)) stay for what data cannot express
//! (a price from another service, a limit from an account's plan in a database).
//!
//! # The file format
//!
//! TOML: it is what operators already edit for services written in Rust (Cargo, many daemons),
//! its types are explicit (a number is never a string by accident, as `no` and `010` can be in
//! YAML), comments are allowed, and `[[route]]` blocks read as a list of routes without
//! indentation to get wrong. The parser reports byte spans, so every error names its line.
//!
//! A complete file, with every field (most are optional):
//!
//! ```toml
//! # A purchase spends the sum of its products' prices against a customer's lifetime budget.
//! [[route]]
//! method = "POST"                                # in capitals; matched exactly
//! path = "/customers/{customer_id}/purchases"    # a segment {name} matches any one segment
//! lease = "30s"                # how long a hold lives unsettled: ms, s, m, h, d (default 30s)
//! body_limit = 65536           # bytes read to work out the claims; 413 above (default 64 KiB)
//! commit = ["2xx"]             # statuses that commit, e.g. ["2xx", 304]; others release
//! fail_open = false            # budget-only routes pass unreserved when the store is down
//! shadow = false               # check and count only: hold nothing, refuse nothing
//! on_disconnect = "finish"     # or "release": what happens when the client goes away
//! remaining_headers = false    # RateLimit-Policy / RateLimit response headers
//! too_many_requests = false    # over a windowed budget: 429 with Retry-After, not 403
//! # mint_id = "x-account-id"   # a fresh id per request, in this header (see Unique values)
//!
//! [[route.budget]]
//! key = "customer:{path.customer_id}"               # text with placeholders
//! amount = { sum = "/product_ids", table = "products" }
//! limit = 50000                                     # integer minor units (cents)
//! window = "lifetime"                               # "day", "month", or seconds: "3600s", "1h"
//!
//! # A sign-up owns the e-mail address, normalized, on behalf of the account id that an
//! # authenticating proxy in front puts in x-account-id.
//! [[route]]
//! method = "POST"
//! path = "/accounts"
//!
//! [[route.unique]]
//! namespace = "accounts"
//! value = "{body./email}"
//! normalize = "email"          # or "exact" (default)
//! owner = "{header.x-account-id}"
//!
//! # An e-mail change: own the new address, give up the old one when the change commits.
//! [[route]]
//! method = "PUT"
//! path = "/accounts/{account_id}/email"
//!
//! [[route.unique]]
//! namespace = "accounts"
//! value = "{body./email}"
//! normalize = "email"
//! owner = "{path.account_id}"
//!
//! [[route.unique]]
//! namespace = "accounts"
//! value = "{header.x-current-email}"
//! normalize = "email"
//! owner = "{path.account_id}"
//! release_on_commit = true
//!
//! # An API call costs what the client declares, against a daily quota by plan.
//! [[route]]
//! method = "POST"
//! path = "/v1/jobs"
//! shadow = true                # watch before enforcing
//!
//! [[route.budget]]
//! key = "tenant:{query.tenant}:{header.x-api-key}"
//! amount = "{header.x-job-cost}"
//! limit = { lookup = "{header.x-plan}", table = "plans", default = 1000 }
//! window = "day"
//!
//! # Or a limit set per request by the proxy in front, and a fixed amount.
//! [[route.budget]]
//! key = "org:{body./org/id}"
//! amount = 1
//! limit = "{header.x-org-call-limit}"
//! window = "60s"
//!
//! [tables.products]            # prices in cents, by product id
//! 1 = 100
//! 2 = 200
//! 3 = 300
//!
//! [tables.plans]               # daily quotas by plan
//! free = 1000
//! pro = 100000
//! ```
//!
//! ## Routes
//!
//! The first route whose method and pattern match a request takes it; two routes with one
//! method and pattern are refused. A route reserves at least one claim (at most
//! [`MAX_CLAIMS`](crate::MAX_CLAIMS)): its budgets first, then its unique values, each in file
//! order. A request that matches no route is not read, limited or reserved.
//!
//! On an axum router (the layer given to `Router::layer` or `route_layer`), the router decides:
//! a request takes the policy route whose pattern is the pattern of the router route that took
//! it (axum's `MatchedPath`; parameters may be named otherwise), and under a router route with
//! a wildcard (`/{*rest}`) the first policy route that matches the path. A policy route that no
//! router route serves would limit nothing: [`Policy::check_router`] refuses it at start, with
//! its line's field (`route[0].path`), before the router serves.
//!
//! ## Templates
//!
//! Keys, values and owners are [`Template`]s: text with placeholders.
//!
//! | placeholder | reads | when it cannot |
//! | --- | --- | --- |
//! | `{path.NAME}` | the route pattern's `{NAME}` segment | (checked at load: the pattern has it) |
//! | `{header.NAME}` | a request header | `400` when missing |
//! | `{query.NAME}` | a query parameter, percent-decoded | `400` when missing |
//! | `{body./json/pointer}` | a string or number in the JSON body (RFC 6901 pointer) | `415` not JSON, `400` malformed, `422` nothing there or another kind of value |
//!
//! ## Amounts and limits
//!
//! Money is integer minor units. An amount or a limit is a [`Number`]:
//!
//! - a whole number: `amount = 2000`, `limit = 50000` (an amount 1 to 2^53 - 1, a limit 0 to
//!   2^53 - 1, checked at load);
//! - one placeholder, read from the request: `amount = "{header.x-cost}"`,
//!   `limit = "{header.x-limit}"` (a header an authenticating proxy sets). Digits in a header,
//!   query or path (`400` otherwise); a JSON integer in the body (`422` otherwise);
//! - a look-up: `{ lookup = "TEMPLATE", table = "NAME", default = N }`: the table's entry for
//!   the rendered key, else `default`, else `422`;
//! - a sum: `{ sum = "/json/pointer", table = "NAME" }`: the ids in the array at the pointer
//!   (strings or integers), each looked up and added; an unknown id is `422` (with `table` and
//!   `id` members in the problem), and so is a sum above 2^53 - 1.
//!
//! Tables are `[tables.NAME]` with integer values 0 to 2^53 - 1; every table a route names must
//! exist. An amount of 0 (an empty list of ids), or one above the limit of what a claim may
//! carry, is refused with `422` before anything is held.
//!
//! ## Unique values
//!
//! `[[route.unique]]` owns `value` in `namespace` on behalf of `owner` (the owner claiming its
//! own value again succeeds); with `release_on_commit = true` it instead gives up a value the
//! owner owns, only when the request commits. `normalize = "email"` trims and lower-cases
//! ([`normalize_email`](crate::normalize_email)); `"exact"` keeps the value as read. Only a
//! digest of the value is stored; give the policy a deployment's secret with
//! [`Policy::digest_key`] (recommended) and the digest is keyed, so that whoever reads the store
//! or the logs cannot test a guessed address against it.
//!
//! A sign-up that carries no id of its own yet gets one minted: `mint_id = "x-account-id"` on
//! the route puts a fresh id (a UUID) in that request header, in place of anything the client
//! sent, before the claims are read. The unique rule reads its owner there, and the inner
//! service (the upstream, or a handler, as a [`MintedId`] extension) creates the account under
//! that id:
//!
//! ```toml
//! [[route]]
//! method = "POST"
//! path = "/accounts"
//! mint_id = "x-account-id"
//!
//! [[route.unique]]
//! namespace = "accounts"
//! value = "{body./email}"
//! normalize = "email"
//! owner = "{header.x-account-id}"
//! ```
//!
//! An owner read from nothing but what its value is read from (`owner = "{body./username}"`
//! beside `value = "{body./username}"`, or fixed text) is refused at load: every request for one
//! value would be one owner, and an owner claiming its own value again is granted, so nothing
//! would ever be refused.
//!
//! ## Errors
//!
//! A file is checked whole before it is used ([`Policy::from_toml`], [`Policy::validate`]):
//! unknown fields, wrong types, unknown placeholder sources, path parameters the pattern lacks,
//! tables that do not exist, numbers out of range, leases outside 1 ms to 1 day, windows that are
//! not whole seconds, owners read from nothing but their value. A [`PolicyError`] names the line, the column and the field:
//!
//! ```text
//! line 14, column 10, route[0].budget[0].amount: 0 is not within 1 to 9007199254740991 (2^53 - 1)
//! ```
//!
//! At request time, what cannot be read is the layer's problem+json `400`, `415` or `422`, and
//! a body above the route's limit `413`; nothing is held and the inner service is not called.
//!
//! # Shadow mode and metrics
//!
//! A route with `shadow = true` works out its claims and checks them against the store, but
//! holds nothing and lets every request through; what it would have refused is logged and
//! counted as `tower_reserve_denials_total{mode="shadow"}`. Every route's metrics carry its
//! pattern as the `route` label (see [`ReserveLayer`](crate::ReserveLayer) and the `metrics`
//! facade; no exporter is installed by this crate).

mod body;
mod claims;
mod error;
mod file;
mod future;
mod layer;
mod model;
#[cfg(feature = "axum")]
mod router;
mod service;
mod template;

pub use self::body::PolicyBody;
pub use self::claims::{MintedId, RouteClaims};
pub use self::error::PolicyError;
pub use self::future::PolicyFuture;
pub use self::layer::PolicyLayer;
pub use self::model::{BudgetRule, Normalize, Number, Policy, Route, StatusSet, Table, UniqueRule};
pub use self::service::PolicyService;
pub use self::template::{Source, Template};

#[cfg(test)]
mod tests;
