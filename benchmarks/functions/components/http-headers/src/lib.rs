//! Hostile test component (wasi:http): a response with very many headers. Query `n=N`
//! (default 10000) headers `x-h-<i>` with a 64-byte value each, then body `sent N headers`.
//! If the host refuses a header while the fields are built (a size or count limit), it
//! answers 500 with the error instead, so header limits can be tested on both sides.
#![no_std]

extern crate alloc;

use alloc::format;
use wasi::http::types::{Fields, IncomingRequest, OutgoingResponse, ResponseOutparam};

struct Headers;

impl wasi::exports::http::incoming_handler::Guest for Headers {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        let n = match common::param_or(&query, "n", 10_000u32) {
            Ok(n) => n,
            Err(message) => return common::text(out, 400, &message),
        };
        let fields = Fields::new();
        for i in 0..n {
            let name = format!("x-h-{i}");
            let value = format!("{i:0>64}");
            if let Err(e) = fields.append(&name, value.as_bytes()) {
                return common::text(out, 500, &format!("constructing header {i} of {n} ({name}) failed: {e:?}\n"));
            }
        }
        let response = OutgoingResponse::new(fields);
        let _ = response.set_status_code(200);
        common::send(out, response, format!("sent {n} headers\n").as_bytes());
    }
}

wasi::http::proxy::export!(Headers);
