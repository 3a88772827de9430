//! The compiled `shop` example as a child process, for the end-to-end and fault tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

/// The example binary, built once per test run (cheap when it is up to date).
pub fn shop_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // target/<profile>/deps/shop-<hash> → target/<profile>/examples/shop
            let exe = std::env::current_exe().expect("the test binary's path");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile>/deps");
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut build = Command::new(env!("CARGO"));
            build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "build",
                "--quiet",
                "--example",
                "shop",
            ]);
            if release {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build --example shop");
            assert!(status.success(), "cargo build --example shop failed");
            let binary = profile_dir
                .join("examples")
                .join(format!("shop{}", std::env::consts::EXE_SUFFIX));
            assert!(binary.exists(), "no example binary at {}", binary.display());
            binary
        })
        .clone()
}

/// One running shop; killed when dropped.
pub struct Shop {
    pub child: Child,
    pub base: String,
    /// The first line it printed: it names the store.
    pub first_line: String,
}

impl Shop {
    /// Starts the shop with `SHOP_FAULTS=1` on a free port, with these extra variables, and
    /// waits (bounded) until it accepts connections.
    pub async fn start(env: &[(&str, &str)]) -> Shop {
        let mut command = Command::new(shop_binary());
        command
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .env("SHOP_ADDR", "127.0.0.1:0")
            .env("SHOP_FAULTS", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start the shop example");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout for the process's whole life.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut first_line = None;
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    first_line.get_or_insert_with(|| line.clone());
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        break addr.trim().to_owned();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the shop did not say it was listening within 30 s");
                }
            }
        };
        let shop = Shop {
            child,
            base,
            first_line: first_line.unwrap_or_default(),
        };
        // It said it listens; check that it answers.
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(shop.url("/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                break;
            }
            assert!(Instant::now() < deadline, "/healthz did not answer 200");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shop
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn purchase(&self, client: &Client, customer: &str, products: &[u64]) -> Response {
        client
            .post(self.url(&format!("/customers/{customer}/purchases")))
            .json(&json!({ "product_ids": products }))
            .send()
            .await
            .expect("send a purchase")
    }

    pub async fn purchase_simulating(
        &self,
        client: &Client,
        customer: &str,
        products: &[u64],
        fault: &str,
    ) -> Response {
        client
            .post(self.url(&format!("/customers/{customer}/purchases")))
            .header("x-simulate", fault)
            .json(&json!({ "product_ids": products }))
            .send()
            .await
            .expect("send a purchase")
    }

    pub async fn budget(&self, client: &Client, customer: &str) -> Value {
        let r = client
            .get(self.url(&format!("/customers/{customer}/budget")))
            .send()
            .await
            .expect("read a budget");
        assert_eq!(r.status(), StatusCode::OK, "budget of {customer}");
        r.json().await.expect("a budget body")
    }

    /// Polls the budget (bounded, 5 s) until nothing is held, and answers it.
    pub async fn settled_budget(&self, client: &Client, customer: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let b = self.budget(client, customer).await;
            if b["held_cents"] == 0 || Instant::now() > deadline {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn sign_up(&self, client: &Client, email: &str, name: &str) -> Response {
        client
            .post(self.url("/accounts"))
            .json(&json!({ "email": email, "name": name }))
            .send()
            .await
            .expect("send a sign-up")
    }

    pub async fn change_email(&self, client: &Client, account: &str, email: &str) -> Response {
        client
            .put(self.url(&format!("/accounts/{account}/email")))
            .json(&json!({ "email": email }))
            .send()
            .await
            .expect("send an e-mail change")
    }

    pub async fn account(&self, client: &Client, account: &str) -> Response {
        client
            .get(self.url(&format!("/accounts/{account}")))
            .send()
            .await
            .expect("read an account")
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with a bounded timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("a reqwest client")
}
