//! HTTP/1 as bytes over a `TcpStream`: requests that a client library would correct before
//! sending (another spelling of a path, a header twice, a head that never ends).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `host:port` of a base URL such as `http://127.0.0.1:3100`.
pub fn authority(base: &str) -> String {
    base.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// A connection to the server at `base`.
pub async fn connect(base: &str) -> TcpStream {
    let stream = TcpStream::connect(authority(base))
        .await
        .expect("connect to the server");
    stream.set_nodelay(true).expect("set nodelay");
    stream
}

/// An answer as bytes arrived: its status and the whole text (head and body).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub text: String,
}

impl Answer {
    /// The body: what follows the head.
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    /// The body as JSON (a chunked body is not expected: the servers here send lengths).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.body())
            .unwrap_or_else(|e| panic!("a JSON body ({e}): {}", self.text))
    }

    /// Whether a header line `name: value` is in the head (names without regard to case).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Sends `request` as it is on a connection of its own and reads until the server closes it
/// (send `Connection: close`) or 10 s pass; the answer is the first response in what came.
pub async fn send(base: &str, request: &[u8]) -> Answer {
    let mut stream = connect(base).await;
    stream.write_all(request).await.expect("send the request");
    read_answer(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(request)))
}

/// Reads until the peer closes or `within` passes; the first response's status and the text,
/// or `None` when nothing came.
pub async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<Answer> {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut bytes)).await;
    answer_of(&bytes)
}

/// Reads one response head (and what came with it) without waiting for the connection to
/// close; `None` when nothing came within `within`.
pub async fn read_head(stream: &mut TcpStream, within: Duration) -> Option<Answer> {
    let mut bytes = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    while !bytes.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    answer_of(&bytes)
}

fn answer_of(bytes: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()?;
    Some(Answer { status, text })
}

/// Whether the server closed `stream` (or reset it) within `within`, reading and dropping what
/// it sends until then.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A JSON `POST` as bytes, with `Connection: close` and any extra header lines.
pub fn post(path: &str, extra: &[&str], body: &str) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    request.into_bytes()
}

/// `n` connections to `base` that each send half a request head and then nothing, as a
/// slowloris client does; kept open until dropped. Connections the server does not accept yet
/// wait in its listen queue.
pub async fn half_sent_heads(base: &str, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = connect(base).await;
        // The server may already have closed a stream it timed out: that is what is tested.
        let _ = stream
            .write_all(b"POST /accounts HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await;
        streams.push(stream);
    }
    streams
}
