//! Smallest useful wasi:http component: answers every request with 200, `text/plain` and
//! `hello from a component`. The component counterpart of `hello`: pure invocation overhead.
#![no_std]
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        common::respond(out, 200, "text/plain", &[], b"hello from a component\n");
    }
}

wasi::http::proxy::export!(Hello);
