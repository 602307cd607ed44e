//! Smallest wasi:cli/command component: prints `hello from a command component`, plus
//! ` args: a,b,c` when given arguments (after argv[0]). The component counterpart of `hello`.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        println!("hello from a command component");
    } else {
        println!("hello from a command component args: {}", args.join(","));
    }
}
