//! Executes `unreachable`: a Wasm trap, not an exit.
fn main() {
    eprintln!("about to trap");
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}
