//! Keeps one CPU busy for argv[1] milliseconds of wall time (default 100).
use std::time::{Duration, Instant};

fn main() {
    let ms: u64 = wasmbox_functions::arg_or(1, 100);
    let until = Instant::now() + Duration::from_millis(ms);
    let mut rng = wasmbox_functions::Rng::new(7);
    let mut acc = 0u64;
    let mut rounds = 0u64;
    while Instant::now() < until {
        for _ in 0..10_000 {
            acc = acc.wrapping_add(rng.next_u64());
        }
        rounds += 1;
    }
    println!("spun {ms} ms, {rounds} rounds, checksum {acc:016x}");
}
