//! Coalescing: one worker per Redis node collects the operations that requests ask of that node
//! while a call of the store's function is in flight, and sends them as the next call: one run for many
//! operations, each answered on its own channel. A lone operation goes out at once, so an idle
//! system waits for nothing; under load each call carries what queued behind the last.
//!
//! The worker is tower's `buffer` worker in shape (requests in over a channel, each answered on a
//! oneshot); the batching is TigerBeetle's client's (the next batch fills while one is in flight).
//!
//! The worker also keeps each operation's time limit, with one timer for each call rather than
//! one for every operation: a call is given until the earliest deadline of the operations it
//! carries, past which each of them is answered "unavailable" (whether the call ran is not known:
//! the store handles that answer as a lost one). An operation waits in the queue only behind
//! calls of operations asked before it, whose deadlines come no later than its own; when one of
//! them ends, an operation whose time is up is answered "unavailable" rather than sent. So none
//! waits past its deadline.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::connection::{CallArgs, Conn};
use super::protocol::{self, Op};
use crate::{Error, ErrorKind};

/// How big one call may get, how many may be in flight to one node at once, and how long an
/// operation may take.
///
/// A script blocks every other client of its node while it runs, and cannot be killed once it has
/// written, so a batch is bounded in operations, in work (claims) and in bytes. At most 128
/// operations, 256 claims or 256 KiB (memos can be large; an operation larger than that goes
/// alone): with each budget clearing at most `MAX_EXPIRED_PER_CALL` expired buckets per call,
/// the worst batch runs in a few milliseconds, far from Redis's `BUSY` threshold (5 s), and
/// well within a call's timeout, and a typical one (a purchase is one claim) in well under one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_ops: usize,
    pub(crate) max_work: usize,
    pub(crate) max_bytes: usize,
    pub(crate) in_flight: usize,
    /// After a call that committed: wait for this many replicas, this long (Redis `WAIT`).
    pub(crate) wait_for: Option<(usize, Duration)>,
    /// The time limit of one operation, from when it is asked to when it is answered: its wait in
    /// the queue, its call and any wait for replicas.
    pub(crate) timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ops: 128,
            max_work: 256,
            max_bytes: 256 << 10,
            in_flight: 2,
            wait_for: None,
            timeout: Duration::from_secs(2),
        }
    }
}

/// How many calls and operations a store has sent: their ratio is the batch size seen.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) ops: AtomicU64,
}

/// The handle to one node's worker. Cheap to clone; the worker stops when every handle is gone.
#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Job>,
    timeout: Duration,
}

struct Job {
    op: Op,
    /// Whether this operation commits (a call that holds one waits for replicas, if asked).
    commits: bool,
    /// When it is answered "unavailable" if it has not been answered yet.
    deadline: Instant,
    answer: oneshot::Sender<Result<Bytes, Error>>,
}

impl Job {
    fn time_out(self, timeout: Duration) {
        let _ = self.answer.send(Err(super::timed_out(timeout)));
    }
}

/// Operations queued at most, beyond which callers wait for room (and time out).
const QUEUE: usize = 8_192;

impl Batcher {
    /// A worker for one node; every call carries `args`.
    pub(crate) fn spawn(
        conn: Conn,
        limits: Limits,
        counters: Arc<Counters>,
        args: CallArgs,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(work(rx, conn, limits, counters, args));
        Self {
            tx,
            timeout: limits.timeout,
        }
    }

    /// Sends `op` with the next call to this node and answers its own answer, within the time
    /// limit.
    pub(crate) async fn call(&self, op: Op, commits: bool) -> Result<Bytes, Error> {
        let (answer, rx) = oneshot::channel();
        let now = Instant::now();
        // A limit too long to add (`Duration::MAX`, say) is no limit: 30 years, as tokio's.
        let deadline = now
            .checked_add(self.timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        let job = Job {
            op,
            commits,
            deadline,
            answer,
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            // Waiting for room is boxed: a queue this long is rarely full, and the wait's state
            // (the job with it) would otherwise make every call's future larger.
            Err(mpsc::error::TrySendError::Full(job)) => {
                let room = Box::pin(tokio::time::timeout_at(deadline, self.tx.send(job)));
                match room.await {
                    Ok(sent) => sent.map_err(|_| stopped())?,
                    Err(_) => return Err(super::timed_out(self.timeout)),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(stopped()),
        }
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "the store's connection worker has stopped",
    )
}

async fn work(
    mut rx: mpsc::Receiver<Job>,
    conn: Conn,
    limits: Limits,
    counters: Arc<Counters>,
    args: CallArgs,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        while waiting.len() < QUEUE {
            match rx.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => break,
            }
        }
        while in_flight.len() < limits.in_flight && !waiting.is_empty() {
            let jobs = next_batch(&mut waiting, &limits, Instant::now());
            if jobs.is_empty() {
                break;
            }
            counters.calls.fetch_add(1, Ordering::Relaxed);
            counters.ops.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            in_flight.push(send(conn.clone(), jobs, limits, args.clone()));
        }
        if in_flight.is_empty() {
            if !open && waiting.is_empty() {
                return;
            }
            match rx.recv().await {
                Some(job) => waiting.push_back(job),
                None => open = false,
            }
            continue;
        }
        tokio::select! {
            Some((jobs, reply)) = in_flight.next() => answer(jobs, reply),
            job = rx.recv(), if open && waiting.len() < QUEUE => match job {
                Some(job) => waiting.push_back(job),
                None => open = false,
            },
        }
    }
}

/// Takes the next batch off the queue, within the limits, skipping operations whose caller has
/// given up, and answering those whose time is up by `now` (sending one now could only surprise
/// its caller, who was or will be told the store was unavailable).
fn next_batch(waiting: &mut VecDeque<Job>, limits: &Limits, now: Instant) -> Vec<Job> {
    let mut jobs = Vec::with_capacity(waiting.len().min(limits.max_ops));
    let (mut work, mut bytes) = (0, 0);
    while let Some(job) = waiting.front() {
        if job.answer.is_closed() {
            waiting.pop_front();
            continue;
        }
        if job.deadline <= now {
            let job = waiting.pop_front().expect("front exists");
            job.time_out(limits.timeout);
            continue;
        }
        if !jobs.is_empty()
            && (jobs.len() >= limits.max_ops
                || work + job.op.work > limits.max_work
                || bytes + job.op.bytes.len() > limits.max_bytes)
        {
            break;
        }
        work += job.op.work;
        bytes += job.op.bytes.len();
        jobs.push(waiting.pop_front().expect("front exists"));
    }
    jobs
}

/// One call of the function with the operations `jobs`, until the earliest of their deadlines.
async fn send(
    conn: Conn,
    jobs: Vec<Job>,
    limits: Limits,
    args: CallArgs,
) -> (Vec<Job>, Result<Bytes, Error>) {
    let payload = protocol::batch(jobs.iter().map(|j| &j.op.bytes[..]));
    let key = jobs[0].op.key.as_str();
    let deadline = jobs
        .iter()
        .map(|j| j.deadline)
        .min()
        .expect("a batch has jobs");
    let call = async {
        match conn.run_batch(key, &payload, &args).await {
            Ok(Some(reply)) => {
                if let Some((replicas, timeout)) = limits.wait_for
                    && jobs.iter().any(|j| j.commits)
                {
                    // Boxed: a rare wait (replicas asked for), which would otherwise make every
                    // batch's future larger.
                    Box::pin(conn.wait(key, replicas, timeout)).await;
                }
                Ok(reply)
            }
            // Turned away by its node, the batch ran nothing: each operation is answered
            // "moved", as one the node does not serve, and the router sends it again.
            Ok(None) => Ok(protocol::all_moved(jobs.len()).into()),
            Err(err) => Err(err),
        }
    };
    let reply = tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_else(|_| Err(super::timed_out(limits.timeout)));
    (jobs, reply)
}

fn answer(jobs: Vec<Job>, reply: Result<Bytes, Error>) {
    let answers = reply.and_then(|reply| protocol::split(reply, jobs.len()));
    match answers {
        Ok(answers) => {
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.answer.send(Ok(answer));
            }
        }
        Err(err) => {
            for job in jobs {
                let _ = job.answer.send(Err(err.duplicate()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future that `f` returns, read off its type without calling it.
    fn future_size<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A batch's future ([`super::send`]) lives in a task of `FuturesUnordered`, one allocation
    /// per call of the function; past the 1,032 bytes glibc serves from its per-thread cache,
    /// every call's allocation and free take the allocator's slow path. A rare path awaited
    /// inline (loading the library again, waiting for replicas) keeps its room in every batch's
    /// future, so this is what tells when one grows it past the cache. The task adds its own
    /// fields (72 bytes here): the future keeps well under.
    #[test]
    fn a_batchs_future_stays_within_the_allocators_fast_path() {
        let size = future_size(super::send);
        assert!(size <= 900, "{size} bytes");
    }
}
