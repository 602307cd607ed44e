//! Smallest useful function: pure invocation overhead.
fn main() {
    println!("Hello from WasmBox!");
}
