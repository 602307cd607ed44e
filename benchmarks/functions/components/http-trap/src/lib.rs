//! Hostile test component (wasi:http): traps. Query `when=before` (the default) panics
//! before any response is set, so the host has to answer for it; `when=after` sets a 200
//! response, writes and flushes part of the body, then executes `unreachable` mid-body, so
//! the host has to cut off a response already on its way.
#![no_std]

extern crate alloc;

use alloc::format;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Trap;

impl wasi::exports::http::incoming_handler::Guest for Trap {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        match common::param(&query, "when").as_deref() {
            None | Some("before") => panic!("http-trap: trapping before the response, as asked"),
            Some("after") => {
                let response = match common::response(200, "text/plain", &[]) {
                    Ok(r) => r,
                    Err(message) => return common::text(out, 500, &message),
                };
                let body = response.body().expect("a new response's body is taken once");
                ResponseOutparam::set(out, Ok(response));
                let stream = body.write().expect("a new body's stream is taken once");
                let _ = common::write_and_flush(&stream, b"part of the body, then a trap\n");
                let _ = stream.blocking_flush();
                core::arch::wasm32::unreachable()
            }
            Some(other) => common::text(out, 400, &format!("when={other:?}: expected before or after\n")),
        }
    }
}

wasi::http::proxy::export!(Trap);
