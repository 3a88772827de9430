//! An example application's binary as a child process on a free loopback port, for end-to-end
//! tests over HTTP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::Client;

/// The binary of example application `name` (the workspace member `examples/<name>/`), as
/// Cargo built it for this test run: Cargo builds a package's binary before that package's
/// integration tests, in the same profile and with the same features, next to their `deps/`.
pub fn example_binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "no binary of {name} at {}: run its tests with `cargo test -p {name}`",
        binary.display()
    );
    binary
}

/// One running example; killed when dropped.
pub struct Example {
    child: Child,
    /// `http://127.0.0.1:<port>`, from its `listening on` line.
    pub base: String,
    /// What it printed on standard output before it listened (the store it uses, say).
    pub before: Vec<String>,
    /// Every later line, from standard output and (when piped) standard error alike.
    lines: mpsc::Receiver<String>,
}

impl Example {
    /// Starts example `name` with `addr_var` set to a free loopback port (`127.0.0.1:0`) and
    /// these variables, and waits (at most 60 s) for its `listening on <url>` line.
    pub fn start(name: &str, addr_var: &str, env: &[(&str, &str)]) -> Example {
        Self::spawn(
            name,
            Self::command(name, addr_var, env),
            Duration::from_secs(60),
        )
    }

    /// The command that starts example `name` on a free loopback port: no Redis from the test's
    /// environment, standard output piped, standard error inherited, then these variables.
    pub fn command(name: &str, addr_var: &str, env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(example_binary(name));
        command
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .env(addr_var, "127.0.0.1:0")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }

    /// Spawns `command` (example `name`) and waits, at most `within`, for its `listening on`
    /// line. Its pipes are drained for its whole life; what it writes to a piped standard
    /// error is also echoed to the test's.
    pub fn spawn(name: &str, mut command: Command, within: Duration) -> Example {
        let mut child = command.spawn().expect("start the example");
        let (out_tx, out_rx) = mpsc::channel::<String>();
        let (tx, lines) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let later = tx.clone();
        std::thread::spawn(move || {
            let mut listening = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Up to the `listening on` line, stdout goes to `before`; then to `lines`.
                let _ = if listening {
                    later.send(line)
                } else {
                    listening = line.starts_with("listening on ");
                    out_tx.send(line)
                };
            }
        });
        if let Some(stderr) = child.stderr.take() {
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{name}: {line}");
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match out_rx.recv_timeout(left) {
                Ok(line) => match line.strip_prefix("listening on ") {
                    Some(url) => {
                        return Example {
                            child,
                            base: url.trim().to_owned(),
                            before,
                            lines,
                        };
                    }
                    None => before.push(line),
                },
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{name} did not say it was listening within {within:?}: {before:?}");
                }
            }
        }
    }

    /// Waits (bounded, 10 s) until `GET /healthz` answers `200`.
    pub async fn wait_healthy(&self) {
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(self.url("/healthz")).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "/healthz did not answer 200");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded, 10 s) for a line, printed after it listened, that contains `text`, and
    /// answers it.
    pub fn wait_for_line(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {text:?} within 10 s"),
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it now, and waits for it to end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client with a bounded timeout, and enough connections for a crowd.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a reqwest client")
}
