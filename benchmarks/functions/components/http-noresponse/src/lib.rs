//! Hostile test component (wasi:http): returns from the handler without ever calling
//! `response-outparam.set` (the outparam is just dropped), so the host has to notice that no
//! response came and answer for the guest.
#![no_std]

// The allocator, panic handler and cabi_realloc every component needs.
extern crate common;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct NoResponse;

impl wasi::exports::http::incoming_handler::Guest for NoResponse {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        drop(out);
    }
}

wasi::http::proxy::export!(NoResponse);
