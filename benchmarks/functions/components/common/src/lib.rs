//! Helpers shared by the wasi:http example components: query parameters, whole responses,
//! and writes to an outgoing body that respect the stream's `check-write` budget.
//!
//! Also the runtime of these `no_std` components. The standard library's wasm32-wasip2 port
//! (wasi-libc) makes a component import wasi:cli/environment, wasi:cli/exit and the
//! wasi:cli/terminal-* interfaces (for its panic hook and stdio), which are not in the
//! wasi:http/proxy world, so a host linking only that world could not instantiate a std
//! component. Without std the components import exactly the proxy interfaces they use, and
//! are some 40% smaller. What std would have given is here: the global allocator
//! (dlmalloc, std's own for wasm), the panic handler (message to stderr, then a trap), and
//! `cabi_realloc`, which the canonical ABI calls to allocate in the guest.
#![no_std]

extern crate alloc;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, OutputStream, ResponseOutparam};
use wasi::io::streams::StreamError;

// memcpy, memmove, memset and memcmp, which the compiler calls and std would have linked: the
// target's own wasi-libc (only these pure functions get linked, so no imports come with them).
#[link(name = "c")]
unsafe extern "C" {}

#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic writes `panicked: <message>` to stderr (in the proxy world), then traps; a panic
/// while reporting one (say, no memory left to format it) traps at once.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let message = format!("panicked: {info}\n");
        let stderr = wasi::cli::stderr::get_stderr();
        for piece in message.as_bytes().chunks(FLUSH_LIMIT) {
            if stderr.blocking_write_and_flush(piece).is_err() {
                break;
            }
        }
    }
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator in the guest (what std exports on wasm32-wasip2): lifting
/// strings, lists and records into the component calls it, as wit-bindgen's runtime does.
///
/// # Safety
/// Called by the host under the canonical ABI's contract: `old` is null with `old_len` 0, or a
/// block this function returned with `old_len` bytes and `align`, a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, handle_alloc_error, realloc};
    let (layout, block) = if old_len == 0 {
        if new_len == 0 {
            return align as *mut u8;
        }
        // SAFETY: the ABI passes a power-of-two alignment, and new_len is a real size.
        let layout = unsafe { Layout::from_size_align_unchecked(new_len, align) };
        // SAFETY: the layout's size is not zero.
        (layout, unsafe { alloc(layout) })
    } else {
        // SAFETY: `old` was allocated by this function with this size and alignment.
        let layout = unsafe { Layout::from_size_align_unchecked(old_len, align) };
        // SAFETY: as above; new_len comes from the ABI, which never asks for 0 here.
        (layout, unsafe { realloc(old, layout, new_len) })
    };
    if block.is_null() {
        handle_alloc_error(layout)
    }
    block
}

/// Most bytes one `blocking-write-and-flush` may be given (WASI 0.2 `wasi:io/streams`).
pub const FLUSH_LIMIT: usize = 4096;

/// The request's query: what follows the first `?` of its path-with-query ("" when none).
pub fn query(request: &IncomingRequest) -> String {
    let path = request.path_with_query().unwrap_or_default();
    path.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or_default()
}

/// Every value of `key` in `query` (`k=v&k=w`), percent-decoded, in order.
pub fn params<'q>(query: &'q str, key: &'q str) -> impl Iterator<Item = String> + 'q {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == key).then(|| decode(v))
    })
}

/// The first value of `key` in `query`, if any.
pub fn param(query: &str, key: &str) -> Option<String> {
    params(query, key).next()
}

/// The first value of `key` parsed, `default` when absent, or the text of a 400 answer.
pub fn param_or<T: core::str::FromStr>(query: &str, key: &str, default: T) -> Result<T, String> {
    match param(query, key) {
        Some(v) => v.parse().map_err(|_| format!("query parameter {key}={v:?} is not valid\n")),
        None => Ok(default),
    }
}

/// Percent-decoding (`%41`, and `+` for a space), lossy where the result is not UTF-8.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (b'+', ..) => out.push(b' '),
            (b, ..) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response head: `status` and a `content-type` header, plus `extra` headers. An invalid
/// status or header is reported as text, for the caller to answer with instead.
pub fn response(status: u16, content_type: &str, extra: &[(String, String)]) -> Result<OutgoingResponse, String> {
    let headers = Fields::new();
    let all =
        core::iter::once(("content-type", content_type)).chain(extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    for (name, value) in all {
        headers.append(name, value.as_bytes()).map_err(|e| format!("header {name:?}: {value:?} refused: {e:?}\n"))?;
    }
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).map_err(|()| format!("status {status} refused\n"))?;
    Ok(response)
}

/// Sets `response` as the answer and writes `body` as its whole body. Write errors end the
/// body early: the client is gone or the host cut it off, and nobody is left to tell.
pub fn send(out: ResponseOutparam, response: OutgoingResponse, body: &[u8]) {
    let outgoing = response.body().expect("a new response's body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().expect("a new body's stream is taken once");
    if write_all(&stream, body).and_then(|()| stream.blocking_flush()).is_ok() {
        drop(stream);
        let _ = OutgoingBody::finish(outgoing, None);
    }
}

/// A whole response of `status`, `content_type` and `body`; a 500 naming the problem when
/// the host refuses the status or a header.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &str, extra: &[(String, String)], body: &[u8]) {
    match response(status, content_type, extra) {
        Ok(response) => send(out, response, body),
        Err(message) => text(out, 500, &message),
    }
}

/// A `text/plain` response.
pub fn text(out: ResponseOutparam, status: u16, body: &str) {
    let response = response(status, "text/plain", &[]).unwrap_or_else(|_| OutgoingResponse::new(Fields::new()));
    send(out, response, body.as_bytes())
}

/// Writes all of `bytes` without flushing: as much as `check-write` allows at a time, waiting
/// on the stream's pollable when the budget is 0.
pub fn write_all(stream: &OutputStream, mut bytes: &[u8]) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        let budget = usize::try_from(stream.check_write()?).unwrap_or(usize::MAX);
        if budget == 0 {
            stream.subscribe().block();
            continue;
        }
        let (now, rest) = bytes.split_at(budget.min(bytes.len()));
        stream.write(now)?;
        bytes = rest;
    }
    Ok(())
}

/// Writes and flushes all of `bytes` with `blocking-write-and-flush`, in pieces no larger
/// than the stream's `check-write` budget and the call's 4096-byte limit.
pub fn write_and_flush(stream: &OutputStream, mut bytes: &[u8]) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        let budget = usize::try_from(stream.check_write()?).unwrap_or(usize::MAX);
        if budget == 0 {
            stream.subscribe().block();
            continue;
        }
        let (now, rest) = bytes.split_at(budget.min(FLUSH_LIMIT).min(bytes.len()));
        stream.blocking_write_and_flush(now)?;
        bytes = rest;
    }
    Ok(())
}

/// Sleeps `ms` milliseconds on the monotonic clock (`subscribe-duration`, then `block`).
pub fn sleep_ms(ms: u64) {
    if ms > 0 {
        wasi::clocks::monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    }
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
