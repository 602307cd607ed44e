//! Realistic workload: parse a JSON array of order records (stdin, or argv[1] generated
//! deterministic records when stdin is empty), aggregate revenue per region, and deflate
//! the normalized document. Prints a JSON summary.
use serde_json::{Value, json};

fn generate(records: usize) -> Vec<u8> {
    let regions = ["eu-west", "eu-north", "us-east", "us-west", "ap-south", "sa-east"];
    let mut rng = wasmbox_functions::Rng::new(42);
    let items: Vec<Value> = (0..records)
        .map(|i| {
            let r = rng.next_u64();
            json!({
                "id": i,
                "region": regions[(r % regions.len() as u64) as usize],
                "customer": format!("customer-{:05}", (r >> 8) % 20_000),
                "quantity": (r >> 20) % 9 + 1,
                "unit_price_cents": (r >> 32) % 10_000 + 99,
                "tags": ["web", if r & 1 == 0 { "promo" } else { "regular" }],
            })
        })
        .collect();
    serde_json::to_vec(&Value::Array(items)).unwrap_or_default()
}

fn main() {
    let mut input = wasmbox_functions::stdin_bytes();
    if input.is_empty() {
        input = generate(wasmbox_functions::arg_or(1, 5_000));
    }
    let doc: Value =
        serde_json::from_slice(&input).unwrap_or_else(|e| wasmbox_functions::fail(&format!("bad JSON: {e}")));
    let Value::Array(records) = &doc else { wasmbox_functions::fail("expected a JSON array of records") };
    let mut revenue: std::collections::BTreeMap<String, u64> = Default::default();
    for r in records {
        let region = r["region"].as_str().unwrap_or("unknown").to_owned();
        let cents = r["quantity"].as_u64().unwrap_or(0) * r["unit_price_cents"].as_u64().unwrap_or(0);
        *revenue.entry(region).or_default() += cents;
    }
    let normalized = serde_json::to_vec(&doc).unwrap_or_default();
    let compressed = miniz_oxide::deflate::compress_to_vec(&normalized, 6);
    println!(
        "{}",
        json!({
            "records": records.len(),
            "revenue_cents_by_region": revenue,
            "json_bytes": normalized.len(),
            "deflated_bytes": compressed.len(),
        })
    );
}
