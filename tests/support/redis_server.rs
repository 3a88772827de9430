//! Starts real `redis-server` processes on free loopback ports for tests and benches, and stops
//! them when dropped. Not a mock: every test that needs Redis talks to one of these.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("local address")
        .port()
}

impl RedisServer {
    /// Starts a server with no persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--cluster-enabled yes`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on_ports(extra, free_port)
    }

    fn start_on_ports(extra: &[&str], mut pick: impl FnMut() -> u16) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..10 {
            let port = pick();
            let dir = std::env::temp_dir()
                .join(format!("tower-reserve-redis-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create a data directory");
            let mut server = RedisServer {
                child: None,
                port,
                dir,
                extra: extra.clone(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!(
            "could not start redis-server on a free port; is it installed? (scripts/test installs it)"
        );
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server; scripts/test installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id, while it runs (to stop and continue it with signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL): in-memory data and the script cache are gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port `p` such that `p` and `p + 10000` (the cluster bus) were both free a moment ago.
pub fn free_cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 4000) as u16;
    for _ in 0..2000 {
        let offset = NEXT.fetch_add(7, Ordering::Relaxed);
        let port = 20_000 + (seed + offset) % 9_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// A Redis Cluster on loopback: `masters` primaries, each with `replicas` replicas, every node
/// its own `redis-server` process. Stopped when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        let count = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_on_ports(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "1500",
                        "--cluster-config-file",
                        "nodes.conf",
                        // A replica is promoted only once it has synced; start syncing at once
                        // rather than after Redis's default five-second delay.
                        "--repl-diskless-sync-delay",
                        "0",
                        // Fault tests pause a node with DEBUG SLEEP.
                        "--enable-debug-command",
                        "local",
                    ],
                    free_cluster_port,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster.wait_for_replicas(Duration::from_secs(15));
        cluster
    }

    /// Waits until every replica's link to its primary is up, so that a failover can promote it.
    pub fn wait_for_replicas(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            while node.cli(&["role"]).starts_with("slave")
                && !node
                    .cli(&["info", "replication"])
                    .contains("master_link_status:up")
            {
                assert!(Instant::now() < deadline, "a replica never synced");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the slot owners.
    pub fn wait_until_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"));
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the cluster did not become ready in {limit:?}");
    }

    /// Seed URLs of every node.
    /// The slot ranges node `i` serves, from its own `CLUSTER NODES`.
    pub fn slots_of(&self, i: usize) -> Vec<(u16, u16)> {
        let nodes = self.nodes[i].cli(&["cluster", "nodes"]);
        let me = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .expect("a myself line");
        me.split_whitespace()
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (r.parse().unwrap(), r.parse().unwrap()),
            })
            .collect()
    }

    /// The slot of `key` (its hash tag's, if it has one), as Redis computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        self.nodes[0]
            .cli(&["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot")
    }

    /// The index of the node that serves `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot = self.keyslot(key);
        (0..self.nodes.len())
            .find(|&i| {
                self.slots_of(i)
                    .iter()
                    .any(|&(a, b)| (a..=b).contains(&slot))
            })
            .expect("a node serves every slot")
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The indices of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].is_running() && self.nodes[i].cli(&["role"]).starts_with("master")
            })
            .collect()
    }
}
