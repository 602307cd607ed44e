//! Helpers shared by the example functions.

use std::io::Read;

/// argv[n] parsed as a number, or `default` when absent.
pub fn arg_or<T: std::str::FromStr>(n: usize, default: T) -> T {
    match std::env::args().nth(n) {
        Some(s) => s.parse().unwrap_or_else(|_| fail(&format!("argument {n} ({s:?}) is not a number"))),
        None => default,
    }
}

/// All of stdin.
pub fn stdin_bytes() -> Vec<u8> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).unwrap_or_else(|e| fail(&format!("reading stdin: {e}")));
    buf
}

/// Prints to stderr and exits with status 2.
pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// Deterministic pseudo-random numbers (xorshift64*), so workloads are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
