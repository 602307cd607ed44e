//! Hostile test component (wasi:http): sets a 200 response and writes an endless body, 64 KiB
//! of `x` at a time, as fast as the stream's `check-write` budget allows. It never finishes
//! the body; it stops only when a write fails (the client went away or the host cut it off),
//! so response-size limits, deadlines and slow readers are the host's to enforce.
#![no_std]

extern crate alloc;

use alloc::vec;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

const CHUNK: usize = 64 * 1024;

struct Flood;

impl wasi::exports::http::incoming_handler::Guest for Flood {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let response = match common::response(200, "application/octet-stream", &[]) {
            Ok(r) => r,
            Err(message) => return common::text(out, 500, &message),
        };
        let body = response.body().expect("a new response's body is taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("a new body's stream is taken once");
        let chunk = vec![b'x'; CHUNK];
        while common::write_all(&stream, &chunk).and_then(|()| stream.flush()).is_ok() {}
    }
}

wasi::http::proxy::export!(Flood);
