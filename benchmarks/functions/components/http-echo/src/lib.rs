//! Example wasi:http component: describes the request back as JSON, `{"method", "path_with_query",
//! "scheme", "authority", "headers": [[name, value], ...] (as received, values lossy UTF-8),
//! "body_len", "body_sha256"}`. The body is read to its end in 64 KiB blocking reads and hashed
//! as it streams, never held whole. Query `status=NNN` sets the status (default 200) and each
//! `header=name:value` adds a response header, so tests can ask for the answer they check.
#![no_std]

extern crate alloc;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use sha2::{Digest, Sha256};
use wasi::http::types::{IncomingBody, IncomingRequest, Method, ResponseOutparam, Scheme};
use wasi::io::streams::StreamError;

const READ_SIZE: u64 = 64 * 1024;

struct Echo;

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        let status = match common::param_or(&query, "status", 200u16) {
            Ok(status) => status,
            Err(message) => return common::text(out, 400, &message),
        };
        let mut extra = Vec::new();
        for header in common::params(&query, "header") {
            match header.split_once(':') {
                Some((name, value)) => extra.push((name.trim().to_owned(), value.trim().to_owned())),
                None => return common::text(out, 400, &format!("header={header:?} is not name:value\n")),
            }
        }
        let (body_len, body_sha256) = match read_body(&request) {
            Ok(read) => read,
            Err(message) => return common::text(out, 400, &message),
        };
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Connect => "CONNECT".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Trace => "TRACE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Other(other) => other,
        };
        let scheme = request.scheme().map(|scheme| match scheme {
            Scheme::Http => "http".to_owned(),
            Scheme::Https => "https".to_owned(),
            Scheme::Other(other) => other,
        });
        let json_or_null = |s: Option<String>| s.map_or_else(|| "null".to_owned(), |s| common::json_string(&s));
        let headers: Vec<String> = request
            .headers()
            .entries()
            .iter()
            .map(|(name, value)| {
                format!("[{},{}]", common::json_string(name), common::json_string(&String::from_utf8_lossy(value)))
            })
            .collect();
        let json = format!(
            "{{\"method\":{},\"path_with_query\":{},\"scheme\":{},\"authority\":{},\"headers\":[{}],\"body_len\":{},\"body_sha256\":\"{}\"}}\n",
            common::json_string(&method),
            json_or_null(request.path_with_query()),
            json_or_null(scheme),
            json_or_null(request.authority()),
            headers.join(","),
            body_len,
            body_sha256,
        );
        common::respond(out, status, "application/json", &extra, json.as_bytes());
    }
}

/// The body's length and SHA-256 (hex), read to its end a block at a time.
fn read_body(request: &IncomingRequest) -> Result<(u64, String), String> {
    let body = request.consume().map_err(|()| "the request body was already taken\n".to_owned())?;
    let stream = body.stream().map_err(|()| "the request body stream was already taken\n".to_owned())?;
    let mut hash = Sha256::new();
    let mut len = 0u64;
    loop {
        match stream.blocking_read(READ_SIZE) {
            Ok(block) => {
                len += block.len() as u64;
                hash.update(&block);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!("reading the request body failed after {len} bytes: {}\n", e.to_debug_string()));
            }
        }
    }
    drop(stream);
    drop(IncomingBody::finish(body));
    let hex = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((len, hex))
}

wasi::http::proxy::export!(Echo);
