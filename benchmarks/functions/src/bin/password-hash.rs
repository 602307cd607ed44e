//! Realistic workload: PBKDF2-HMAC-SHA256 of stdin (the password) with a fixed salt and
//! argv[1] iterations (default 20000). Prints the derived key in hex.
fn main() {
    let iterations: u32 = wasmbox_functions::arg_or(1, 20_000);
    let password = wasmbox_functions::stdin_bytes();
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(&password, b"wasmbox-example-salt", iterations, &mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    println!("{hex}");
}
