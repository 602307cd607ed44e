//! The HTTP front end against hostile or careless clients: slowloris heads, idle
//! connections, oversized heads, too many connections. (Oversized chunked bodies: see
//! `limits::oversize_body_is_413_without_being_buffered`.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmbox_integration::Supervisor;

/// WASMBOX_HEADER_READ_TIMEOUT_MS in these tests.
const HEADER_TIMEOUT: Duration = Duration::from_millis(1000);
/// How much later than the header timeout a connection may close: generous, because the
/// machine may be busy compiling while the tests run.
const CLOSE_MARGIN: Duration = Duration::from_millis(2000);

/// Reads one response (Content-Length framed, as the supervisor's are) off a raw connection.
async fn read_response(stream: &mut TcpStream) -> Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head.split(' ').nth(1).context("status line")?.parse()?;
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                .transpose()?
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Ok((status, String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned()));
            }
        }
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed mid-response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `GET path` on a raw keep-alive connection and reads the response.
async fn raw_get(stream: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await?;
    tokio::time::timeout(Duration::from_secs(10), read_response(stream)).await.context("no response in 10 s")?
}

/// Waits for the server to close `stream` (EOF or reset), writing one byte of `dribble`
/// every `every` meanwhile (if given). Returns how long after `since` it closed. Fails if
/// the server sends anything but a 408 or has not closed `within` after `since`.
async fn closed_by_server(
    stream: &mut TcpStream,
    dribble: Option<(&[u8], Duration)>,
    since: Instant,
    within: Duration,
) -> Result<Duration> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(dribble.map_or(Duration::from_secs(3600), |(_, every)| every));
    tick.tick().await;
    let deadline = tokio::time::Instant::from_std(since + within);
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                if let Some((bytes, _)) = dribble {
                    // Never the whole head: the byte after the last repeats forever.
                    let byte = bytes[sent.min(bytes.len() - 1)];
                    if stream.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
            }
            () = tokio::time::sleep_until(deadline) => bail!("still open after {within:?} (sent {sent} bytes)"),
        }
    }
    let took = since.elapsed();
    ensure!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "unexpected bytes before close: {:?}",
        String::from_utf8_lossy(&received)
    );
    Ok(took)
}

/// A head that never ends when dribbled: its last byte repeats (a header value growing
/// without a line end).
const SLOW_HEAD: &[u8] = b"GET /hello HTTP/1.1\r\nhost: x\r\nx-slow: a";

fn assert_closed_by_the_timeout(what: &str, took: Duration) {
    assert!(
        took >= HEADER_TIMEOUT - Duration::from_millis(100) && took <= HEADER_TIMEOUT + CLOSE_MARGIN,
        "{what}: closed after {took:?}, expected about {HEADER_TIMEOUT:?}"
    );
}

#[tokio::test]
async fn slowloris_clients_are_cut_off_while_others_are_served() -> Result<()> {
    let s = Supervisor::builder()
        .function("hello")
        .env("WASMBOX_HEADER_READ_TIMEOUT_MS", HEADER_TIMEOUT.as_millis())
        .start()?;
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK, "warm-up");

    let addr = s.addr;
    let slow: Vec<_> = (0..50u64)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await?;
                let connected = Instant::now();
                let every = Duration::from_millis(100 + (i % 5) * 25);
                closed_by_server(&mut stream, Some((SLOW_HEAD, every)), connected, HEADER_TIMEOUT + CLOSE_MARGIN).await
            })
        })
        .collect();

    // A normal client keeps calling meanwhile, and every call succeeds.
    let client = s.client();
    let mut served = 0;
    let until = Instant::now() + HEADER_TIMEOUT + CLOSE_MARGIN;
    while !slow.iter().all(|t| t.is_finished()) && Instant::now() < until {
        let r = client.get("/hello").await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5, "only {served} normal requests while the slow clients were connected");
    for (i, task) in slow.into_iter().enumerate() {
        let took = task.await??;
        assert_closed_by_the_timeout(&format!("slow client {i}"), took);
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn idle_and_kept_alive_connections_are_closed_in_bounded_time() -> Result<()> {
    let s = Supervisor::builder()
        .function("hello")
        .env("WASMBOX_HEADER_READ_TIMEOUT_MS", HEADER_TIMEOUT.as_millis())
        .start()?;
    let within = HEADER_TIMEOUT + CLOSE_MARGIN;
    let addr = s.addr;

    // Connects and never sends a byte.
    let silent = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await?;
        closed_by_server(&mut stream, None, Instant::now(), within).await
    });
    // One request, then idle on the kept-alive connection.
    let idle_after_request = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await?;
        assert_eq!(raw_get(&mut stream, "/hello").await?.0, 200);
        closed_by_server(&mut stream, None, Instant::now(), within).await
    });
    // One request, then the next head dribbled on the same connection.
    let slow_second_head = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await?;
        assert_eq!(raw_get(&mut stream, "/hello").await?.0, 200);
        closed_by_server(&mut stream, Some((SLOW_HEAD, Duration::from_millis(100))), Instant::now(), within).await
    });
    // Requests within the timeout keep a connection alive: the timer restarts per request.
    let mut busy = TcpStream::connect(addr).await?;
    for _ in 0..3 {
        assert_eq!(raw_get(&mut busy, "/hello").await?.0, 200);
        tokio::time::sleep(HEADER_TIMEOUT / 2).await;
    }

    assert_closed_by_the_timeout("silent connection", silent.await??);
    assert_closed_by_the_timeout("idle kept-alive connection", idle_after_request.await??);
    assert_closed_by_the_timeout("slow second head", slow_second_head.await??);
    Ok(())
}

#[tokio::test]
async fn oversized_heads_are_431_and_the_next_request_is_served() -> Result<()> {
    // Out-of-range settings are refused at startup, with the setting named.
    let err = Supervisor::builder().env("WASMBOX_MAX_HEADER_BYTES", 100).start().err().context("started")?;
    assert!(format!("{err:#}").contains("WASMBOX_MAX_HEADER_BYTES=100"), "{err:#}");

    let s = Supervisor::builder().function("hello").start()?; // default limit: 16 KiB
    let big = "a".repeat(15 << 10);
    let r = s.request(http::Method::GET, "/hello", &[("x-big", &big)], bytes::Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::OK, "a 15 KiB head is within the default limit");

    let too_big = format!("GET /hello HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(17 << 10));
    let many = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..120).map(|i| format!("x-{i}: v\r\n")).collect::<String>()
    );
    for (what, head) in [("17 KiB head", too_big), ("121 headers", many)] {
        let mut stream = TcpStream::connect(s.addr).await?;
        stream.write_all(head.as_bytes()).await?;
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream)).await??;
        assert_eq!(status, 431, "{what}");
        // ... and the connection is closed, not left for another request.
        closed_by_server(&mut stream, None, Instant::now(), Duration::from_secs(5)).await.context(what)?;
        assert_eq!(s.get("/hello").await?.status, StatusCode::OK, "after the {what}");
    }
    assert_eq!(s.get("/healthz").await?.status, StatusCode::OK);
    Ok(())
}

/// The `http` part of `/stats`, asked on a fresh connection.
async fn http_stats(addr: SocketAddr) -> Result<serde_json::Value> {
    let mut stream = TcpStream::connect(addr).await?;
    let (status, body) = raw_get(&mut stream, "/stats").await?;
    ensure!(status == 200, "{status}: {body}");
    Ok(serde_json::from_str::<serde_json::Value>(&body)?["http"].clone())
}

#[tokio::test]
async fn at_the_connection_limit_new_connections_wait_until_one_closes() -> Result<()> {
    const LIMIT: usize = 4;
    let s = Supervisor::builder()
        .function("hello")
        .env("WASMBOX_MAX_CONNECTIONS", LIMIT)
        // Far beyond the test, so only the test closes the held connections.
        .env("WASMBOX_HEADER_READ_TIMEOUT_MS", 60_000)
        .start()?;

    // LIMIT valid keep-alive connections, each served once and then held open.
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let mut stream = TcpStream::connect(s.addr).await?;
        assert_eq!(raw_get(&mut stream, "/healthz").await?.0, 200);
        held.push(stream);
    }
    let (status, body) = raw_get(&mut held[0], "/stats").await?;
    assert_eq!(status, 200);
    let http = serde_json::from_str::<serde_json::Value>(&body)?["http"].clone();
    assert_eq!(http["open_connections"], LIMIT, "{http}");
    assert_eq!(http["max_connections"], LIMIT, "{http}");

    // One more: the kernel completes the TCP handshake (listen backlog), but the server
    // does not accept it, so its request gets no answer while the others are held.
    let mut waiting = TcpStream::connect(s.addr).await?;
    waiting.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), waiting.read(&mut byte)).await;
    assert!(early.is_err(), "the connection over the limit was answered: {early:?}");
    // The held connections are still served meanwhile.
    assert_eq!(raw_get(&mut held[1], "/hello").await?.0, 200);

    // Closing them lets the waiting connection in: its request is answered without the
    // client doing anything.
    let released = Instant::now();
    drop(held);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut waiting))
        .await
        .context("the waiting connection was not served after the others closed")??;
    assert_eq!(status, 200, "{body}");
    assert!(released.elapsed() < Duration::from_secs(5));
    drop(waiting);

    // New connections are served, and the count goes back down.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let http = http_stats(s.addr).await?;
        assert!(http["limit_reached"].as_u64().unwrap_or(0) >= 1, "{http}");
        if http["open_connections"] == 1 {
            break; // the /stats connection itself
        }
        ensure!(Instant::now() < deadline, "connections not released: {http}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    assert!(s.logs().contains("connection limit reached"), "{}", s.logs());
    Ok(())
}
