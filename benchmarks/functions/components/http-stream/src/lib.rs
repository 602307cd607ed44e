//! Example and benchmark wasi:http component: a 200 response whose body streams in chunks.
//! Query `chunks=N` (default 10) chunks of `size=S` bytes of `x` (default 1024), each written
//! and flushed on its own (`blocking-write-and-flush`, in pieces within the stream's
//! `check-write` budget and the 4096-byte limit of one call), with `delay_ms=D` (default 0)
//! between chunks, slept on the monotonic clock (`subscribe-duration` and `block`). For
//! streaming, time-to-first-byte and slow-response tests.
#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use wasi::http::types::{IncomingRequest, OutgoingBody, ResponseOutparam};

struct Stream;

impl wasi::exports::http::incoming_handler::Guest for Stream {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        let parsed = (|| {
            Ok::<_, String>((
                common::param_or(&query, "chunks", 10u64)?,
                common::param_or(&query, "size", 1024usize)?,
                common::param_or(&query, "delay_ms", 0u64)?,
            ))
        })();
        let (chunks, size, delay_ms) = match parsed {
            Ok(p) => p,
            Err(message) => return common::text(out, 400, &message),
        };
        let response = match common::response(200, "application/octet-stream", &[]) {
            Ok(r) => r,
            Err(message) => return common::text(out, 500, &message),
        };
        let body = response.body().expect("a new response's body is taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("a new body's stream is taken once");
        let chunk = vec![b'x'; size];
        for i in 0..chunks {
            if i > 0 {
                common::sleep_ms(delay_ms);
            }
            if common::write_and_flush(&stream, &chunk).is_err() {
                return; // The client is gone or the host cut the body off.
            }
        }
        drop(stream);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Stream);
