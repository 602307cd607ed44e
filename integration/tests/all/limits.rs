//! Request limits checked before any engine runs: header validation and body size (memory,
//! deadline and output limits are engine behaviours, in `conformance.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmbox_integration::Supervisor;

#[tokio::test]
async fn limit_headers_are_validated_and_named() -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .function("hello")
        .env("WASMBOX_MAX_CPU_QUOTA", 2000)
        .env("WASMBOX_MAX_MEMORY_MB", 256)
        .env("WASMBOX_MAX_TIMEOUT_MS", 5000)
        .env("WASMBOX_DEFAULT_TIMEOUT_MS", 1000)
        .start()?;
    let cases = [
        ("cpu_quota", "abc"),
        ("cpu_quota", "0"),
        ("cpu_quota", "2001"),
        ("cpu_quota", "-1"),
        ("Memory-Request", "0"),
        ("Memory-Request", "257"),
        ("Memory-Request", "1.5"),
        ("Timeout-Ms", "soon"),
        ("Timeout-Ms", "5001"),
    ];
    for (header, value) in cases {
        let r = s.request(Method::GET, "/hello", &[(header, value)], Bytes::new()).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_header"), "{header}: {value}");
        assert_eq!(r.json()["header"], header, "the error names the header");
    }
    let ok = s
        .request(
            Method::GET,
            "/hello",
            &[("cpu_quota", "500"), ("Memory-Request", "64"), ("Timeout-Ms", "1000")],
            Bytes::new(),
        )
        .await?;
    assert_eq!(ok.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn oversize_body_is_413_without_being_buffered() -> anyhow::Result<()> {
    let limit = 1 << 20;
    let s = Supervisor::builder().function("echo").env("WASMBOX_MAX_BODY_BYTES", limit).start()?;
    // Exactly at the limit is fine.
    let r = s.post("/echo", vec![b'x'; limit]).await?;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, limit));

    // Declared too large: refused from the Content-Length alone.
    let r = s.post("/echo", vec![b'x'; limit + 1]).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));

    // Chunked and endless: the answer comes while the client is still sending, long before
    // the 1 GiB it would send, so the supervisor cannot have buffered it.
    let stream = tokio::net::TcpStream::connect(s.addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'y'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 1 << 30 {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
            sent += chunk.len();
        }
        anyhow::Ok(sent)
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&response).contains("body_too_large") {
        assert!(Instant::now() < deadline, "no 413 in time");
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    drop(rd);
    // The server closed the connection; the writer fails instead of sending its gigabyte.
    let sent = tokio::time::timeout(Duration::from_secs(20), writer).await??;
    assert!(sent.is_err(), "the whole endless body was accepted");
    assert_eq!(s.post("/echo", "still fine").await?.status, StatusCode::OK);
    Ok(())
}
