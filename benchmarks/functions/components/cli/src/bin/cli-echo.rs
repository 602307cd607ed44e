//! wasi:cli/command component: copies stdin to stdout, streaming. Argument `stderr` (anywhere)
//! also writes `stderr line` to stderr; a first argument `exit=N`, or else the environment
//! variable `EXIT_CODE`, makes it exit with status N once everything is written. WASI 0.2's
//! `wasi:cli/exit.exit` carries only success or failure, so a host without the unstable
//! `exit-with-code` sees any N other than 0 as failure (status 1). For the limit tests:
//! `alloc=M` first allocates and touches M MiB, `spin` then loops forever.
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(mb) = args.iter().find_map(|a| a.strip_prefix("alloc=")).and_then(|m| m.parse::<usize>().ok()) {
        let block = vec![1u8; mb << 20];
        println!("allocated {} MiB", std::hint::black_box(&block).len() >> 20);
    }
    if args.iter().any(|a| a == "spin") {
        let mut n = 0u64;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    let code = match args.first().and_then(|a| a.strip_prefix("exit=")) {
        Some(n) => Some(n.to_owned()),
        None => std::env::var("EXIT_CODE").ok(),
    };
    let code: Option<i32> = code.map(|n| {
        n.trim().parse().unwrap_or_else(|_| {
            eprintln!("error: exit code {n:?} is not a number");
            std::process::exit(2)
        })
    });
    if let Err(e) = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::stdout().lock()) {
        eprintln!("error: copying stdin to stdout: {e}");
        std::process::exit(2);
    }
    if args.iter().any(|a| a == "stderr") {
        let _ = std::io::stderr().write_all(b"stderr line\n");
    }
    let _ = std::io::stdout().flush();
    if let Some(code) = code {
        std::process::exit(code);
    }
}
