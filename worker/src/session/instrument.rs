//! Module instrumentation for stateful sessions.
//!
//! A session's state between messages is captured as the instance's linear memory plus its mutable
//! globals. Engines can only read and write *exported* globals, so at registration time the module is
//! rewritten to export its memory and every mutable global under reserved `__wasmbox_` names. At the
//! same time the module's initial memory image (zeros plus active data segments) is computed so that
//! snapshots only need to store pages that differ from it.
//!
//! Modules whose state cannot be fully captured by memory + globals (imported or multiple memories,
//! imported mutable globals, mutable reference globals, tables or segments mutated at run time, a
//! start function, ...) are refused with a message meant for the tenant.
//!
//! Validation and the session checks share a single pass over the module: every function body is
//! decoded once, and each operator is both checked and fed to the validator.

use std::collections::BTreeMap;

use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser as wp;

/// Wasm page size.
pub const PAGE_SIZE: usize = 65536;

/// Name under which the rewritten module exports its linear memory.
pub const MEMORY_EXPORT: &str = "__wasmbox_memory";

/// Prefix reserved for the exports added by [`instrument`].
const RESERVED_PREFIX: &str = "__wasmbox_";

/// Export name of the mutable global with module global index `index` (imported + defined numbering).
pub fn global_export(index: u32) -> String {
    format!("__wasmbox_global_{index}")
}

/// Value type of a mutable global captured in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalType {
    I32,
    I64,
    F32,
    F64,
    V128,
}

impl GlobalType {
    /// Stable one-byte code used in the snapshot format: I32=0x7f, I64=0x7e, F32=0x7d, F64=0x7c,
    /// V128=0x7b (the Wasm binary type codes).
    pub fn code(self) -> u8 {
        match self {
            GlobalType::I32 => 0x7f,
            GlobalType::I64 => 0x7e,
            GlobalType::F32 => 0x7d,
            GlobalType::F64 => 0x7c,
            GlobalType::V128 => 0x7b,
        }
    }

    /// Inverse of [`GlobalType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0x7f => Some(GlobalType::I32),
            0x7e => Some(GlobalType::I64),
            0x7d => Some(GlobalType::F32),
            0x7c => Some(GlobalType::F64),
            0x7b => Some(GlobalType::V128),
            _ => None,
        }
    }

    /// Bytes of a value of this type: 4, 8, 4, 8, 16.
    pub fn size(self) -> usize {
        match self {
            GlobalType::I32 | GlobalType::F32 => 4,
            GlobalType::I64 | GlobalType::F64 => 8,
            GlobalType::V128 => 16,
        }
    }
}

/// A mutable global defined by the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutableGlobal {
    /// Module global index (imported globals come first).
    pub index: u32,
    pub ty: GlobalType,
}

/// What the session machinery needs to know about a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Minimum (initial) size of the linear memory, in pages.
    pub initial_pages: u32,
    /// Maximum size in pages declared by the module, if any.
    pub maximum_pages: Option<u64>,
    /// Every mutable global defined by the module, in index order.
    pub globals: Vec<MutableGlobal>,
    /// The initial image: for each page (index < initial_pages) that is not all zeros after the
    /// active data segments are applied, its 65536 bytes. Sorted by page index, no duplicates.
    pub image: Vec<(u32, Box<[u8]>)>,
}

impl Layout {
    /// The initial content of page `page` (None means all zeros), by binary search in `image`.
    pub fn image_page(&self, page: u32) -> Option<&[u8]> {
        let i = self.image.binary_search_by_key(&page, |(p, _)| *p).ok()?;
        self.image.get(i).map(|(_, bytes)| &bytes[..])
    }
}

/// A rewritten module and its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instrumented {
    pub wasm: Vec<u8>,
    pub layout: Layout,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstrumentError {
    /// Not valid WebAssembly (message from the parser/validator).
    #[error("failed to parse WebAssembly module: {0}")]
    Invalid(String),
    /// Valid, but its state cannot be captured as memory + globals; the message says why, for a tenant.
    #[error("module cannot be used for sessions: {0}")]
    Unsupported(String),
}

fn invalid(e: wp::BinaryReaderError) -> InstrumentError {
    InstrumentError::Invalid(e.to_string())
}

/// Validates `wasm` (wasmparser::Validator with default features), checks the session rules, and
/// returns the rewritten module plus its layout.
///
/// If the module is both invalid and unsupported, [`InstrumentError::Invalid`] wins. Among session
/// rule violations, the first one encountered in module order is reported.
pub fn instrument(wasm: &[u8]) -> Result<Instrumented, InstrumentError> {
    let mut validator = wp::Validator::new();
    let features = *validator.features();
    let mut scan = Scan::new(wasm);
    let mut func_allocs = wp::FuncValidatorAllocations::default();
    let mut parser = wp::Parser::new(0);
    parser.set_features(features);

    for payload in parser.parse_all(wasm) {
        let payload = payload.map_err(invalid)?;
        if let wp::Payload::Version { encoding: wp::Encoding::Component, .. } = payload {
            // Components are valid input for the default validator, but not something we run.
            wp::Validator::new().validate_all(wasm).map_err(invalid)?;
            return Err(InstrumentError::Unsupported(
                "this is a WebAssembly component; sessions need a core WebAssembly module".into(),
            ));
        }
        match validator.payload(&payload).map_err(invalid)? {
            wp::ValidPayload::Func(func, body) => {
                let index = scan.imported_funcs.saturating_add(scan.code_entries);
                scan.code_entries = scan.code_entries.saturating_add(1);
                let mut fv = func.into_validator(std::mem::take(&mut func_allocs));
                let mut reader = body.get_binary_reader();
                fv.read_locals(&mut reader).map_err(invalid)?;
                reader.set_features(features);
                // Each operator is decoded once, checked and validated (what `FuncValidator::validate` does,
                // plus the check).
                while !reader.eof() {
                    let mut visitor = Checked { inner: fv.visitor(reader.original_position()), found: None };
                    reader.visit_operator(&mut visitor).map_err(invalid)?.map_err(invalid)?;
                    if let Some((name, what)) = visitor.found {
                        scan.refuse(format!("function {index} uses `{name}`; {what} not part of a session's state"));
                    }
                }
                reader.finish_expression(&fv.visitor(reader.original_position())).map_err(invalid)?;
                func_allocs = fv.into_allocations();
            }
            wp::ValidPayload::Ok | wp::ValidPayload::End(_) | wp::ValidPayload::Parser(_) => {}
        }
        scan.payload(&payload)?;
    }
    scan.finish()
}

const TABLES: &str = "tables are";
const SEGMENTS: &str = "dropped segments are";
const GC: &str = "GC heap objects are";

/// Records, for the operator `$op`, the instruction name and what it touches if it changes instance
/// state other than memory and globals; expands to nothing for every other operator.
macro_rules! note_forbidden {
    ($found:expr, TableSet) => {
        $found = Some(("table.set", TABLES))
    };
    ($found:expr, TableGrow) => {
        $found = Some(("table.grow", TABLES))
    };
    ($found:expr, TableFill) => {
        $found = Some(("table.fill", TABLES))
    };
    ($found:expr, TableCopy) => {
        $found = Some(("table.copy", TABLES))
    };
    ($found:expr, TableInit) => {
        $found = Some(("table.init", TABLES))
    };
    ($found:expr, TableAtomicSet) => {
        $found = Some(("table.atomic.set", TABLES))
    };
    ($found:expr, TableAtomicRmwXchg) => {
        $found = Some(("table.atomic.rmw.xchg", TABLES))
    };
    ($found:expr, TableAtomicRmwCmpxchg) => {
        $found = Some(("table.atomic.rmw.cmpxchg", TABLES))
    };
    ($found:expr, ElemDrop) => {
        $found = Some(("elem.drop", SEGMENTS))
    };
    ($found:expr, DataDrop) => {
        $found = Some(("data.drop", SEGMENTS))
    };
    // GC objects reachable from immutable globals, tables or element segments live across calls and
    // are not captured either, so mutating any GC object is refused.
    ($found:expr, StructSet) => {
        $found = Some(("struct.set", GC))
    };
    ($found:expr, StructAtomicSet) => {
        $found = Some(("struct.atomic.set", GC))
    };
    ($found:expr, StructAtomicRmwAdd) => {
        $found = Some(("struct.atomic.rmw.add", GC))
    };
    ($found:expr, StructAtomicRmwSub) => {
        $found = Some(("struct.atomic.rmw.sub", GC))
    };
    ($found:expr, StructAtomicRmwAnd) => {
        $found = Some(("struct.atomic.rmw.and", GC))
    };
    ($found:expr, StructAtomicRmwOr) => {
        $found = Some(("struct.atomic.rmw.or", GC))
    };
    ($found:expr, StructAtomicRmwXor) => {
        $found = Some(("struct.atomic.rmw.xor", GC))
    };
    ($found:expr, StructAtomicRmwXchg) => {
        $found = Some(("struct.atomic.rmw.xchg", GC))
    };
    ($found:expr, StructAtomicRmwCmpxchg) => {
        $found = Some(("struct.atomic.rmw.cmpxchg", GC))
    };
    ($found:expr, ArraySet) => {
        $found = Some(("array.set", GC))
    };
    ($found:expr, ArrayFill) => {
        $found = Some(("array.fill", GC))
    };
    ($found:expr, ArrayCopy) => {
        $found = Some(("array.copy", GC))
    };
    ($found:expr, ArrayInitData) => {
        $found = Some(("array.init_data", GC))
    };
    ($found:expr, ArrayInitElem) => {
        $found = Some(("array.init_elem", GC))
    };
    ($found:expr, ArrayAtomicSet) => {
        $found = Some(("array.atomic.set", GC))
    };
    ($found:expr, ArrayAtomicRmwAdd) => {
        $found = Some(("array.atomic.rmw.add", GC))
    };
    ($found:expr, ArrayAtomicRmwSub) => {
        $found = Some(("array.atomic.rmw.sub", GC))
    };
    ($found:expr, ArrayAtomicRmwAnd) => {
        $found = Some(("array.atomic.rmw.and", GC))
    };
    ($found:expr, ArrayAtomicRmwOr) => {
        $found = Some(("array.atomic.rmw.or", GC))
    };
    ($found:expr, ArrayAtomicRmwXor) => {
        $found = Some(("array.atomic.rmw.xor", GC))
    };
    ($found:expr, ArrayAtomicRmwXchg) => {
        $found = Some(("array.atomic.rmw.xchg", GC))
    };
    ($found:expr, ArrayAtomicRmwCmpxchg) => {
        $found = Some(("array.atomic.rmw.cmpxchg", GC))
    };
    ($found:expr, $other:ident) => {};
}

/// Delegates every operator to the validator's visitor, noting forbidden ones on the way.
macro_rules! delegate_and_check {
    ($(@$proposal:ident $op:ident $({ $($arg:ident: $argty:ty),* })? => $visit:ident ($($ann:tt)*))*) => {
        $(
            fn $visit(&mut self $($(, $arg: $argty)*)?) -> Self::Output {
                note_forbidden!(self.found, $op);
                self.inner.$visit($($($arg),*)?)
            }
        )*
    };
}

/// Wraps the function validator's visitor for one operator.
struct Checked<V> {
    inner: V,
    /// Set when the visited operator changes instance state other than memory and globals.
    found: Option<(&'static str, &'static str)>,
}

impl<V: wp::FrameStack> wp::FrameStack for Checked<V> {
    fn current_frame(&self) -> Option<wp::FrameKind> {
        self.inner.current_frame()
    }
}

impl<'a, V: wp::VisitOperator<'a>> wp::VisitOperator<'a> for Checked<V> {
    type Output = V::Output;

    // No SIMD instruction touches instance state: those go straight to the validator.
    fn simd_visitor(&mut self) -> Option<&mut dyn wp::VisitSimdOperator<'a, Output = Self::Output>> {
        self.inner.simd_visitor()
    }

    wp::for_each_visit_operator!(delegate_and_check);
}

/// The memory, once known to be supported.
#[derive(Debug, Clone, Copy)]
struct Memory {
    initial_pages: u32,
    maximum_pages: Option<u64>,
}

/// Session checks, layout collection and rewriting, fed one payload at a time.
struct Scan<'a> {
    wasm: &'a [u8],
    out: Module,
    /// First session rule violation found.
    unsupported: Option<String>,
    imported_funcs: u32,
    imported_globals: u32,
    code_entries: u32,
    memory_imported: bool,
    memory: Option<Memory>,
    globals: Vec<MutableGlobal>,
    exports_written: bool,
    image: BTreeMap<u32, Box<[u8]>>,
}

impl<'a> Scan<'a> {
    fn new(wasm: &'a [u8]) -> Self {
        Scan {
            wasm,
            out: Module::new(),
            unsupported: None,
            imported_funcs: 0,
            imported_globals: 0,
            code_entries: 0,
            memory_imported: false,
            memory: None,
            globals: Vec::new(),
            exports_written: false,
            image: BTreeMap::new(),
        }
    }

    fn refuse(&mut self, message: String) {
        if self.unsupported.is_none() {
            self.unsupported = Some(message);
        }
    }

    fn payload(&mut self, payload: &wp::Payload<'a>) -> Result<(), InstrumentError> {
        use wp::Payload as P;
        match payload {
            P::ImportSection(reader) => self.imports(reader.clone())?,
            P::MemorySection(reader) => self.memories(reader.clone())?,
            P::GlobalSection(reader) => self.global_section(reader.clone())?,
            P::ExportSection(reader) => return self.exports(Some(reader.clone())),
            P::StartSection { func, .. } => self.refuse(format!(
                "module has a start section (function {func}); a start function runs at every instantiation; \
                 use `_initialize`"
            )),
            P::DataSection(reader) => self.data(reader.clone())?,
            P::End(_) => {
                if !self.exports_written {
                    self.exports(None)?;
                }
                return Ok(());
            }
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            // The export section goes before start, element, data count, code and data sections.
            let after_exports = matches!(id, 8..=12);
            if after_exports && !self.exports_written {
                self.exports(None)?;
            }
            let data = usize::try_from(range.start)
                .ok()
                .zip(usize::try_from(range.end).ok())
                .and_then(|(start, end)| self.wasm.get(start..end))
                .ok_or_else(|| InstrumentError::Invalid(format!("section {id} is out of bounds")))?;
            self.out.section(&RawSection { id, data });
        }
        Ok(())
    }

    fn imports(&mut self, reader: wp::ImportSectionReader<'a>) -> Result<(), InstrumentError> {
        for import in reader.into_imports() {
            let wp::Import { module, name, ty } = import.map_err(invalid)?;
            match ty {
                wp::TypeRef::Func(_) | wp::TypeRef::FuncExact(_) => {
                    self.imported_funcs = self.imported_funcs.saturating_add(1);
                }
                wp::TypeRef::Global(global) => {
                    if global.mutable {
                        self.refuse(format!(
                            "module imports a mutable global (`{module}`.`{name}`); imported mutable globals are \
                             not part of a session's state"
                        ));
                    }
                    self.imported_globals = self.imported_globals.saturating_add(1);
                }
                wp::TypeRef::Memory(_) => {
                    self.memory_imported = true;
                    self.refuse(format!(
                        "module imports its linear memory (`{module}`.`{name}`); the memory must be defined by \
                         the module"
                    ));
                }
                wp::TypeRef::Table(_) => self.refuse(format!(
                    "module imports a table (`{module}`.`{name}`); only functions and immutable globals may be \
                     imported"
                )),
                wp::TypeRef::Tag(_) => self.refuse(format!(
                    "module imports a tag (`{module}`.`{name}`); only functions and immutable globals may be imported"
                )),
            }
        }
        Ok(())
    }

    fn memories(&mut self, reader: wp::MemorySectionReader<'a>) -> Result<(), InstrumentError> {
        let memories = reader.into_iter().collect::<Result<Vec<_>, _>>().map_err(invalid)?;
        if self.memory_imported && !memories.is_empty() {
            self.refuse("module has more than one linear memory; exactly one is supported".into());
            return Ok(());
        }
        let [memory] = memories.as_slice() else {
            if memories.len() > 1 {
                self.refuse(format!("module defines {} linear memories; exactly one is supported", memories.len()));
            }
            return Ok(());
        };
        if memory.memory64 {
            self.refuse("module uses a 64-bit linear memory (memory64); only 32-bit memories are supported".into());
        } else if memory.shared {
            self.refuse("module uses a shared linear memory; shared memories are not supported".into());
        } else if memory.page_size_log2.is_some_and(|log2| log2 != 16) {
            self.refuse("module uses a custom memory page size; only 64 KiB pages are supported".into());
        } else if let Ok(initial_pages) = u32::try_from(memory.initial) {
            self.memory = Some(Memory { initial_pages, maximum_pages: memory.maximum });
        } else {
            self.refuse("module's initial memory size is too large".into());
        }
        Ok(())
    }

    fn global_section(&mut self, reader: wp::GlobalSectionReader<'a>) -> Result<(), InstrumentError> {
        let mut index = self.imported_globals;
        for global in reader {
            let ty = global.map_err(invalid)?.ty;
            if ty.mutable {
                let captured = match ty.content_type {
                    wp::ValType::I32 => Some(GlobalType::I32),
                    wp::ValType::I64 => Some(GlobalType::I64),
                    wp::ValType::F32 => Some(GlobalType::F32),
                    wp::ValType::F64 => Some(GlobalType::F64),
                    wp::ValType::V128 => Some(GlobalType::V128),
                    wp::ValType::Ref(_) => None,
                };
                match captured {
                    Some(ty) => self.globals.push(MutableGlobal { index, ty }),
                    None => self.refuse(format!(
                        "global {index} is a mutable `{}` global; reference-typed globals cannot be saved in a \
                         session",
                        ty.content_type
                    )),
                }
            }
            index = index.saturating_add(1);
        }
        Ok(())
    }

    /// Writes the export section: the original exports (if any) followed by the session exports.
    fn exports(&mut self, reader: Option<wp::ExportSectionReader<'a>>) -> Result<(), InstrumentError> {
        let mut section = ExportSection::new();
        for export in reader.into_iter().flatten() {
            let wp::Export { name, kind, index } = export.map_err(invalid)?;
            if name.starts_with(RESERVED_PREFIX) {
                self.refuse(format!(
                    "module exports `{name}`; export names starting with `{RESERVED_PREFIX}` are reserved"
                ));
            }
            let kind = match kind {
                wp::ExternalKind::Func | wp::ExternalKind::FuncExact => ExportKind::Func,
                wp::ExternalKind::Table => ExportKind::Table,
                wp::ExternalKind::Memory => ExportKind::Memory,
                wp::ExternalKind::Global => ExportKind::Global,
                wp::ExternalKind::Tag => ExportKind::Tag,
            };
            section.export(name, kind, index);
        }
        if self.memory.is_some() {
            section.export(MEMORY_EXPORT, ExportKind::Memory, 0);
        }
        for global in &self.globals {
            section.export(&global_export(global.index), ExportKind::Global, global.index);
        }
        self.out.section(&section);
        self.exports_written = true;
        Ok(())
    }

    fn data(&mut self, reader: wp::DataSectionReader<'a>) -> Result<(), InstrumentError> {
        for (segment, data) in reader.into_iter().enumerate() {
            let data = data.map_err(invalid)?;
            let wp::DataKind::Active { memory_index, offset_expr } = data.kind else {
                continue; // Passive segments do not affect the initial image.
            };
            if memory_index != 0 {
                self.refuse(format!("data segment {segment} targets memory {memory_index}"));
                continue;
            }
            let mut ops = offset_expr.get_operators_reader();
            let offset = match (ops.read(), ops.read()) {
                (Ok(wp::Operator::I32Const { value }), Ok(wp::Operator::End)) if ops.eof() => value as u32,
                _ => {
                    self.refuse(format!(
                        "data segment {segment} has a computed offset; only `i32.const` offsets are supported"
                    ));
                    continue;
                }
            };
            let Some(memory) = self.memory else {
                continue; // Already refused, or refused at the end for lacking a memory.
            };
            let end = u64::from(offset) + data.data.len() as u64;
            let limit = u64::from(memory.initial_pages) * PAGE_SIZE as u64;
            if end > limit {
                self.refuse(format!(
                    "data segment {segment} (offset {offset}, {} bytes) does not fit in the initial memory of \
                     {} pages",
                    data.data.len(),
                    memory.initial_pages
                ));
                continue;
            }
            apply_segment(&mut self.image, u64::from(offset), data.data);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Instrumented, InstrumentError> {
        if self.memory.is_none() && !self.memory_imported {
            self.refuse("module has no linear memory".into());
        }
        if let Some(message) = self.unsupported {
            return Err(InstrumentError::Unsupported(message));
        }
        let memory = self.memory.ok_or_else(|| InstrumentError::Unsupported("module has no linear memory".into()))?;
        let image = self.image.into_iter().filter(|(_, page)| page.iter().any(|&b| b != 0)).collect();
        Ok(Instrumented {
            wasm: self.out.finish(),
            layout: Layout {
                initial_pages: memory.initial_pages,
                maximum_pages: memory.maximum_pages,
                globals: self.globals,
                image,
            },
        })
    }
}

/// Copies `bytes` at `offset` into the page map, creating zeroed pages as needed.
fn apply_segment(image: &mut BTreeMap<u32, Box<[u8]>>, offset: u64, mut bytes: &[u8]) {
    let page_size = PAGE_SIZE as u64;
    let mut position = offset;
    while !bytes.is_empty() {
        let Ok(page) = u32::try_from(position / page_size) else {
            return;
        };
        let within = (position % page_size) as usize;
        let len = bytes.len().min(PAGE_SIZE - within);
        let (chunk, rest) = bytes.split_at(len);
        let buffer = image.entry(page).or_insert_with(|| vec![0; PAGE_SIZE].into_boxed_slice());
        if let Some(target) = buffer.get_mut(within..within + len) {
            target.copy_from_slice(chunk);
        }
        position += len as u64;
        bytes = rest;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    fn ok(text: &str) -> Instrumented {
        let instrumented = instrument(&wasm(text)).unwrap();
        wp::Validator::new().validate_all(&instrumented.wasm).unwrap();
        instrumented
    }

    fn refused(text: &str) -> String {
        match instrument(&wasm(text)) {
            Err(InstrumentError::Unsupported(message)) => message,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    fn exports(module: &[u8]) -> Vec<(String, wp::ExternalKind, u32)> {
        let mut out = Vec::new();
        for payload in wp::Parser::new(0).parse_all(module) {
            if let wp::Payload::ExportSection(reader) = payload.unwrap() {
                for export in reader {
                    let export = export.unwrap();
                    out.push((export.name.to_string(), export.kind, export.index));
                }
            }
        }
        out
    }

    /// Non-custom section ids in order, and custom sections as (name, data).
    fn sections(module: &[u8]) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut ids = Vec::new();
        let mut customs = Vec::new();
        for payload in wp::Parser::new(0).parse_all(module) {
            let payload = payload.unwrap();
            if let wp::Payload::CustomSection(reader) = &payload {
                customs.push((reader.name().to_string(), reader.data().to_vec()));
            } else if let Some((id, _)) = payload.as_section() {
                ids.push(id);
            }
        }
        (ids, customs)
    }

    const REACTOR: &str = r#"
        (module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 2 16)
          (global $__stack_pointer (mut i32) (i32.const 66560))
          (global $__data_end i32 (i32.const 70010))
          (global $__heap_base i32 (i32.const 70016))
          (func $init (export "_initialize"))
          (func $handle (export "handle") (param i32) (result i32)
            (global.set $__stack_pointer (i32.sub (global.get $__stack_pointer) (i32.const 16)))
            (i32.load (local.get 0)))
          (export "__heap_base" (global $__heap_base))
          (data (i32.const 1024) "hello")
          (data (i32.const 70000) "\01\02\03"))
    "#;

    #[test]
    fn typical_reactor() {
        let out = ok(REACTOR);
        let layout = &out.layout;
        assert_eq!(layout.initial_pages, 2);
        assert_eq!(layout.maximum_pages, Some(16));
        assert_eq!(layout.globals, vec![MutableGlobal { index: 0, ty: GlobalType::I32 }]);
        assert_eq!(layout.image.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![0, 1]);

        let page0 = layout.image_page(0).unwrap();
        assert_eq!(page0.len(), PAGE_SIZE);
        assert_eq!(&page0[1024..1029], b"hello");
        assert!(page0[..1024].iter().all(|&b| b == 0));
        assert!(page0[1029..].iter().all(|&b| b == 0));

        let page1 = layout.image_page(1).unwrap();
        let at = 70000 - PAGE_SIZE;
        assert_eq!(&page1[at..at + 3], &[1, 2, 3]);
        assert!(page1[..at].iter().all(|&b| b == 0));
        assert!(page1[at + 3..].iter().all(|&b| b == 0));
        assert_eq!(layout.image_page(2), None);

        assert_eq!(
            exports(&out.wasm),
            vec![
                ("memory".to_string(), wp::ExternalKind::Memory, 0),
                ("_initialize".to_string(), wp::ExternalKind::Func, 1),
                ("handle".to_string(), wp::ExternalKind::Func, 2),
                ("__heap_base".to_string(), wp::ExternalKind::Global, 2),
                (MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0),
                ("__wasmbox_global_0".to_string(), wp::ExternalKind::Global, 0),
            ]
        );
        // Everything but the export section is unchanged.
        let original = wasm(REACTOR);
        assert_eq!(sections(&out.wasm), sections(&original));
    }

    #[test]
    fn data_segment_spanning_pages_and_overwrites() {
        let out = ok(r#"(module (memory 3)
            (data (i32.const 65534) "abcd")
            (data (i32.const 65535) "X")
            (data (i32.const 131072) "\00\00"))"#);
        let layout = &out.layout;
        // Page 2 only receives zeros, so it is not part of the image.
        assert_eq!(layout.image.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(&layout.image_page(0).unwrap()[65534..], b"aX");
        assert_eq!(&layout.image_page(1).unwrap()[..2], b"cd");
        assert_eq!(layout.image_page(2), None);
        assert_eq!(exports(&out.wasm), vec![(MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0)]);
    }

    #[test]
    fn module_without_export_section() {
        let text = r#"(module
            (type (func))
            (memory 1)
            (global (mut i64) (i64.const 7))
            (table 1 funcref)
            (func (type 0))
            (elem (i32.const 0) func 0)
            (data (i32.const 8) "x"))"#;
        let out = ok(text);
        assert_eq!(
            exports(&out.wasm),
            vec![
                (MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0),
                ("__wasmbox_global_0".to_string(), wp::ExternalKind::Global, 0),
            ]
        );
        let (ids, _) = sections(&out.wasm);
        // type, function, table, memory, global, export, element, datacount?, code, data
        let (original_ids, _) = sections(&wasm(text));
        assert!(!original_ids.contains(&7));
        let position = original_ids.iter().position(|&id| id == 9).unwrap();
        let mut expected = original_ids.clone();
        expected.insert(position, 7);
        assert_eq!(ids, expected);
        assert_eq!(out.layout.globals, vec![MutableGlobal { index: 0, ty: GlobalType::I64 }]);
        assert_eq!(&out.layout.image_page(0).unwrap()[8..9], b"x");
    }

    #[test]
    fn module_with_only_memory_gets_export_section_at_end() {
        let out = ok("(module (memory 0))");
        assert_eq!(out.layout.initial_pages, 0);
        assert_eq!(out.layout.maximum_pages, None);
        assert!(out.layout.globals.is_empty());
        assert!(out.layout.image.is_empty());
        assert_eq!(exports(&out.wasm), vec![(MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0)]);
        assert_eq!(sections(&out.wasm).0, vec![5, 7]);
    }

    #[test]
    fn imported_immutable_global_and_all_numeric_types() {
        let out = ok(r#"(module
            (import "env" "f" (func))
            (import "env" "base" (global i32))
            (import "env" "g" (func))
            (import "env" "other" (global f64))
            (memory 1)
            (global (mut i32) (i32.const 1))
            (global i64 (i64.const 2))
            (global (mut i64) (i64.const 3))
            (global (mut f32) (f32.const 4))
            (global (mut f64) (f64.const 5))
            (global (mut v128) (v128.const i32x4 1 2 3 4))
            (global funcref (ref.null func))
            (func (export "run") (global.set 6 (global.get 1)))
            (func (global.set 7 (i32x4.add (global.get 7) (i32x4.splat (i32.const 1))))))"#);
        assert_eq!(
            out.layout.globals,
            vec![
                MutableGlobal { index: 2, ty: GlobalType::I32 },
                MutableGlobal { index: 4, ty: GlobalType::I64 },
                MutableGlobal { index: 5, ty: GlobalType::F32 },
                MutableGlobal { index: 6, ty: GlobalType::F64 },
                MutableGlobal { index: 7, ty: GlobalType::V128 },
            ]
        );
        assert_eq!(
            exports(&out.wasm),
            vec![
                ("run".to_string(), wp::ExternalKind::Func, 2),
                (MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0),
                (global_export(2), wp::ExternalKind::Global, 2),
                (global_export(4), wp::ExternalKind::Global, 4),
                (global_export(5), wp::ExternalKind::Global, 5),
                (global_export(6), wp::ExternalKind::Global, 6),
                (global_export(7), wp::ExternalKind::Global, 7),
            ]
        );
        assert_eq!(global_export(7), "__wasmbox_global_7");
    }

    #[test]
    fn global_type_codes() {
        for (ty, code, size) in [
            (GlobalType::I32, 0x7f, 4),
            (GlobalType::I64, 0x7e, 8),
            (GlobalType::F32, 0x7d, 4),
            (GlobalType::F64, 0x7c, 8),
            (GlobalType::V128, 0x7b, 16),
        ] {
            assert_eq!(ty.code(), code);
            assert_eq!(GlobalType::from_code(code), Some(ty));
            assert_eq!(ty.size(), size);
        }
        assert_eq!(GlobalType::from_code(0x70), None);
        assert_eq!(GlobalType::from_code(0), None);
    }

    #[test]
    fn custom_sections_preserved() {
        let text = r#"(module
            (@custom "before" (before first) "early")
            (memory 1)
            (global (mut i32) (i32.const 0))
            (@custom "middle" (after global) "\00\01\02")
            (func $named (export "f"))
            (@custom "late" (after last) "tail"))"#;
        let original = wasm(text);
        let out = ok(text);
        let (_, customs) = sections(&out.wasm);
        let names: Vec<_> = customs.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"name"), "{names:?}");
        assert_eq!(customs, sections(&original).1);
        assert!(customs.contains(&("middle".to_string(), vec![0, 1, 2])));
        assert!(customs.contains(&("late".to_string(), b"tail".to_vec())));
        assert!(customs.contains(&("before".to_string(), b"early".to_vec())));
    }

    #[test]
    fn invalid_bytes() {
        assert!(matches!(instrument(b"not wasm at all"), Err(InstrumentError::Invalid(_))));
        assert!(matches!(instrument(b""), Err(InstrumentError::Invalid(_))));
        // Well-formed header, then a function section without code.
        let mut bytes = wasm("(module (memory 1) (func))");
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(instrument(&bytes), Err(InstrumentError::Invalid(_))));
        // Type error in a function body.
        let err = instrument(&wasm("(module (memory 1) (func (result i32) (i64.const 0)))")).unwrap_err();
        assert!(matches!(&err, InstrumentError::Invalid(m) if m.contains("type mismatch")), "{err}");
        assert!(err.to_string().starts_with("failed to parse WebAssembly module: "));
    }

    #[test]
    fn malformed_function_bodies() {
        let module = |body: &[u8]| {
            let mut bytes = b"\0asm\x01\0\0\0".to_vec();
            bytes.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]); // type section: one `[] -> []`
            bytes.extend_from_slice(&[3, 2, 1, 0]); // function section
            bytes.extend_from_slice(&[5, 3, 1, 0, 1]); // memory section: one memory, 1 page
            let size = u8::try_from(body.len()).unwrap();
            bytes.extend_from_slice(&[10, size + 2, 1, size]);
            bytes.extend_from_slice(body);
            bytes
        };
        let good = instrument(&module(&[0, 0x02, 0x40, 0x0b, 0x0b])).unwrap();
        wp::Validator::new().validate_all(&good.wasm).unwrap();
        // Missing final `end`.
        let err = instrument(&module(&[0, 0x02, 0x40, 0x0b])).unwrap_err();
        assert!(matches!(&err, InstrumentError::Invalid(m) if m.contains("control frames remain")), "{err}");
        // Operators after the final `end`.
        let err = instrument(&module(&[0, 0x0b, 0x01])).unwrap_err();
        assert!(matches!(&err, InstrumentError::Invalid(m) if m.contains("operators remaining")), "{err}");
    }

    #[test]
    fn invalid_wins_over_unsupported() {
        let err = instrument(&wasm("(module (memory 1) (func (table.set 0 (i32.const 0) (ref.null func))))"));
        assert!(matches!(err, Err(InstrumentError::Invalid(_))), "{err:?}");
    }

    #[test]
    fn refuses_missing_memory() {
        assert_eq!(refused(r#"(module (func (export "f")))"#), "module has no linear memory");
        let err = instrument(&wasm("(module)")).unwrap_err();
        assert_eq!(err.to_string(), "module cannot be used for sessions: module has no linear memory");
    }

    #[test]
    fn refuses_imported_memory() {
        let m = refused(r#"(module (import "env" "memory" (memory 1)))"#);
        assert!(m.contains("imports its linear memory") && m.contains("`env`.`memory`"), "{m}");
    }

    #[test]
    fn refuses_two_memories() {
        let m = refused("(module (memory 1) (memory 1))");
        assert!(m.contains("2 linear memories"), "{m}");
        let m = refused(r#"(module (import "env" "memory" (memory 1)) (memory 1))"#);
        assert!(m.contains("imports its linear memory"), "{m}");
    }

    #[test]
    fn refuses_shared_and_64_bit_memory() {
        assert!(refused("(module (memory 1 2 shared))").contains("shared linear memory"));
        assert!(refused("(module (memory i64 1))").contains("memory64"));
    }

    #[test]
    fn refuses_imported_mutable_global() {
        let m = refused(r#"(module (import "env" "g" (global (mut i32))) (memory 1))"#);
        assert!(m.contains("imports a mutable global") && m.contains("`env`.`g`"), "{m}");
    }

    #[test]
    fn refuses_table_and_tag_imports() {
        let m = refused(r#"(module (import "env" "t" (table 1 funcref)) (memory 1))"#);
        assert!(m.contains("imports a table") && m.contains("`env`.`t`"), "{m}");
        let m = refused(r#"(module (import "env" "e" (tag)) (memory 1))"#);
        assert!(m.contains("imports a tag") && m.contains("`env`.`e`"), "{m}");
    }

    #[test]
    fn refuses_mutable_reference_globals() {
        let m = refused("(module (memory 1) (global (mut i32) (i32.const 0)) (global (mut funcref) (ref.null func)))");
        assert!(m.contains("global 1") && m.contains("funcref"), "{m}");
        let m = refused("(module (memory 1) (global (mut externref) (ref.null extern)))");
        assert!(m.contains("global 0") && m.contains("externref"), "{m}");
    }

    #[test]
    fn refuses_start_section() {
        let m = refused("(module (memory 1) (func $s) (start $s))");
        assert!(m.contains("a start function runs at every instantiation; use `_initialize`"), "{m}");
    }

    #[test]
    fn refuses_non_constant_data_offsets() {
        let m = refused(r#"(module (import "env" "base" (global i32)) (memory 1) (data (global.get 0) "x"))"#);
        assert!(m.contains("data segment 0") && m.contains("i32.const"), "{m}");
        let m =
            refused(r#"(module (memory 1) (data (i32.const 0) "a") (data (i32.add (i32.const 1) (i32.const 2)) "x"))"#);
        assert!(m.contains("data segment 1"), "{m}");
    }

    #[test]
    fn passive_data_is_allowed() {
        let out = ok(r#"(module (memory 1)
            (data "passive")
            (func (export "f") (memory.init 0 (i32.const 0) (i32.const 0) (i32.const 7))))"#);
        assert!(out.layout.image.is_empty());
    }

    #[test]
    fn refuses_data_past_initial_memory() {
        let m = refused(r#"(module (memory 1 4) (data (i32.const 65530) "0123456789"))"#);
        assert!(m.contains("data segment 0") && m.contains("does not fit"), "{m}");
        let m = refused(r#"(module (memory 0) (data (i32.const 0) "x"))"#);
        assert!(m.contains("does not fit"), "{m}");
        // Exactly at the end is fine.
        let out = ok(r#"(module (memory 1) (data (i32.const 65526) "0123456789"))"#);
        assert_eq!(&out.layout.image_page(0).unwrap()[65526..], b"0123456789");
    }

    #[test]
    fn refuses_state_changing_instructions() {
        let cases = [
            ("table.set", "(table.set 0 (i32.const 0) (ref.null func))"),
            ("table.grow", "(drop (table.grow 0 (ref.null func) (i32.const 1)))"),
            ("table.fill", "(table.fill 0 (i32.const 0) (ref.null func) (i32.const 1))"),
            ("table.copy", "(table.copy 0 0 (i32.const 0) (i32.const 0) (i32.const 1))"),
            ("table.init", "(table.init 0 0 (i32.const 0) (i32.const 0) (i32.const 1))"),
            ("elem.drop", "(elem.drop 0)"),
            ("data.drop", "(data.drop 0)"),
        ];
        for (name, body) in cases {
            let text = format!(
                r#"(module
                    (import "env" "h" (func))
                    (memory 1)
                    (table 1 funcref)
                    (elem func 0)
                    (data "d")
                    (func (export "ok") (nop))
                    (func (export "bad") (nop) {body}))"#
            );
            let m = refused(&text);
            let what = if name.starts_with("table") { "tables are" } else { "dropped segments are" };
            assert_eq!(m, format!("function 2 uses `{name}`; {what} not part of a session's state"));
        }
    }

    #[test]
    fn refuses_gc_mutation() {
        let m = refused(
            r#"(module (type $s (struct (field (mut i32))))
                (memory 1)
                (global $g (ref $s) (struct.new $s (i32.const 0)))
                (func (struct.set $s 0 (global.get $g) (i32.const 1))))"#,
        );
        assert_eq!(m, "function 0 uses `struct.set`; GC heap objects are not part of a session's state");
    }

    #[test]
    fn refuses_reserved_export_names() {
        let m = refused(r#"(module (memory 1) (func (export "__wasmbox_x")))"#);
        assert!(m.contains("`__wasmbox_x`") && m.contains("reserved"), "{m}");
        let m = refused(r#"(module (memory (export "__wasmbox_memory") 1))"#);
        assert!(m.contains("`__wasmbox_memory`"), "{m}");
    }

    #[test]
    fn first_violation_is_reported() {
        let m = refused(r#"(module (import "env" "g" (global (mut i32))) (func $s) (start $s))"#);
        assert!(m.contains("imports a mutable global"), "{m}");
    }

    #[test]
    fn refuses_components() {
        let m = refused("(component)");
        assert!(m.contains("component"), "{m}");
    }

    #[test]
    fn memory_already_exported_twice_is_fine() {
        let out = ok(r#"(module (memory (export "mem") (export "memory") 1))"#);
        assert_eq!(
            exports(&out.wasm),
            vec![
                ("mem".to_string(), wp::ExternalKind::Memory, 0),
                ("memory".to_string(), wp::ExternalKind::Memory, 0),
                (MEMORY_EXPORT.to_string(), wp::ExternalKind::Memory, 0),
            ]
        );
    }
}
