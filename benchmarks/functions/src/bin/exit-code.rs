//! Exits with the status given as argv[1] (default 0), after a line on each stream.
fn main() {
    let code: i32 = wasmbox_functions::arg_or(1, 0);
    println!("exiting with {code}");
    eprintln!("about to exit with status {code}");
    std::process::exit(code);
}
