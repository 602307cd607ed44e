//! Hostile test component (wasi:http): burns CPU before answering. With query `ms=N` it
//! spins until N ms of the monotonic clock have passed, then answers 200 `done`; without it,
//! it spins forever, so only the host's deadline (epoch interruption or fuel) can stop it.
#![no_std]

extern crate alloc;

use alloc::format;
use core::hint::black_box;
use wasi::clocks::monotonic_clock;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Busy;

/// A slice of pure guest computation between clock reads.
fn spin(acc: &mut u64) {
    for i in 0..10_000u64 {
        *acc = black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
}

impl wasi::exports::http::incoming_handler::Guest for Busy {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let query = common::query(&request);
        let mut acc = 1u64;
        match common::param(&query, "ms") {
            None => loop {
                spin(&mut acc);
            },
            Some(ms) => {
                let Ok(ms) = ms.parse::<u64>() else {
                    return common::text(out, 400, &format!("ms={ms:?} is not a number\n"));
                };
                let until = monotonic_clock::now().saturating_add(ms.saturating_mul(1_000_000));
                while monotonic_clock::now() < until {
                    spin(&mut acc);
                }
                black_box(acc);
                common::text(out, 200, "done\n");
            }
        }
    }
}

wasi::http::proxy::export!(Busy);
