//! Test component (wasi:http): tries an outgoing request, `GET http://example.com/` through
//! `wasi:http/outgoing-handler`, and answers 200 `outgoing: ok <status>` or `outgoing: error
//! <ErrorCode>`. Whether a tenant may reach the network is the host's policy; this shows what
//! the policy did, and never traps on a refusal.
#![no_std]

extern crate alloc;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, IncomingRequest, Method, OutgoingRequest, ResponseOutparam, Scheme};

struct Outgoing;

/// The outcome of the request, as the line to answer with.
fn attempt() -> String {
    let request = OutgoingRequest::new(Fields::new());
    let set = [
        request.set_method(&Method::Get).map_err(|()| "method"),
        request.set_scheme(Some(&Scheme::Http)).map_err(|()| "scheme"),
        request.set_authority(Some("example.com")).map_err(|()| "authority"),
        request.set_path_with_query(Some("/")).map_err(|()| "path"),
    ];
    if let Some(Err(what)) = set.into_iter().find(Result::is_err) {
        return format!("outgoing: error the request's {what} was refused");
    }
    let future = match outgoing_handler::handle(request, None) {
        Ok(future) => future,
        Err(code) => return format!("outgoing: error {code:?}"),
    };
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => format!("outgoing: ok {}", response.status()),
        Some(Ok(Err(code))) => format!("outgoing: error {code:?}"),
        Some(Err(())) => "outgoing: error the response was already taken".to_owned(),
        None => "outgoing: error no response after the future was ready".to_owned(),
    }
}

impl wasi::exports::http::incoming_handler::Guest for Outgoing {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        common::text(out, 200, &attempt());
    }
}

wasi::http::proxy::export!(Outgoing);
