//! Redis Cluster: which node serves which slot (to batch per node), and the reservations whose
//! claims span slots.
//!
//! A reservation whose claims all share its id's slot (every reservation with a generated id
//! whose claims share a slot) is one operation on one node, exactly as on a single node. Only a
//! reservation across slots pays for more: its *home* record, in its id's slot, holds the claims
//! of that slot and lists its other *groups*; each group is held under a record of its own in
//! its own slot, with a lease longer by [`GROUP_GRACE`], so that a commit decided within the
//! home's lease finds every group still held. The home decides: whoever creates it reserves the
//! groups (a second attempt meanwhile is told the hold is in flight), and a commit or release is
//! decided on the home first, then carried to the groups.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use redis::Value;

use super::RedisStore;
use super::batch::{Batcher, Counters, Limits};
use super::connection::{CallArgs, Conn};
use super::ops::{self, Mode, Nonce, ReserveArgs, SettleAnswer};
use super::protocol::Op;
use crate::claim::SLOTS;
use crate::reservation::Denial;
use crate::{Claim, Error, ErrorKind, HoldId, Reservation, Reserved, Settled, Settlement};

/// How much longer a slot group's lease is than its home's, so that the home's lease always
/// ends first (across the difference between the nodes' clocks, milliseconds where clocks are
/// synchronised). Kept to one bucket of lease ends, so that what a group holds comes back at
/// most 200 ms after the lease (100 ms for a hold on one slot) when its process died.
pub(crate) const GROUP_GRACE: Duration = Duration::from_millis(100);

/// How long a commit has, once its home made sure of every group, to reach them all: before the
/// home commits, each group's lease is made to last at least this long from then. A group whose
/// node stops answering for longer than this between the two steps loses its part of the
/// commit (the answer names it); this is the bound the design rests on.
pub(crate) const COMMIT_WINDOW: Duration = Duration::from_secs(30);

/// Which primary serves each slot, from `CLUSTER SLOTS`.
struct SlotMap {
    nodes: Vec<String>,
    /// Per slot, an index into `nodes`; `u16::MAX` for a slot nobody serves.
    owners: Vec<u16>,
}

impl SlotMap {
    fn parse(reply: Value) -> Result<Self, Error> {
        let bad = || Error::new(ErrorKind::Protocol, "unexpected CLUSTER SLOTS reply");
        let Value::Array(ranges) = reply else {
            return Err(bad());
        };
        let mut nodes: Vec<String> = Vec::new();
        let mut owners = vec![u16::MAX; SLOTS as usize];
        for range in ranges {
            let Value::Array(range) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return Err(bad());
            };
            let host = match primary.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return Err(bad());
            };
            let address = format!("{host}:{port}");
            let index = match nodes.iter().position(|n| *n == address) {
                Some(i) => i,
                None => {
                    nodes.push(address);
                    nodes.len() - 1
                }
            };
            for slot in (*start).max(0)..=(*end).min(i64::from(SLOTS) - 1) {
                owners[slot as usize] = index as u16;
            }
        }
        Ok(Self { nodes, owners })
    }

    fn node(&self, slot: u16) -> Option<&str> {
        let i = *self.owners.get(slot as usize)?;
        self.nodes.get(i as usize).map(String::as_str)
    }
}

/// Sends each operation through the worker of the node that serves its slot, by a slot map of
/// its own (redis-rs keeps one too, but does not share it). A stale map costs little: a batch is
/// routed by its first operation's key, which a node that does not serve it turns away (`MOVED`,
/// or `ASK` while the slot moves: the batch connection follows neither, and every operation of
/// the batch is answered "moved"), and an operation of another slot that the node does not serve
/// is answered "moved" before it writes anything. Either way it is sent again after the map is
/// reloaded.
pub(crate) struct Router {
    conn: Conn,
    map: RwLock<Arc<SlotMap>>,
    batchers: Mutex<HashMap<String, Batcher>>,
    refreshed: tokio::sync::Mutex<Instant>,
    limits: Limits,
    counters: Arc<Counters>,
    args: CallArgs,
}

impl Router {
    pub(crate) async fn connect(
        conn: Conn,
        limits: Limits,
        counters: Arc<Counters>,
        args: CallArgs,
    ) -> Result<Self, Error> {
        let map = load(&conn).await?;
        Ok(Self {
            conn,
            map: RwLock::new(Arc::new(map)),
            batchers: Mutex::default(),
            refreshed: tokio::sync::Mutex::new(Instant::now()),
            limits,
            counters,
            args,
        })
    }

    /// The primaries, by address.
    pub(crate) fn nodes(&self) -> Vec<String> {
        self.map.read().expect("slot map lock").nodes.clone()
    }

    fn batcher(&self, slot: u16) -> Batcher {
        let map = self.map.read().expect("slot map lock").clone();
        let node = map.node(slot).unwrap_or("?");
        let mut batchers = self.batchers.lock().expect("batchers lock");
        if let Some(b) = batchers.get(node) {
            return b.clone();
        }
        let b = Batcher::spawn(
            self.conn.clone(),
            self.limits,
            self.counters.clone(),
            self.args.clone(),
        );
        batchers.insert(node.to_owned(), b.clone());
        b
    }

    /// Reloads the slot map, at most once per 50 ms however many operations ask.
    async fn refresh(&self) {
        let mut last = self.refreshed.lock().await;
        if last.elapsed() < Duration::from_millis(50) {
            return;
        }
        match load(&self.conn).await {
            Ok(map) => *self.map.write().expect("slot map lock") = Arc::new(map),
            Err(err) => tracing::warn!(error = %err, "reloading the Cluster slot map failed"),
        }
        *last = Instant::now();
    }

    pub(crate) async fn call(&self, op: Op, commits: bool) -> Result<Bytes, Error> {
        for attempt in 0..4u32 {
            if attempt > 0 {
                // A slot on its way between nodes answers "moved" on both until it has moved:
                // give the migration a moment (10, 20, 40 ms) before asking again.
                tokio::time::sleep(Duration::from_millis(10 << (attempt - 1))).await;
            }
            let again = Op {
                bytes: op.bytes.clone(),
                key: op.key.clone(),
                slot: op.slot,
                work: op.work,
            };
            let answer = self.batcher(op.slot).call(again, commits).await?;
            if !ops::is_moved(&answer) {
                return Ok(answer);
            }
            self.refresh().await;
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            "the Cluster moved the slot of an operation again and again",
        ))
    }
}

async fn load(conn: &Conn) -> Result<SlotMap, Error> {
    let reply: Value = conn
        .query(&redis::cmd("CLUSTER").arg("SLOTS").clone())
        .await?;
    SlotMap::parse(reply)
}

/// A reservation on a Cluster, split by slot: the claims in its id's slot, and the others by
/// slot, each group with its record.
pub(crate) struct Plan {
    pub(crate) home: Vec<usize>,
    pub(crate) groups: Vec<(String, Vec<usize>)>,
}

pub(crate) fn plan(store: &RedisStore, r: &Reservation) -> Plan {
    let home_slot = r.id().slot();
    let mut plan = Plan {
        home: Vec::new(),
        groups: Vec::new(),
    };
    let mut slots: Vec<u16> = Vec::new();
    for (i, claim) in r.claims().iter().enumerate() {
        let slot = claim.slot();
        if slot == home_slot {
            plan.home.push(i);
        } else if let Some(at) = slots.iter().position(|s| *s == slot) {
            plan.groups[at].1.push(i);
        } else {
            slots.push(slot);
            let record = store.keys().group_record(&claim.tag(), r.id());
            plan.groups.push((record, vec![i]));
        }
    }
    plan
}

/// Reserves a reservation across slots: the home first (it decides), then every group at once,
/// then the home is marked held. A denial or failure in any group gives back what this attempt
/// held and removes its records, so that the id may be reserved again.
pub(crate) async fn reserve(
    store: &RedisStore,
    r: &Reservation,
    plan: Plan,
) -> Result<Reserved, Error> {
    let id = r.id();
    let nonce: Nonce = rand::random();
    let group_records: Vec<String> = plan.groups.iter().map(|(g, _)| g.clone()).collect();
    let lease_ms = r.lease().as_millis() as u64;
    let home = ops::reserve(
        store.keys(),
        r,
        &ReserveArgs {
            record: store.keys().record(id),
            mode: Mode::Home,
            groups: &group_records,
            claims: &plan.home,
            lease_ms,
            nonce: &nonce,
        },
    );
    let answer = match store.call(home, false).await {
        Ok(answer) => answer,
        Err(err) => {
            if err.is_unavailable() {
                store.abandon(id, vec![store.keys().record(id)], nonce);
            }
            return Err(err);
        }
    };
    let mut grant = match ops::reserved(&answer, r, &plan.home)? {
        Reserved::Denied(d) => {
            return first_denial(store, r, &plan.groups, d)
                .await
                .map(Reserved::Denied);
        }
        Reserved::Granted(g) => g,
    };
    if grant.replayed {
        return replayed(store, r, &plan, grant).await;
    }

    let group_lease = lease_ms + GROUP_GRACE.as_millis() as u64;
    let answers = join_all(plan.groups.iter().map(|(record, indices)| async {
        let op = ops::reserve(
            store.keys(),
            r,
            &ReserveArgs {
                record: record.clone(),
                mode: Mode::Group,
                groups: &[],
                claims: indices,
                lease_ms: group_lease,
                nonce: &nonce,
            },
        );
        let answer = store.call(op, false).await?;
        ops::reserved(&answer, r, indices)
    }))
    .await;

    let mut denial: Option<Denial> = None;
    let mut failure: Option<Error> = None;
    let mut to_forget: Vec<&String> = Vec::new();
    let mut lost: Vec<&(String, Vec<usize>)> = Vec::new();
    // Every group granted, or whose answer was lost, is forgotten if the reservation fails.
    for (group @ (record, indices), answer) in plan.groups.iter().zip(answers) {
        match answer {
            Ok(Reserved::Granted(g)) => {
                for &i in indices {
                    grant.remaining[i] = g.remaining[i];
                }
                to_forget.push(record);
            }
            Ok(Reserved::Denied(d)) => {
                if denial.as_ref().is_none_or(|first| d.claim < first.claim) {
                    denial = Some(d);
                }
            }
            Err(err) => {
                // Its fate is unknown: forgotten too, in case it was held.
                to_forget.push(record);
                lost.push(group);
                failure.get_or_insert(err);
            }
        }
    }
    if denial.is_none() && failure.is_none() {
        let marked = store
            .call(ops::mark(store.keys().record(id), &nonce), false)
            .await
            .and_then(|answer| ops::ok(&answer, id));
        match marked {
            Ok(()) => return Ok(Reserved::Granted(grant)),
            Err(err) => failure = Some(err),
        }
    }
    // All or nothing: what this attempt held goes (the home decides first, see `forget_all`), and
    // tombstones refuse its calls that may still arrive, so that the id may be reserved again at
    // once. What cannot be reached now is given back in the background, or by its lease.
    let mut records: Vec<String> = to_forget.into_iter().cloned().collect();
    records.push(store.keys().record(id));
    let left = store.forget_all(id, records, &nonce, true).await;
    if !left.is_empty() {
        let groups = left.join(", ");
        store.abandon(id, left, nonce);
        if let Some(d) = denial {
            // A denial says that nothing is held; until these records are given back, something
            // may be.
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "reservation {id} was denied at claim {}, but what it may hold in {groups} could not be given back yet: it is given back in the background, or by its lease",
                    d.claim
                ),
            ));
        }
    }
    match (denial, failure) {
        // A group whose answer was lost may hold an earlier claim that fails: the denial names
        // the first claim that fails, as on one node.
        (Some(d), _) => first_denial(store, r, lost, d).await.map(Reserved::Denied),
        (None, Some(err)) => Err(err),
        (None, None) => unreachable!("checked above"),
    }
}

/// The first claim of a reservation across slots that fails, as on one node, given `denial`,
/// the first that the parts which answered named: each of `unknown`'s groups that holds an
/// earlier claim is checked, holding nothing.
async fn first_denial<'a>(
    store: &RedisStore,
    r: &Reservation,
    unknown: impl IntoIterator<Item = &'a (String, Vec<usize>)>,
    denial: Denial,
) -> Result<Denial, Error> {
    let earlier = unknown
        .into_iter()
        .filter(|(_, indices)| indices.iter().any(|&i| i < denial.claim));
    let answers = join_all(earlier.map(|(record, indices)| async {
        let answer = store
            .call(ops::check(store.keys(), r, record.clone(), indices), false)
            .await?;
        ops::reserved(&answer, r, indices)
    }))
    .await;
    let mut first = denial;
    for answer in answers {
        if let Reserved::Denied(d) = answer?
            && d.claim < first.claim
        {
            first = d;
        }
    }
    Ok(first)
}

/// A retry of a live hold across slots, answered as a replay, with what every budget claim's
/// budget has left as it stands (the home answered for its own).
async fn replayed(
    store: &RedisStore,
    r: &Reservation,
    plan: &Plan,
    mut grant: crate::Grant,
) -> Result<Reserved, Error> {
    for (_, indices) in &plan.groups {
        for &i in indices {
            if let Claim::Spend { budget, .. } = &r.claims()[i] {
                grant.remaining[i] = Some(crate::Store::budget(store, budget).await?.remaining);
            }
        }
    }
    Ok(Reserved::Granted(grant))
}

/// Checks a reservation across slots: every group's claims where they live, holding nothing.
/// A denial names the first claim that fails, as a reserve's does.
pub(crate) async fn check(
    store: &RedisStore,
    r: &Reservation,
    plan: Plan,
) -> Result<Reserved, Error> {
    let home = ops::check(store.keys(), r, store.keys().record(r.id()), &plan.home);
    let answer = store.call(home, false).await?;
    let mut grant = match ops::reserved(&answer, r, &plan.home)? {
        Reserved::Granted(g) if g.replayed => return replayed(store, r, &plan, g).await,
        Reserved::Granted(g) => g,
        Reserved::Denied(d) => {
            return first_denial(store, r, &plan.groups, d)
                .await
                .map(Reserved::Denied);
        }
    };
    let answers = join_all(plan.groups.iter().map(|(record, indices)| async {
        let op = ops::check(store.keys(), r, record.clone(), indices);
        let answer = store.call(op, false).await?;
        ops::reserved(&answer, r, indices)
    }))
    .await;
    let mut denial: Option<Denial> = None;
    for ((_, indices), answer) in plan.groups.iter().zip(answers) {
        match answer? {
            Reserved::Granted(g) => {
                for &i in indices {
                    grant.remaining[i] = g.remaining[i];
                }
            }
            Reserved::Denied(d) => {
                if denial.as_ref().is_none_or(|first| d.claim < first.claim) {
                    denial = Some(d);
                }
            }
        }
    }
    Ok(match denial {
        Some(d) => Reserved::Denied(d),
        None => Reserved::Granted(grant),
    })
}

/// Carries a commit or release that the home decided to its other groups, at once. A commit
/// whose lease ran out at the home releases them. Every group answers on its own; if any could
/// not follow, the answer is an error that says which, and a retry of the same settlement
/// finishes the job (each group is idempotent, and the home keeps its list).
pub(crate) async fn settle_groups(
    store: &RedisStore,
    id: &HoldId,
    settlement: &Settlement,
    home: SettleAnswer,
) -> Result<Settled, Error> {
    let keep_ms = settlement
        .retain_for(Duration::from_millis(store.retain_ms()))
        .map_or(0, |d| d.as_millis() as u64);
    let mut follow = match &home.result {
        Ok(_) => settlement.clone(),
        Err(err) if err.is_expired() && settlement.is_commit() => Settlement::release(),
        Err(_) => return home.result,
    };
    // The memo lives at the home alone.
    follow.memo = None;
    let follow = &follow;
    let args = ops::SettleArgs {
        // Groups keep their records as long as their home does, and at least for the retention
        // period: a retry finishes the job.
        keep_ms: keep_ms.max(store.retain_ms()),
        strict: false,
        prepared: ops::Prepared::No,
        nonce: rand::random(),
    };
    let answers = join_all(
        home.groups
            .iter()
            .map(|record| async { store.settle_record(record, id, follow, args).await?.result }),
    )
    .await;
    let mut missed: Vec<(&String, Error)> = Vec::new();
    let replayed = matches!(home.result, Ok(Settled::Replayed));
    for (record, answer) in home.groups.iter().zip(answers) {
        match answer {
            Ok(_) => {}
            // Nothing held there (it never was, or its record is gone): nothing to release.
            Err(err) if !follow.is_commit() && err.is_unknown_hold() => {}
            // Settled before with its home, and its record since gone.
            Err(err) if replayed && err.is_unknown_hold() => {}
            Err(err) => missed.push((record, err)),
        }
    }
    if missed.is_empty() {
        return home.result;
    }
    let what = if follow.is_commit() {
        "committed"
    } else {
        "released"
    };
    let kind = missed[0].1.kind();
    let groups: Vec<String> = missed
        .iter()
        .map(|(record, err)| format!("{record} ({err})"))
        .collect();
    Err(Error::new(
        kind,
        format!(
            "hold {id} is {what} in {} of {} slot groups; not yet in: {}; settle it again to finish",
            home.groups.len() + 1 - missed.len(),
            home.groups.len() + 1,
            groups.join(", ")
        ),
    ))
}

/// Makes sure, before a home commits, that each of its groups lasts at least [`COMMIT_WINDOW`]
/// from now, so that the commit, once the home accepted it, finds every group held. Answers
/// `false` when a group has ended already (or is unknown): it cannot follow a commit. A group
/// that cannot be reached is an error, and nothing is committed.
pub(crate) async fn prepare_groups(
    store: &RedisStore,
    id: &HoldId,
    groups: &[String],
) -> Result<bool, Error> {
    let lease_ms = COMMIT_WINDOW.as_millis() as u64;
    let answers = join_all(groups.iter().map(|record| async {
        let op = ops::extend(record.clone(), lease_ms, true);
        let answer = store.call(op, false).await?;
        ops::extended(&answer, id).map(drop)
    }))
    .await;
    let mut unavailable = None;
    for answer in answers {
        match answer {
            Ok(()) => {}
            Err(err) if err.is_expired() || err.is_unknown_hold() => return Ok(false),
            Err(err) if err.is_unavailable() => unavailable = Some(err),
            Err(err) => return Err(err),
        }
    }
    unavailable.map_or(Ok(true), Err)
}

/// Extends a home's other groups after the home (so that the home's lease always ends first).
pub(crate) async fn extend_groups(
    store: &RedisStore,
    id: &HoldId,
    lease: Duration,
    groups: &[String],
) -> Result<(), Error> {
    let lease_ms = (lease + GROUP_GRACE).as_millis() as u64;
    let answers = join_all(groups.iter().map(|record| async {
        let op = ops::extend(record.clone(), lease_ms, false);
        let answer = store.call(op, false).await?;
        ops::extended(&answer, id).map(drop)
    }))
    .await;
    let missed: Vec<String> = groups
        .iter()
        .zip(answers)
        .filter_map(|(record, answer)| answer.err().map(|err| format!("{record} ({err})")))
        .collect();
    if missed.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!(
            "hold {id} was extended at its home but not in: {}; a commit may then find those groups expired",
            missed.join(", ")
        ),
    ))
}
