//! The session snapshot format: the state of a Wasm instance between two messages, as
//! engine-neutral bytes that any worker, on either engine, can restore.
//!
//! A session's state is its linear memory plus its mutable globals. Memory is stored as the
//! 64 KiB pages that differ from the module's initial image (zeros plus its active data
//! segments), each compressed on its own as one zstd frame, so a page a message did not
//! touch is carried over without being compressed again, and restoring writes only pages
//! that hold state.
//!
//! Layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `WBXSNAP\0` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | flags (0; a reader refuses any other value) |
//! | 16 | 32 | SHA-256 of the module the state belongs to |
//! | 48 | 4 | memory size, in 64 KiB pages |
//! | 52 | 4 | number of global records G |
//! | 56 | 4 | number of page records P |
//! | 60 | ... | G global records: index (u32), type code (u8: 0x7f i32, 0x7e i64, 0x7d f32, 0x7c f64, 0x7b v128), value (4, 8, 4, 8 or 16 bytes) |
//! | ... | ... | P page records: page index (u32, strictly increasing, below the memory size), frame length L (u32), L bytes of zstd frame decompressing to exactly 65536 bytes |
//! | end - 8 | 8 | XXH3-64 of every byte before it |
//!
//! This module checks structure and checksum; that the globals match the module and that
//! every frame decompresses to a page is checked by the worker that restores it.

use xxhash_rust::xxh3::xxh3_64;

/// First bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"WBXSNAP\0";

/// Version of the layout above; bumped when it changes.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of one Wasm page.
pub const PAGE_SIZE: usize = 65536;

/// Most pages a 32-bit linear memory has.
pub const MAX_PAGES: u32 = 65536;

/// Longest frame a page may take: zstd's bound for a 64 KiB input, with room to spare.
pub const MAX_FRAME_LEN: u32 = PAGE_SIZE as u32 + 1024;

const HEADER_LEN: usize = 60;
const CHECKSUM_LEN: usize = 8;

/// Smallest possible snapshot: header and checksum.
pub const MIN_LEN: usize = HEADER_LEN + CHECKSUM_LEN;

/// Why bytes are not a usable snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is truncated ({len} bytes)")]
    Truncated { len: usize },
    #[error("not a WasmBox snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("snapshot has unknown flags {0:#x}")]
    Flags(u32),
    #[error("snapshot checksum does not match: the snapshot is corrupt")]
    Checksum,
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
    #[error("snapshot belongs to another module (module {found}, expected {expected})")]
    OtherModule { found: String, expected: String },
}

/// Value types a global record may have: (type code, value size).
const GLOBAL_TYPES: [(u8, usize); 5] = [(0x7f, 4), (0x7e, 8), (0x7d, 4), (0x7c, 8), (0x7b, 16)];

/// Size of a value of type `code`, or `None` for an unknown code.
pub fn global_value_size(code: u8) -> Option<usize> {
    GLOBAL_TYPES.iter().find(|(c, _)| *c == code).map(|&(_, size)| size)
}

/// A mutable global's value: its index in the module, its type code and its bytes
/// (little-endian, `global_value_size(ty)` of them used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalValue {
    pub index: u32,
    pub ty: u8,
    pub bytes: [u8; 16],
}

impl GlobalValue {
    /// The used bytes of the value.
    pub fn value(&self) -> &[u8] {
        &self.bytes[..global_value_size(self.ty).unwrap_or(0)]
    }
}

/// A parsed snapshot, borrowing its page frames from the bytes it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot<'a> {
    pub module_sha256: [u8; 32],
    pub memory_pages: u32,
    pub globals: Vec<GlobalValue>,
    /// Page index and its zstd frame, by increasing index.
    pub pages: Vec<(u32, &'a [u8])>,
}

impl Snapshot<'_> {
    /// The module hash as lowercase hex, as the registry spells it.
    pub fn module_hex(&self) -> String {
        hex(&self.module_sha256)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `bytes` as a snapshot and checks its checksum and structure.
pub fn parse(bytes: &[u8]) -> Result<Snapshot<'_>, SnapshotError> {
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < MIN_LEN {
        return Err(SnapshotError::Truncated { len: bytes.len() });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let mut expected = [0u8; 8];
    expected.copy_from_slice(sum);
    if xxh3_64(body) != u64::from_le_bytes(expected) {
        return Err(SnapshotError::Checksum);
    }
    let flags = u32_at(bytes, 12);
    if flags != 0 {
        return Err(SnapshotError::Flags(flags));
    }
    let mut module_sha256 = [0u8; 32];
    module_sha256.copy_from_slice(&bytes[16..48]);
    let memory_pages = u32_at(bytes, 48);
    let global_count = u32_at(bytes, 52);
    let page_count = u32_at(bytes, 56);
    let malformed = |what: String| SnapshotError::Malformed(what);
    if memory_pages > MAX_PAGES {
        return Err(malformed(format!("memory of {memory_pages} pages is larger than 4 GiB")));
    }
    if page_count > memory_pages {
        return Err(malformed(format!("{page_count} page records for a memory of {memory_pages} pages")));
    }
    let mut reader = Reader { bytes: body, at: HEADER_LEN };
    // Each global record takes at least 9 bytes: a count the body cannot hold is refused
    // before anything is allocated for it.
    if global_count as usize > (body.len() - HEADER_LEN) / 9 {
        return Err(malformed(format!("{global_count} global records do not fit in the snapshot")));
    }
    let mut globals = Vec::with_capacity(global_count as usize);
    for _ in 0..global_count {
        let index = reader.u32()?;
        let ty = reader.take(1)?[0];
        let size = global_value_size(ty).ok_or_else(|| malformed(format!("global {index} has type code {ty:#x}")))?;
        if globals.last().is_some_and(|g: &GlobalValue| g.index >= index) {
            return Err(malformed("global records are not in increasing index order".into()));
        }
        let mut value = [0u8; 16];
        value[..size].copy_from_slice(reader.take(size)?);
        globals.push(GlobalValue { index, ty, bytes: value });
    }
    if page_count as usize > (body.len() - reader.at) / 9 {
        return Err(malformed(format!("{page_count} page records do not fit in the snapshot")));
    }
    let mut pages = Vec::with_capacity(page_count as usize);
    for _ in 0..page_count {
        let index = reader.u32()?;
        if index >= memory_pages {
            return Err(malformed(format!("page {index} is outside the memory of {memory_pages} pages")));
        }
        if pages.last().is_some_and(|&(last, _)| last >= index) {
            return Err(malformed("page records are not in increasing index order".into()));
        }
        let len = reader.u32()?;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(malformed(format!("page {index} has a frame of {len} bytes")));
        }
        pages.push((index, reader.take(len as usize)?));
    }
    if reader.at != body.len() {
        return Err(malformed(format!("{} bytes after the last record", body.len() - reader.at)));
    }
    Ok(Snapshot { module_sha256, memory_pages, globals, pages })
}

/// Parses `bytes` and checks that it belongs to the module with SHA-256 `module_hex`.
pub fn parse_for<'a>(bytes: &'a [u8], module_hex: &str) -> Result<Snapshot<'a>, SnapshotError> {
    let snapshot = parse(bytes)?;
    let found = snapshot.module_hex();
    if found != module_hex {
        return Err(SnapshotError::OtherModule { found, expected: module_hex.to_owned() });
    }
    Ok(snapshot)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| SnapshotError::Malformed("a record runs past the end".into()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Builds a snapshot: globals first, then pages in increasing order, then [`Writer::finish`].
#[derive(Debug)]
pub struct Writer {
    out: Vec<u8>,
    globals: u32,
    pages: u32,
    last_page: Option<u32>,
    pages_started: bool,
}

/// Misuse of a [`Writer`] (a bug in the caller, reported instead of writing a bad snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot writer misuse: {0}")]
pub struct WriterError(pub &'static str);

impl Writer {
    /// `module_sha256`: raw 32-byte hash; `memory_pages`: the memory's size.
    pub fn new(module_sha256: [u8; 32], memory_pages: u32) -> Self {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&module_sha256);
        out.extend_from_slice(&memory_pages.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        Writer { out, globals: 0, pages: 0, last_page: None, pages_started: false }
    }

    pub fn global(&mut self, index: u32, ty: u8, value: &[u8]) -> Result<(), WriterError> {
        if self.pages_started {
            return Err(WriterError("global after a page"));
        }
        if global_value_size(ty) != Some(value.len()) {
            return Err(WriterError("global value size does not match its type"));
        }
        self.out.extend_from_slice(&index.to_le_bytes());
        self.out.push(ty);
        self.out.extend_from_slice(value);
        self.globals += 1;
        Ok(())
    }

    pub fn page(&mut self, index: u32, frame: &[u8]) -> Result<(), WriterError> {
        if self.last_page.is_some_and(|last| last >= index) {
            return Err(WriterError("pages out of order"));
        }
        let len = u32::try_from(frame.len()).map_err(|_| WriterError("frame too long"))?;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(WriterError("frame length out of range"));
        }
        self.pages_started = true;
        self.last_page = Some(index);
        self.out.extend_from_slice(&index.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(frame);
        self.pages += 1;
        Ok(())
    }

    /// Bytes written so far (the finished snapshot is 8 more).
    pub fn encoded_len(&self) -> usize {
        self.out.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out[52..56].copy_from_slice(&self.globals.to_le_bytes());
        self.out[56..60].copy_from_slice(&self.pages.to_le_bytes());
        let sum = xxh3_64(&self.out);
        self.out.extend_from_slice(&sum.to_le_bytes());
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new([7; 32], 3);
        w.global(0, 0x7f, &5i32.to_le_bytes()).unwrap();
        w.global(4, 0x7b, &[9; 16]).unwrap();
        w.page(0, b"frame-zero").unwrap();
        w.page(2, b"frame-two").unwrap();
        w.finish()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let s = parse(&bytes).unwrap();
        assert_eq!(s.module_sha256, [7; 32]);
        assert_eq!(s.memory_pages, 3);
        assert_eq!(s.globals.len(), 2);
        assert_eq!(s.globals[0].value(), 5i32.to_le_bytes());
        assert_eq!(s.globals[1].value(), [9; 16]);
        assert_eq!(s.pages, vec![(0, &b"frame-zero"[..]), (2, &b"frame-two"[..])]);
        assert_eq!(parse_for(&bytes, &"07".repeat(32)).unwrap(), s);
        assert!(matches!(parse_for(&bytes, &"08".repeat(32)), Err(SnapshotError::OtherModule { .. })));
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(parse(&flipped).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn structure_is_checked_even_with_a_valid_checksum() {
        let reseal = |mut bytes: Vec<u8>| {
            bytes.truncate(bytes.len() - 8);
            let sum = xxh3_64(&bytes);
            bytes.extend_from_slice(&sum.to_le_bytes());
            bytes
        };
        // A page record past the memory's end.
        let mut w = Writer::new([1; 32], 1);
        w.page(1, b"x").unwrap();
        assert!(matches!(parse(&w.finish()), Err(SnapshotError::Malformed(_))));
        // Counts larger than the body.
        let mut bytes = sample();
        bytes[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&reseal(bytes)), Err(SnapshotError::Malformed(_))));
        // Another format version, unknown flags.
        let mut bytes = sample();
        bytes[8] = 2;
        assert!(matches!(parse(&bytes), Err(SnapshotError::Version { found: 2 })));
        let mut bytes = sample();
        bytes[12] = 1;
        assert!(matches!(parse(&reseal(bytes)), Err(SnapshotError::Flags(1))));
        assert!(matches!(parse(b"not a snapshot at all, really not"), Err(SnapshotError::BadMagic)));
    }

    #[test]
    fn writer_refuses_misuse() {
        let mut w = Writer::new([0; 32], 4);
        assert!(w.global(0, 0x7f, &[0; 8]).is_err());
        w.page(1, b"a").unwrap();
        assert!(w.page(1, b"b").is_err());
        assert!(w.global(0, 0x7f, &[0; 4]).is_err());
        assert!(w.page(2, &[]).is_err());
    }
}
