//! Measures what the cgroup layer adds to one invocation on this host: rewriting the limits
//! (`SlotCgroup::prepare`) and reading the accounting (`SlotCgroup::finish`), with unchanged
//! and with changing limits. Needs root and a writable cgroup hierarchy.
//!
//! ```sh
//! cargo run --release -p wasmbox-supervisor --example cgroup-cost [iterations]
//! ```

use std::sync::Arc;
use std::time::Instant;

use wasmbox_supervisor::cgroup::fs::KernelFs;
use wasmbox_supervisor::cgroup::{CgroupMode, CgroupSettings, Cgroups, SlotRequest};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: u32 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(20_000);
    let settings = CgroupSettings {
        mode: CgroupMode::Required,
        parent: format!("wasmbox-cost-{}", std::process::id()),
        pids_max: 64,
        memory_headroom_bytes: 64 << 20,
        compilers: 0,
    };
    let Some(mut cgroups) = Cgroups::setup(Arc::new(KernelFs), &settings, 1)? else {
        return Err("cgroups unavailable".into());
    };
    let slot = cgroups.slot(0).ok_or("no slot")?.clone();
    let request = SlotRequest { cpu_quota_millis: 1000, memory_request_bytes: 128 << 20, io_bytes: 32 << 20 };
    let measure = |name: &str, vary: bool| -> Result<(), Box<dyn std::error::Error>> {
        let started = Instant::now();
        for i in 0..iterations {
            let r = if vary {
                SlotRequest {
                    cpu_quota_millis: 500 + u64::from(i % 2) * 500,
                    memory_request_bytes: (64 + u64::from(i % 2) * 64) << 20,
                    ..request
                }
            } else {
                request
            };
            let checkpoint = slot.prepare(&r, 0)?;
            std::hint::black_box(slot.finish(&checkpoint));
        }
        let per = started.elapsed() / iterations;
        println!("{name:<28} {:>8.1} us per invocation ({iterations} iterations)", per.as_secs_f64() * 1e6);
        Ok(())
    };
    measure("limits unchanged", false)?;
    measure("cpu and memory rewritten", true)?;
    cgroups.teardown();
    Ok(())
}
