//! Sends one HTTP request for each index `1..=count`, `concurrency` at a time, and counts the
//! answers by status class: what `scripts/bench` uses to give each of 100,000 customers one
//! purchase (the budgets' own state), or to make the first request of each idempotency key.
//! `{i}` in the URL, a header or the body becomes the index.
//!
//! ```text
//! send_each --count 100000 --concurrency 64 --method POST \
//!   --url 'http://127.0.0.1:3000/customers/c{i}/purchases' \
//!   --header 'content-type: application/json' --body '{"product_ids":[1]}'
//! ```
//!
//! Prints `sent <n> 2xx <n> other <n> failed <n> secs <s>`; exits with status 1 when any request
//! did not answer `2xx`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Args {
    count: u64,
    concurrency: usize,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn usage(message: &str) -> ! {
    eprintln!("send_each: {message}");
    eprintln!(
        "usage: send_each --count N --concurrency C --url URL [--method M] [--header 'name: value']... [--body TEXT]"
    );
    std::process::exit(2);
}

fn args() -> Args {
    let mut args = Args {
        count: 0,
        concurrency: 32,
        method: Method::GET,
        url: String::new(),
        headers: Vec::new(),
        body: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--count" => args.count = value.parse().unwrap_or_else(|_| usage("--count")),
            "--concurrency" => {
                args.concurrency = value.parse().unwrap_or_else(|_| usage("--concurrency"))
            }
            "--method" => args.method = value.parse().unwrap_or_else(|_| usage("--method")),
            "--url" => args.url = value,
            "--header" => {
                let (name, value) = value
                    .split_once(':')
                    .unwrap_or_else(|| usage("--header 'name: value'"));
                args.headers
                    .push((name.trim().to_owned(), value.trim().to_owned()));
            }
            "--body" => args.body = value,
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if args.url.is_empty() || args.count == 0 || args.concurrency == 0 {
        usage("--url, --count and --concurrency are required");
    }
    args
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build_http();
    let next = Arc::new(AtomicU64::new(1));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (args, client, next, counts) =
            (args.clone(), client.clone(), next.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i > args.count {
                    break;
                }
                let index = i.to_string();
                let fill = |s: &str| s.replace("{i}", &index);
                let mut request = Request::builder()
                    .method(args.method.clone())
                    .uri(fill(&args.url));
                for (name, value) in &args.headers {
                    request = request.header(name.as_str(), fill(value));
                }
                let request = request
                    .body(Full::new(Bytes::from(fill(&args.body))))
                    .unwrap_or_else(|e| usage(&format!("a bad request: {e}")));
                let answer = tokio::time::timeout(Duration::from_secs(10), async {
                    let response = client.request(request).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
                })
                .await;
                let counter = match answer {
                    Ok(Ok(status)) if status.is_success() => &counts.ok,
                    Ok(Ok(_)) => &counts.other,
                    _ => &counts.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let (ok, other, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    println!(
        "sent {} 2xx {ok} other {other} failed {failed} secs {:.2}",
        ok + other + failed,
        started.elapsed().as_secs_f64()
    );
    if other + failed > 0 {
        std::process::exit(1);
    }
}
