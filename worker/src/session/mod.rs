//! Stateful sessions, the engine-neutral part: restoring a snapshot into a fresh instance,
//! delivering a message to the handler, and capturing the instance's state as a new
//! snapshot (format in [`wasmbox_protocol::snapshot`]).
//!
//! An engine provides access to one live instance of a session module ([`Instance`]); the
//! module was rewritten by [`instrument`] so that its memory and every mutable global are
//! exported, and [`Layout`] says which globals there are and what the memory looks like
//! right after instantiation. Pages equal to that initial image are never stored or written.

pub mod instrument;

use std::time::Instant;

use wasmbox_protocol::snapshot::{self, GlobalValue, PAGE_SIZE, Snapshot, Writer};
use wasmbox_protocol::{Outcome, SessionOp, SessionStats};
use xxhash_rust::xxh3::xxh3_128;

pub use instrument::{Instrumented, Layout};

/// The name of the optional initializer of a WASI reactor.
pub const INITIALIZE: &str = "_initialize";

/// zstd level for pages: the fastest; a page compresses once per change, so speed wins.
const ZSTD_LEVEL: i32 = 1;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// One live instance of a session module, as an engine exposes it.
pub trait Instance {
    /// Current size of the linear memory, in pages.
    fn memory_pages(&mut self) -> Result<u32, String>;
    /// Grows the memory by `pages`.
    fn grow_memory(&mut self, pages: u32) -> Result<(), String>;
    /// The whole linear memory.
    fn memory(&mut self) -> Result<&mut [u8], String>;
    /// The value of mutable global `index` (type code `ty`), little-endian.
    fn global(&mut self, index: u32, ty: u8) -> Result<[u8; 16], String>;
    fn set_global(&mut self, value: &GlobalValue) -> Result<(), String>;
    /// Whether the instance exports a function `name` of type `() -> ()`.
    fn has_function(&mut self, name: &str) -> bool;
    /// Calls export `name` under the step's deadline. `Ok` when it returned; otherwise what
    /// ended it (`Exited` for a `proc_exit`, a trap, the deadline, the memory cap).
    fn call(&mut self, name: &str) -> Result<(), Outcome>;
}

/// One session step as the worker received it.
#[derive(Debug)]
pub struct Step<'a> {
    pub op: SessionOp,
    pub handler: &'a str,
    /// The snapshot to restore (empty for `Create`).
    pub snapshot: &'a [u8],
    /// Raw SHA-256 of the (original) module, recorded in snapshots and checked on restore.
    pub module_sha256: [u8; 32],
    pub memory_limit_bytes: u64,
    pub max_snapshot_bytes: u64,
}

/// What a step produced besides its outcome and output.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The state to commit: present only when the step succeeded.
    pub snapshot: Option<Vec<u8>>,
    pub stats: SessionStats,
}

/// Runs one step on a fresh `instance`. The outcome is `Exited { code: 0 }` for success
/// (with `out.snapshot` set, except for `Check`, and for a handler that ended with
/// `proc_exit(0)`, whose state is not committed).
pub fn drive(instance: &mut impl Instance, layout: &Layout, step: &Step<'_>, out: &mut StepOutput) -> Outcome {
    match step.op {
        SessionOp::Create => {
            if let Err(outcome) = require_handler(instance, step.handler) {
                return outcome;
            }
            if instance.has_function(INITIALIZE) {
                if let Err(outcome) = instance.call(INITIALIZE) {
                    return outcome;
                }
            }
            capture_into(instance, layout, step, &[], out)
        }
        SessionOp::Message => {
            let restored = match restore(instance, layout, step, &mut out.stats) {
                Ok(restored) => restored,
                Err(outcome) => return outcome,
            };
            if let Err(outcome) = require_handler(instance, step.handler) {
                return outcome;
            }
            match instance.call(step.handler) {
                Ok(()) => capture_into(instance, layout, step, &restored, out),
                Err(outcome) => outcome,
            }
        }
        SessionOp::Check => match restore(instance, layout, step, &mut out.stats) {
            Ok(_) => Outcome::Exited { code: 0 },
            Err(outcome) => outcome,
        },
    }
}

fn require_handler(instance: &mut impl Instance, handler: &str) -> Result<(), Outcome> {
    if instance.has_function(handler) {
        Ok(())
    } else {
        Err(Outcome::InvalidModule {
            message: format!("module does not export the session handler `{handler}` as a function () -> ()"),
        })
    }
}

fn capture_into(
    instance: &mut impl Instance,
    layout: &Layout,
    step: &Step<'_>,
    restored: &[RestoredPage<'_>],
    out: &mut StepOutput,
) -> Outcome {
    let started = Instant::now();
    let result = capture(instance, layout, step, restored, &mut out.stats);
    out.stats.capture_us = micros(started);
    match result {
        Ok(bytes) => {
            out.snapshot = Some(bytes);
            Outcome::Exited { code: 0 }
        }
        Err(outcome) => outcome,
    }
}

/// A page written at restore: its content hash and its frame in the old snapshot, so a page
/// the message left as it was is carried over without being compressed again.
#[derive(Debug)]
struct RestoredPage<'a> {
    index: u32,
    hash: u128,
    frame: &'a [u8],
}

fn invalid(message: impl Into<String>) -> Outcome {
    Outcome::SnapshotInvalid { message: message.into() }
}

fn restore<'a>(
    instance: &mut impl Instance,
    layout: &Layout,
    step: &Step<'a>,
    stats: &mut SessionStats,
) -> Result<Vec<RestoredPage<'a>>, Outcome> {
    let started = Instant::now();
    let snap: Snapshot<'a> = snapshot::parse(step.snapshot).map_err(|e| invalid(e.to_string()))?;
    if snap.module_sha256 != step.module_sha256 {
        return Err(invalid("snapshot belongs to another module"));
    }
    if u64::from(snap.memory_pages) * PAGE_SIZE as u64 > step.memory_limit_bytes {
        return Err(Outcome::MemoryLimitExceeded { limit_bytes: step.memory_limit_bytes });
    }
    if snap.memory_pages < layout.initial_pages {
        return Err(invalid(format!(
            "snapshot memory of {} pages is smaller than the module's initial {} pages",
            snap.memory_pages, layout.initial_pages
        )));
    }
    if layout.maximum_pages.is_some_and(|max| u64::from(snap.memory_pages) > max) {
        return Err(invalid("snapshot memory is larger than the module's maximum"));
    }
    let expected: Vec<(u32, u8)> = layout.globals.iter().map(|g| (g.index, g.ty.code())).collect();
    let found: Vec<(u32, u8)> = snap.globals.iter().map(|g| (g.index, g.ty)).collect();
    if expected != found {
        return Err(invalid("snapshot globals do not match the module's mutable globals"));
    }
    let setup = |e: String| Outcome::SetupFailed { message: e };
    let current = instance.memory_pages().map_err(setup)?;
    if snap.memory_pages > current {
        instance.grow_memory(snap.memory_pages - current).map_err(|e| {
            tracing::debug!(error = %e, "growing memory for a snapshot failed");
            Outcome::MemoryLimitExceeded { limit_bytes: step.memory_limit_bytes }
        })?;
    }
    let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| setup(format!("zstd: {e}")))?;
    let memory = instance.memory().map_err(setup)?;
    let mut restored = Vec::with_capacity(snap.pages.len());
    for &(index, frame) in &snap.pages {
        let start = index as usize * PAGE_SIZE;
        let page = memory.get_mut(start..start + PAGE_SIZE).ok_or_else(|| invalid("page outside memory"))?;
        match decompressor.decompress_to_buffer(frame, page) {
            Ok(PAGE_SIZE) => {}
            Ok(n) => return Err(invalid(format!("page {index} decompresses to {n} bytes, not a page"))),
            Err(e) => return Err(invalid(format!("page {index} does not decompress: {e}"))),
        }
        restored.push(RestoredPage { index, hash: xxh3_128(page), frame });
    }
    for global in &snap.globals {
        instance.set_global(global).map_err(|e| invalid(format!("global {}: {e}", global.index)))?;
    }
    stats.pages_restored = restored.len() as u32;
    stats.restore_us = micros(started);
    Ok(restored)
}

fn capture(
    instance: &mut impl Instance,
    layout: &Layout,
    step: &Step<'_>,
    restored: &[RestoredPage<'_>],
    stats: &mut SessionStats,
) -> Result<Vec<u8>, Outcome> {
    let setup = |e: String| Outcome::SetupFailed { message: e };
    let pages = instance.memory_pages().map_err(setup)?;
    let mut writer = Writer::new(step.module_sha256, pages);
    for g in &layout.globals {
        let ty = g.ty.code();
        let value = instance.global(g.index, ty).map_err(setup)?;
        let size = snapshot::global_value_size(ty).unwrap_or(0);
        writer.global(g.index, ty, &value[..size]).map_err(|e| setup(e.to_string()))?;
    }
    let too_large = Outcome::SnapshotTooLarge { limit_bytes: step.max_snapshot_bytes };
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| setup(format!("zstd: {e}")))?;
    let mut frame = vec![0u8; zstd::zstd_safe::compress_bound(PAGE_SIZE)];
    let mut previous = restored.iter().peekable();
    let memory = instance.memory().map_err(setup)?;
    let mut compressed = 0u32;
    for (index, page) in memory.chunks_exact(PAGE_SIZE).enumerate() {
        let index = index as u32;
        let base = layout.image_page(index).unwrap_or(&ZERO_PAGE);
        while previous.next_if(|p| p.index < index).is_some() {}
        let before = previous.next_if(|p| p.index == index);
        if page == base {
            continue;
        }
        match before {
            Some(old) if old.hash == xxh3_128(page) => writer.page(index, old.frame),
            _ => {
                let n = compressor.compress_to_buffer(page, &mut frame).map_err(|e| setup(format!("zstd: {e}")))?;
                compressed += 1;
                writer.page(index, &frame[..n])
            }
        }
        .map_err(|e| setup(e.to_string()))?;
        if writer.encoded_len() as u64 + 8 > step.max_snapshot_bytes {
            return Err(too_large);
        }
    }
    let bytes = writer.finish();
    if bytes.len() as u64 > step.max_snapshot_bytes {
        return Err(too_large);
    }
    stats.pages_compressed = compressed;
    stats.memory_pages = pages;
    Ok(bytes)
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Decodes a lowercase hex SHA-256 into its 32 bytes.
pub fn sha256_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
