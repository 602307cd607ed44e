//! Allocates argv[1] MiB (default 16) and touches every page, then holds it for argv[2]
//! milliseconds (default 0).
fn main() {
    let mib: usize = wasmbox_functions::arg_or(1, 16);
    let hold_ms: u64 = wasmbox_functions::arg_or(2, 0);
    let mut block = vec![0u8; mib << 20];
    for i in (0..block.len()).step_by(4096) {
        block[i] = (i >> 12) as u8;
    }
    let sum: u64 = block.iter().step_by(4096).map(|&b| u64::from(b)).sum();
    std::thread::sleep(std::time::Duration::from_millis(hold_ms));
    println!("allocated and touched {mib} MiB (checksum {sum})");
}
