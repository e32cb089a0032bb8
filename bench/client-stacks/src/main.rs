//! One enqueue a request, one after another, through each HTTP client stack
//! a Rust program could use, against one running server: the same request
//! (`offload bench`'s task), the same server, in alternating rounds.
//!
//!     client-stacks URL [REQUESTS] [ROUNDS]
//!
//! The server's work is the same for every stack; what differs is the
//! client's, and how long it leaves the server's threads idle between
//! requests (on a machine whose idle CPUs halt, an idle thread's wake-up
//! is part of every request's time).

use std::io::{Read, Write};
use std::time::Instant;

use http_body_util::{BodyExt, Full};

const TASK: &str =
    r#"{"type":"bench.noop","payload":{"user_id":42,"template":"welcome","locale":"en"}}"#;

type Outcome = Result<(), Box<dyn std::error::Error>>;

fn main() -> Outcome {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: client-stacks URL [REQUESTS] [ROUNDS]")?;
    let requests: usize = args.next().map_or(Ok(2000), |n| n.parse())?;
    let rounds: usize = args.next().map_or(Ok(4), |n| n.parse())?;
    let authority = url
        .strip_prefix("http://")
        .ok_or("a plain http:// URL")?
        .trim_end_matches('/')
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stacks = [
        "std socket",
        "tokio socket",
        "hyper connection",
        "hyper-util pool",
        "reqwest",
        "offload-client",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); stacks.len()];
    for round in 0..rounds {
        // Each round starts with another stack, so that drift through a
        // round falls on each alike.
        for k in 0..stacks.len() {
            let at = (round + k) % stacks.len();
            let started = Instant::now();
            match at {
                0 => std_socket(&authority, requests)?,
                1 => runtime.block_on(tokio_socket(&authority, requests))?,
                2 => runtime.block_on(hyper_connection(&authority, requests))?,
                3 => runtime.block_on(hyper_util_pool(&url, requests))?,
                4 => runtime.block_on(bare_reqwest(&url, requests))?,
                _ => runtime.block_on(offload_client(&url, requests))?,
            }
            rates[at].push(requests as f64 / started.elapsed().as_secs_f64());
        }
    }
    println!("{requests} enqueues a round, {rounds} rounds; enqueues a second");
    for (name, mut rate) in stacks.iter().zip(rates) {
        let each: Vec<String> = rate.iter().map(|r| format!("{r:.0}")).collect();
        rate.sort_by(f64::total_cmp);
        let median = rate[rate.len() / 2];
        println!(
            "  {name:<17} median {median:>6.0} ({:>5.0} µs a request): {}",
            1e6 / median,
            each.join(", ")
        );
    }
    Ok(())
}

fn request_bytes(authority: &str) -> Vec<u8> {
    format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{TASK}",
        TASK.len()
    )
    .into_bytes()
}

/// Whether `buf` holds a whole answer (its head and `content-length` bytes
/// of body); a 201 is checked for.
fn whole_answer(buf: &[u8]) -> Result<bool, Box<dyn std::error::Error>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(false);
    };
    let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
    if !head.starts_with("http/1.1 201") {
        return Err(format!("not created: {head}").into());
    }
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .ok_or("an answer without content-length")?
        .trim()
        .parse()?;
    Ok(buf.len() >= end + 4 + length)
}

fn std_socket(authority: &str, requests: usize) -> Outcome {
    let mut socket = std::net::TcpStream::connect(authority)?;
    socket.set_nodelay(true)?;
    let request = request_bytes(authority);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..requests {
        socket.write_all(&request)?;
        let mut got = 0;
        while !whole_answer(&buf[..got])? {
            let n = socket.read(&mut buf[got..])?;
            if n == 0 {
                return Err("closed".into());
            }
            got += n;
        }
    }
    Ok(())
}

async fn tokio_socket(authority: &str, requests: usize) -> Outcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(authority).await?;
    socket.set_nodelay(true)?;
    let request = request_bytes(authority);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..requests {
        socket.write_all(&request).await?;
        let mut got = 0;
        while !whole_answer(&buf[..got])? {
            let n = socket.read(&mut buf[got..]).await?;
            if n == 0 {
                return Err("closed".into());
            }
            got += n;
        }
    }
    Ok(())
}

fn hyper_request(uri: &str, authority: &str) -> hyper::Request<Full<bytes::Bytes>> {
    hyper::Request::post(uri)
        .header("host", authority)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(TASK.as_bytes())))
        .expect("a request")
}

async fn hyper_connection(authority: &str, requests: usize) -> Outcome {
    let socket = tokio::net::TcpStream::connect(authority).await?;
    socket.set_nodelay(true)?;
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(socket)).await?;
    let driving = tokio::spawn(connection);
    for _ in 0..requests {
        send.ready().await?;
        let answer = send
            .send_request(hyper_request("/v1/tasks", authority))
            .await?;
        if answer.status() != 201 {
            return Err(format!("not created: {}", answer.status()).into());
        }
        answer.into_body().collect().await?;
    }
    drop(send);
    driving.await??;
    Ok(())
}

async fn hyper_util_pool(url: &str, requests: usize) -> Outcome {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<bytes::Bytes>>(connector);
    let uri = format!("{}/v1/tasks", url.trim_end_matches('/'));
    for _ in 0..requests {
        let answer = client.request(hyper_request(&uri, "")).await?;
        if answer.status() != 201 {
            return Err(format!("not created: {}", answer.status()).into());
        }
        answer.into_body().collect().await?;
    }
    Ok(())
}

async fn bare_reqwest(url: &str, requests: usize) -> Outcome {
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let uri = reqwest::Url::parse(&format!("{}/v1/tasks", url.trim_end_matches('/')))?;
    for _ in 0..requests {
        let answer = client
            .post(uri.clone())
            .header("content-type", "application/json")
            .body(TASK)
            .send()
            .await?;
        if answer.status() != 201 {
            return Err(format!("not created: {}", answer.status()).into());
        }
        answer.bytes().await?;
    }
    Ok(())
}

async fn offload_client(url: &str, requests: usize) -> Outcome {
    let client = offload_client::Client::new(url);
    let task: serde_json::Value = serde_json::from_str(TASK)?;
    let task = offload_core::NewTask::new("bench.noop").payload(&task["payload"])?;
    for _ in 0..requests {
        client.enqueue(&task).await?;
    }
    Ok(())
}
