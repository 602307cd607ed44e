//! WasmBox's benchmark harness: what process-per-sandbox costs and buys, measured side by
//! side with the alternatives in one run (see `wasmbox-bench --help` and the README).

pub mod extras;
pub mod loadgen;
pub mod modes;
pub mod report;
pub mod servers;
pub mod sessions;
pub mod stats;
pub mod suite;
