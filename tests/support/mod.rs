//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod example;
pub mod gateway;
pub mod redis_server;
pub mod shop;

use std::time::Duration;

use tower_reserve::{
    Budget, BudgetStatus, Claim, Denial, Error, Grant, HoldId, Reservation, Reserved, Store,
};

/// A unique key for this test run, so that cases never see each other's data.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", HoldId::random())
}

/// A one-claim spend reservation with the given lease.
pub fn spend(budget: &Budget, amount: u64, lease: Duration) -> Reservation {
    Reservation::builder()
        .lease(lease)
        .claim(Claim::spend(budget.clone(), amount))
        .build()
        .expect("a valid reservation")
}

pub async fn granted<S: Store>(store: &S, r: &Reservation) -> Grant {
    match store.reserve(r).await.expect("reserve") {
        Reserved::Granted(g) => g,
        Reserved::Denied(d) => panic!("expected a grant, got {d:?}"),
    }
}

pub async fn denied<S: Store>(store: &S, r: &Reservation) -> Denial {
    match store.reserve(r).await.expect("reserve") {
        Reserved::Denied(d) => d,
        Reserved::Granted(g) => panic!("expected a denial, got {g:?}"),
    }
}

pub async fn status<S: Store>(store: &S, budget: &Budget) -> BudgetStatus {
    store.budget(budget).await.expect("budget")
}

pub fn kind(result: Result<impl std::fmt::Debug, Error>) -> tower_reserve::ErrorKind {
    result.expect_err("an error").kind()
}
