//! Prints its argv and environment as JSON: {"args": [...], "env": {...}}.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let env: serde_json::Map<String, serde_json::Value> =
        std::env::vars().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
    println!("{}", serde_json::json!({ "args": args, "env": env }));
}
