//! Example and test wasi:http component: a 200 response whose body is the request body,
//! each piece written back (and flushed) as soon as it is read, so a client sees its first
//! bytes come back before it has sent the rest. For request-body streaming tests: a body
//! only reaches it piece by piece if the host streams it. A request body that fails part
//! way ends the response without its end (the host cuts it).
#![no_std]

extern crate alloc;

use wasi::http::types::{IncomingBody, IncomingRequest, OutgoingBody, ResponseOutparam};
use wasi::io::streams::StreamError;

/// Most bytes asked for in one read.
const READ_SIZE: u64 = 64 << 10;

struct Pipe;

impl wasi::exports::http::incoming_handler::Guest for Pipe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let Ok(incoming) = request.consume() else {
            return common::text(out, 500, "the request body was already taken\n");
        };
        let Ok(input) = incoming.stream() else {
            return common::text(out, 500, "the request body stream was already taken\n");
        };
        let response = match common::response(200, "application/octet-stream", &[]) {
            Ok(r) => r,
            Err(message) => return common::text(out, 500, &message),
        };
        let body = response.body().expect("a new response's body is taken once");
        ResponseOutparam::set(out, Ok(response));
        let output = body.write().expect("a new body's stream is taken once");
        loop {
            match input.blocking_read(READ_SIZE) {
                Ok(piece) => {
                    if common::write_and_flush(&output, &piece).is_err() {
                        return; // The client is gone or the host cut the body off.
                    }
                }
                Err(StreamError::Closed) => break,
                // The request body was cut: so is the response (no finish).
                Err(StreamError::LastOperationFailed(_)) => return,
            }
        }
        drop(input);
        drop(IncomingBody::finish(incoming));
        drop(output);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Pipe);
