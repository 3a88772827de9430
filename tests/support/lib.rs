//! Helpers shared by the tests of tower-reserve and of its example applications.

pub mod example;
pub mod gateway;
pub mod raw;
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

/// This thread's `tracing` output, as text.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures what this thread logs, at every level, until the guard is dropped.
///
/// `tracing` caches per callsite whether anyone listens, process-wide. A test on another thread
/// that reaches a callsite first, where no subscriber is set, can cache "nobody" while this
/// thread's subscriber is being set. So a global subscriber that listens to everything (and
/// writes nowhere) is installed first, once: no callsite is ever cached as unwanted.
pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    capture_logs_at(tracing::Level::DEBUG)
}

/// As [`capture_logs`], of events at `level` and above.
pub fn capture_logs_at(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
    static EVERYTHING: std::sync::Once = std::sync::Once::new();
    EVERYTHING.call_once(|| {
        let sink = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::set_global_default(sink).expect("no global subscriber yet");
    });
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (logs, guard)
}

/// A store whose clock the test moves (feature `test-clock`): leases, retentions and windows
/// pass in one step.
pub trait Advance: Store {
    fn advance(&self, by: Duration) -> impl std::future::Future<Output = ()> + Send;
}

impl Advance for tower_reserve::MemoryStore {
    async fn advance(&self, by: Duration) {
        self.advance_clock(by);
    }
}

impl Advance for tower_reserve::RedisStore {
    async fn advance(&self, by: Duration) {
        self.advance_clock(by)
            .await
            .expect("advance the store's clock");
    }
}
