//! Memory-limit test component (wasi:http): query `mb=N` (default 16) allocates N MiB and
//! fills every byte, then answers 200 `allocated N MiB`. When the allocation is refused
//! (`memory.grow` fails under the host's limit) it answers 500 instead of trapping, unless
//! the host itself traps on the refused grow.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use core::hint::black_box;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Alloc;

impl wasi::exports::http::incoming_handler::Guest for Alloc {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        let mb = match common::param_or(&query, "mb", 16usize) {
            Ok(mb) => mb,
            Err(message) => return common::text(out, 400, &message),
        };
        let Some(bytes) = mb.checked_mul(1 << 20) else {
            return common::text(out, 400, &format!("{mb} MiB does not fit in the address space\n"));
        };
        let mut block: Vec<u8> = Vec::new();
        if block.try_reserve_exact(bytes).is_err() {
            return common::text(out, 500, &format!("allocating {mb} MiB failed\n"));
        }
        block.resize(bytes, 0xa5);
        black_box(&mut block);
        common::text(out, 200, &format!("allocated {mb} MiB\n"));
    }
}

wasi::http::proxy::export!(Alloc);
