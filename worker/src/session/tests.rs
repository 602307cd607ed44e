//! The session driver on the Wasmtime engine, with hand-written modules: every kind of
//! mutable global, a grown memory, pages carried over, and each way a step can fail.

use std::time::Duration;

use wasmbox_protocol::snapshot::{self, Snapshot};
use wasmbox_protocol::{Outcome, SessionOp};

use super::{Step, StepOutput, instrument};
use crate::engine::wasmtime::WasmtimeEngine;
use crate::engine::{Engine, ModuleKind, RunRequest};

/// A reactor with one mutable global of each numeric type (none exported), a data segment,
/// `_initialize` that sets the globals, and `handle` that bumps them, grows the memory to 3
/// pages once, and counts its calls at an address in page 2.
const MODULE: &str = r#"(module
  (memory 2)
  (data (i32.const 100) "image")
  (global $i (mut i32) (i32.const 0))
  (global $l (mut i64) (i64.const 0))
  (global $f (mut f32) (f32.const 0))
  (global $d (mut f64) (f64.const 0))
  (global $v (mut v128) (v128.const i64x2 0 0))
  (global $k i32 (i32.const 5))
  (func (export "_initialize")
    (global.set $i (i32.const 10))
    (global.set $l (i64.const -20))
    (global.set $f (f32.const 1.5))
    (global.set $d (f64.const 2.25))
    (global.set $v (v128.const i64x2 7 9)))
  (func (export "handle")
    (global.set $i (i32.add (global.get $i) (i32.const 1)))
    (global.set $l (i64.sub (global.get $l) (i64.const 1)))
    (global.set $f (f32.add (global.get $f) (f32.const 1)))
    (global.set $d (f64.mul (global.get $d) (f64.const 2)))
    (global.set $v (i64x2.add (global.get $v) (v128.const i64x2 1 1)))
    (if (i32.lt_u (memory.size) (i32.const 3)) (then (drop (memory.grow (i32.const 1)))))
    (i32.store (i32.const 140000) (i32.add (i32.load (i32.const 140000)) (i32.const 1))))
  (func (export "poke") (i32.store8 (i32.const 70000) (i32.const 1)))
  (func (export "boom") unreachable)
  (func (export "spin") (loop (br 0))))"#;

struct Fixture {
    engine: WasmtimeEngine,
    module: <WasmtimeEngine as Engine>::Module,
    layout: instrument::Layout,
    hash: [u8; 32],
}

fn fixture() -> Fixture {
    let wasm = wat::parse_str(MODULE).unwrap();
    let instrumented = instrument::instrument(&wasm).unwrap();
    let engine = WasmtimeEngine::new(false).unwrap();
    let module = engine.compile(&instrumented.wasm, ModuleKind::Session).unwrap();
    Fixture { engine, module, layout: instrumented.layout, hash: [3; 32] }
}

impl Fixture {
    fn step(&self, op: SessionOp, handler: &str, snapshot: &[u8], memory: u64, max: u64) -> (Outcome, StepOutput) {
        let argv = vec!["s".to_string()];
        let request = RunRequest::bare(&argv, memory, Duration::from_millis(300), 1024);
        let step = Step {
            op,
            handler,
            snapshot,
            module_sha256: self.hash,
            memory_limit_bytes: memory,
            max_snapshot_bytes: max,
        };
        let mut out = StepOutput::default();
        let run = self.engine.run_session(&self.module, &self.layout, request, &step, &mut out);
        (run.outcome, out)
    }

    fn ok(&self, op: SessionOp, snapshot: &[u8]) -> (Vec<u8>, wasmbox_protocol::SessionStats) {
        let (outcome, out) = self.step(op, "handle", snapshot, 16 << 20, 1 << 20);
        assert_eq!(outcome, Outcome::Exited { code: 0 });
        (out.snapshot.expect("a committed state"), out.stats)
    }
}

fn globals(s: &Snapshot<'_>) -> Vec<(u32, u8, Vec<u8>)> {
    s.globals.iter().map(|g| (g.index, g.ty, g.value().to_vec())).collect()
}

#[test]
fn globals_of_every_type_and_a_grown_memory_persist() {
    let f = fixture();
    let (mut state, _) = f.ok(SessionOp::Create, &[]);
    let created = snapshot::parse(&state).unwrap();
    // `_initialize` only set globals: memory is the module's initial image (page 0 holds the
    // data segment), and no page is stored.
    assert_eq!(created.memory_pages, 2);
    assert!(created.pages.is_empty(), "{:?}", created.pages.len());
    for _ in 0..3 {
        state = f.ok(SessionOp::Message, &state).0;
    }
    let s = snapshot::parse(&state).unwrap();
    assert_eq!(s.memory_pages, 3);
    let v = |lo: i64, hi: i64| {
        let mut b = lo.to_le_bytes().to_vec();
        b.extend_from_slice(&hi.to_le_bytes());
        b
    };
    assert_eq!(
        globals(&s),
        vec![
            (0, 0x7f, 13i32.to_le_bytes().to_vec()),
            (1, 0x7e, (-23i64).to_le_bytes().to_vec()),
            (2, 0x7d, 4.5f32.to_bits().to_le_bytes().to_vec()),
            (3, 0x7c, 18f64.to_bits().to_le_bytes().to_vec()),
            (4, 0x7b, v(10, 12)),
        ]
    );
    // Page 2 holds the call count (3); pages 0 and 1 are still the image.
    assert_eq!(s.pages.len(), 1);
    assert_eq!(s.pages[0].0, 2);
    let page = zstd::bulk::decompress(s.pages[0].1, snapshot::PAGE_SIZE).unwrap();
    assert_eq!(&page[140000 - 2 * 65536..][..4], &3u32.to_le_bytes());
}

#[test]
fn unchanged_pages_are_carried_over_without_compressing_them_again() {
    let f = fixture();
    let (state, _) = f.ok(SessionOp::Create, &[]);
    // `poke` changes page 1 only.
    let (outcome, out) = f.step(SessionOp::Message, "poke", &state, 16 << 20, 1 << 20);
    assert_eq!(outcome, Outcome::Exited { code: 0 });
    let poked = out.snapshot.unwrap();
    assert_eq!(out.stats.pages_compressed, 1);
    // `handle` then grows the memory and changes page 2: page 1 goes into the new snapshot
    // as the very frame it came in.
    let (handled, stats) = f.ok(SessionOp::Message, &poked);
    assert_eq!((stats.pages_restored, stats.pages_compressed, stats.memory_pages), (1, 1, 3));
    let (before, after) = (snapshot::parse(&poked).unwrap(), snapshot::parse(&handled).unwrap());
    assert_eq!(before.pages.iter().map(|p| p.0).collect::<Vec<_>>(), [1]);
    assert_eq!(after.pages.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(before.pages[0].1, after.pages[0].1);
}

#[test]
fn failures_commit_nothing_and_say_why() {
    let f = fixture();
    let (state, _) = f.ok(SessionOp::Create, &[]);
    let (outcome, out) = f.step(SessionOp::Message, "boom", &state, 16 << 20, 1 << 20);
    assert!(matches!(outcome, Outcome::Trapped { .. }), "{outcome:?}");
    assert!(out.snapshot.is_none());
    let (outcome, out) = f.step(SessionOp::Message, "spin", &state, 16 << 20, 1 << 20);
    assert_eq!(outcome, Outcome::DeadlineExceeded);
    assert!(out.snapshot.is_none());
    let (outcome, _) = f.step(SessionOp::Message, "missing", &state, 16 << 20, 1 << 20);
    assert!(matches!(outcome, Outcome::InvalidModule { ref message } if message.contains("missing")), "{outcome:?}");
    // A state that encodes larger than allowed.
    let (outcome, out) = f.step(SessionOp::Message, "handle", &state, 16 << 20, 100);
    assert_eq!(outcome, Outcome::SnapshotTooLarge { limit_bytes: 100 });
    assert!(out.snapshot.is_none());
    // A snapshot larger than the step's memory limit.
    let (grown, _) = f.ok(SessionOp::Message, &state);
    let (outcome, _) = f.step(SessionOp::Check, "handle", &grown, 2 * 65536, 1 << 20);
    assert_eq!(outcome, Outcome::MemoryLimitExceeded { limit_bytes: 2 * 65536 });
    // Another module's snapshot, and one whose globals do not match the module.
    let other = snapshot::Writer::new([4; 32], 2).finish();
    let (outcome, _) = f.step(SessionOp::Check, "handle", &other, 16 << 20, 1 << 20);
    assert!(matches!(outcome, Outcome::SnapshotInvalid { .. }), "{outcome:?}");
    let misfit = snapshot::Writer::new(f.hash, 2).finish();
    let (outcome, _) = f.step(SessionOp::Check, "handle", &misfit, 16 << 20, 1 << 20);
    assert!(matches!(outcome, Outcome::SnapshotInvalid { ref message } if message.contains("globals")), "{outcome:?}");
    // A page frame that is not a page.
    let mut w = snapshot::Writer::new(f.hash, 2);
    for g in snapshot::parse(&state).unwrap().globals {
        w.global(g.index, g.ty, g.value()).unwrap();
    }
    w.page(0, &zstd::bulk::compress(&[1u8; 100], 1).unwrap()).unwrap();
    let (outcome, _) = f.step(SessionOp::Check, "handle", &w.finish(), 16 << 20, 1 << 20);
    assert!(matches!(outcome, Outcome::SnapshotInvalid { .. }), "{outcome:?}");
    // And the good one still restores.
    assert_eq!(f.step(SessionOp::Check, "handle", &state, 16 << 20, 1 << 20).0, Outcome::Exited { code: 0 });
}
