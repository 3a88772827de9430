//! A trivial upstream for the gateway's benchmark: answers every request `200` with a small JSON
//! body once it has read the request's body. Written with hyper alone, as a service in front of
//! which the gateway (`examples/gateway/`) would run.
//!
//! ```text
//! UPSTREAM_ADDR=127.0.0.1:8000 cargo run --release -p tower-reserve-benches --bin upstream
//! ```
//!
//! `UPSTREAM_ADDR` defaults to `127.0.0.1:8000`; once it accepts connections it prints
//! `listening on http://<addr>`. SIGTERM or Ctrl-C stops it.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as a real service would, whatever it holds.
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[tokio::main]
async fn main() {
    let addr = std::env::var("UPSTREAM_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".to_owned());
    let listener = match TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("upstream: cannot listen on {addr}: {err}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().expect("the listening address");
    println!("listening on http://{local}");
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    };
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::select! {
        () = accept => {}
        () = stop => {}
    }
}
