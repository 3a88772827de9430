//! The compiled `shop` example as a child process, for the end-to-end and fault tests.

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

use super::example::Example;

/// One running shop; killed when dropped.
pub struct Shop {
    app: Example,
    pub base: String,
    /// The first line it printed: it names the store.
    pub first_line: String,
}

impl Shop {
    /// Starts the shop with `SHOP_FAULTS=1` on a free port, with these extra variables, and
    /// waits (bounded) until it accepts connections.
    pub async fn start(env: &[(&str, &str)]) -> Shop {
        let mut command = Example::command("shop", "SHOP_ADDR", &[("SHOP_FAULTS", "1")]);
        // Its standard error goes through the test's own output, which the harness shows only
        // for a test that fails: the panics that `X-Simulate: panic` causes on purpose do not
        // read as failures in a passing run.
        command.envs(env.iter().copied()).stderr(Stdio::piped());
        let app = Example::spawn("the shop", command, Duration::from_secs(30));
        // It said it listens; check that it answers.
        app.wait_healthy().await;
        Shop {
            base: app.base.clone(),
            first_line: app.before.first().cloned().unwrap_or_default(),
            app,
        }
    }

    /// Kills it now, and waits for it to end.
    pub fn kill(&mut self) {
        self.app.kill();
    }

    pub fn url(&self, path: &str) -> String {
        self.app.url(path)
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

/// An HTTP client with a bounded timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("a reqwest client")
}
