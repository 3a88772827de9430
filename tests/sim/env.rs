//! The world a run lives in: no server (the embedded store), one `redis-server`, or a 3-primary
//! Cluster, and the faults caused on them for real (signals, `redis-cli`).

use std::time::Duration;

use tokio::process::Command;

use support::redis_server::{RedisCluster, RedisServer};

pub enum Env {
    Memory,
    Node(RedisServer),
    Cluster(RedisCluster),
}

/// Sends a signal to a process by id.
pub async fn signal(pid: Option<u32>, sig: &str) {
    let Some(pid) = pid else { return };
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
}

async fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Env {
    fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Env::Memory => Vec::new(),
            Env::Node(s) => vec![s],
            Env::Cluster(c) => c.nodes.iter().collect(),
        }
    }

    pub fn nodes(&self) -> usize {
        self.servers().len().max(1)
    }

    pub fn pid(&self, node: usize) -> Option<u32> {
        self.servers().get(node).and_then(|s| s.pid())
    }

    fn port(&self, node: usize) -> u16 {
        self.servers()[node].port()
    }

    /// Runs a command on every node at once.
    pub fn all_nodes<'a>(&self, args: &'a [&'a str]) -> impl std::future::Future<Output = ()> + 'a {
        let ports: Vec<u16> = self.servers().iter().map(|s| s.port()).collect();
        async move {
            futures_util::future::join_all(ports.into_iter().map(|p| cli(p, args))).await;
        }
    }

    /// Kills nothing: starts the one node again, empty, on its port.
    pub fn restart_node(&mut self) {
        if let Env::Node(s) = self {
            s.restart();
        }
    }

    /// Which node serves which slots: (first, last, node).
    pub async fn slot_map(&self) -> Vec<(u16, u16, usize)> {
        let mut out = Vec::new();
        for node in 0..self.servers().len() {
            let nodes = cli(self.port(node), &["CLUSTER", "NODES"]).await;
            let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            for r in me
                .split_whitespace()
                .skip(8)
                .filter(|r| !r.starts_with('['))
            {
                let (a, b) = match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(0)),
                    None => (r.parse().unwrap_or(0), r.parse().unwrap_or(0)),
                };
                out.push((a, b, node));
            }
        }
        out
    }

    async fn id_of(&self, node: usize) -> String {
        cli(self.port(node), &["CLUSTER", "MYID"])
            .await
            .trim()
            .to_owned()
    }

    /// Marks `slot` migrating from its node to the next one; answers (from, to).
    pub async fn start_migration(&self, slot: u16) -> Option<(usize, usize)> {
        if !matches!(self, Env::Cluster(_)) {
            return None;
        }
        let map = self.slot_map().await;
        let from = map
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, n)| *n)?;
        let to = (from + 1) % self.servers().len();
        let (from_id, to_id) = (self.id_of(from).await, self.id_of(to).await);
        let s = slot.to_string();
        cli(
            self.port(to),
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id],
        )
        .await;
        cli(
            self.port(from),
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id],
        )
        .await;
        Some((from, to))
    }

    pub async fn keys_in_slot(&self, node: usize, slot: u16) -> Vec<String> {
        cli(
            self.port(node),
            &["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "1000"],
        )
        .await
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect()
    }

    pub fn migrate_key(
        &self,
        from: usize,
        to: usize,
        key: &str,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let (from, to, key) = (self.port(from), self.port(to).to_string(), key.to_owned());
        async move {
            cli(
                from,
                &["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS", &key],
            )
            .await;
        }
    }

    /// Moves what is left of `slot` on `from` (keys written there while it moved), as
    /// `redis-cli --cluster reshard` does, then gives the slot to node `to` on every node, and
    /// waits until they agree. Answers what went wrong, if anything did.
    pub async fn finish_migration(&self, slot: u16, from: usize, to: usize) -> Result<(), String> {
        for _ in 0..50 {
            let left = self.keys_in_slot(from, slot).await;
            if left.is_empty() {
                break;
            }
            for key in &left {
                self.migrate_key(from, to, key).await;
            }
        }
        let to_id = self.id_of(to).await;
        let s = slot.to_string();
        for node in 0..self.servers().len() {
            let answer = cli(self.port(node), &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).await;
            if !answer.trim().eq_ignore_ascii_case("OK") {
                return Err(format!(
                    "CLUSTER SETSLOT {s} NODE on node {node}: {}",
                    answer.trim()
                ));
            }
        }
        for _ in 0..100 {
            let map = self.slot_map().await;
            let owners: Vec<usize> = map
                .iter()
                .filter(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|(_, _, n)| *n)
                .collect();
            if owners == [to] {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("the nodes never agreed that slot {slot} moved"))
    }

    /// Every key matching `pattern` on every node.
    pub async fn keys_matching(&self, pattern: &str) -> Vec<String> {
        let mut out = Vec::new();
        for node in 0..self.servers().len() {
            let keys = cli(self.port(node), &["--scan", "--pattern", pattern]).await;
            out.extend(keys.lines().filter(|k| !k.is_empty()).map(str::to_owned));
        }
        out
    }
}
