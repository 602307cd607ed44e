//! Property tests for the frame codec: no input a peer can send makes the decoder panic,
//! every refusal is a typed [`FrameError`], and what `write_frame` writes `read_frame` reads
//! back unchanged.
//!
//! Each property runs `ProptestConfig::default()` cases (256), which the `PROPTEST_CASES`
//! environment variable overrides for a longer run by hand (see the README).

use std::io::{self, Read};
use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// Payload limits a receiver might use: none, tiny, and roomy (but never large enough that a
/// garbage prefix could make a test case allocate much).
fn max_payload() -> BoxedStrategy<u64> {
    prop_oneof![1 => Just(0u64), 1 => 0u64..64, 3 => 64u64..=(64 << 10)].boxed()
}

/// A prefix that mostly carries the magic, so the length checks are reached too.
fn prefix() -> BoxedStrategy<[u8; PREFIX_LEN]> {
    let header_len = prop_oneof![
        0u32..64,
        Just(MAX_HEADER_LEN),
        Just(MAX_HEADER_LEN + 1),
        (MAX_HEADER_LEN - 2)..=(MAX_HEADER_LEN + 2),
        any::<u32>(),
    ];
    let payload_len = prop_oneof![0u64..128, Just(u64::MAX), Just(u64::from(u32::MAX) + 1), any::<u64>()];
    let with_magic = (header_len, payload_len).prop_map(|(h, p)| {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..4].copy_from_slice(&MAGIC);
        prefix[4..8].copy_from_slice(&h.to_le_bytes());
        prefix[8..].copy_from_slice(&p.to_le_bytes());
        prefix
    });
    prop_oneof![3 => with_magic, 1 => any::<[u8; PREFIX_LEN]>()].boxed()
}

/// Text that looks like a JSON header often enough to get past the first byte: a `type` tag
/// with known and unknown variants and fields of every JSON kind.
fn json_ish() -> BoxedStrategy<Vec<u8>> {
    let scalar = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        ".{0,12}".prop_map(|s| serde_json::Value::String(s).to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    let key = prop_oneof![
        Just("type"),
        Just("kind"),
        Just("protocol"),
        Just("pid"),
        Just("code"),
        Just("outcome"),
        Just("module"),
        Just("argv"),
        Just("env"),
        Just("request_id"),
        Just("stdout_len"),
        Just("memory_limit_bytes"),
        Just("x"),
    ];
    let tag = prop_oneof![
        Just("invoke"),
        Just("shutdown"),
        Just("proceed"),
        Just("hello"),
        Just("started"),
        Just("result"),
        Just("exited"),
        Just("Hello"),
        Just(""),
    ];
    (tag, vec((key, scalar), 0..8), any::<bool>())
        .prop_map(|(tag, fields, close)| {
            let mut text = format!("{{\"type\":\"{tag}\"");
            for (k, v) in fields {
                text.push_str(&format!(",\"{k}\":{v}"));
            }
            if close {
                text.push('}');
            }
            text.into_bytes()
        })
        .boxed()
}

fn header_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..256), json_ish(), valid_to_worker_json(), valid_from_worker_json()].boxed()
}

fn valid_to_worker_json() -> BoxedStrategy<Vec<u8>> {
    (to_worker(), vec(any::<(usize, u8)>(), 0..4), any::<prop::sample::Index>()).prop_map(mutate).boxed()
}

fn valid_from_worker_json() -> BoxedStrategy<Vec<u8>> {
    (from_worker(), vec(any::<(usize, u8)>(), 0..4), any::<prop::sample::Index>()).prop_map(mutate).boxed()
}

/// A valid header, then a few bytes overwritten and maybe a truncation.
fn mutate<H: Serialize>((msg, flips, cut): (H, Vec<(usize, u8)>, prop::sample::Index)) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&msg).expect("test messages serialize");
    for (at, byte) in flips {
        if !bytes.is_empty() {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
    }
    let keep = cut.index(bytes.len() + 1);
    if keep < bytes.len() / 2 {
        bytes.truncate(keep);
    }
    bytes
}

/// Text that JSON can carry. A `PathBuf` that is not UTF-8 cannot be represented on this
/// JSON wire format at all, so the round trip is stated over paths that are.
fn text() -> BoxedStrategy<String> {
    prop_oneof![".{0,16}", "[a-z/._ -]{0,16}", any::<String>()].boxed()
}

fn invocation() -> BoxedStrategy<Invocation> {
    let module = (text(), "[0-9a-f]{64}").prop_map(|(p, sha256)| ModuleRef { path: PathBuf::from(p), sha256 });
    let preopen = (text(), text(), any::<bool>()).prop_map(|(h, guest, read_only)| Preopen {
        host: PathBuf::from(h),
        guest,
        read_only,
    });
    (
        (text(), text(), module, vec(text(), 0..4), vec((text(), text()), 0..4), vec(preopen, 0..3)),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<u32>(), any::<bool>()),
        (session(), any::<bool>()),
    )
        .prop_map(
            |(
                (request_id, function, module, argv, env, preopens),
                (mem, timeout, out, confirm, passed_fds, artifact),
                (session, module_fd),
            )| {
                Invocation {
                    request_id,
                    function,
                    module,
                    argv,
                    env,
                    preopens,
                    memory_limit_bytes: mem,
                    timeout_ms: timeout,
                    max_output_bytes: out,
                    confirm_start: confirm,
                    passed_fds,
                    module_fd,
                    artifact,
                    session,
                    http: None,
                }
            },
        )
        .boxed()
}

fn session() -> BoxedStrategy<Option<SessionCall>> {
    let op = prop_oneof![Just(SessionOp::Create), Just(SessionOp::Message), Just(SessionOp::Check)];
    prop_oneof![
        Just(None),
        (op, text(), any::<u64>(), any::<u64>()).prop_map(|(op, handler, snapshot_len, max_snapshot_bytes)| Some(
            SessionCall { op, handler, snapshot_len, max_snapshot_bytes }
        )),
    ]
    .boxed()
}

fn to_worker() -> BoxedStrategy<ToWorker> {
    prop_oneof![
        invocation().prop_map(ToWorker::Invoke),
        Just(ToWorker::Shutdown),
        Just(ToWorker::Proceed),
        Just(ToWorker::RequestBody),
        any::<bool>().prop_map(|whole| ToWorker::RequestEnd { whole }),
    ]
    .boxed()
}

fn outcome() -> BoxedStrategy<Outcome> {
    prop_oneof![
        any::<i32>().prop_map(|code| Outcome::Exited { code }),
        text().prop_map(|message| Outcome::Trapped { message }),
        Just(Outcome::DeadlineExceeded),
        any::<u64>().prop_map(|limit_bytes| Outcome::MemoryLimitExceeded { limit_bytes }),
        any::<u64>().prop_map(|limit_bytes| Outcome::OutputTooLarge { limit_bytes }),
        text().prop_map(|message| Outcome::InvalidModule { message }),
        Just(Outcome::ModuleChanged),
        Just(Outcome::ModuleNotHeld),
        text().prop_map(|message| Outcome::SetupFailed { message }),
        text().prop_map(|message| Outcome::SnapshotInvalid { message }),
        any::<u64>().prop_map(|limit_bytes| Outcome::SnapshotTooLarge { limit_bytes }),
    ]
    .boxed()
}

fn from_worker() -> BoxedStrategy<FromWorker> {
    let hardening =
        vec(prop_oneof![prop::sample::select(HARDENING_LAYERS.to_vec()).prop_map(str::to_string), text()], 0..8);
    let deadlines = prop_oneof![Just(Deadlines::Engine), Just(Deadlines::Process)];
    let hello = (any::<u32>(), text(), text(), text(), any::<u32>(), text(), hardening, deadlines).prop_map(
        |(protocol, worker_version, engine, engine_version, pid, cgroup, hardening, deadlines)| {
            FromWorker::Hello(Hello {
                protocol,
                worker_version,
                engine,
                engine_version,
                pid,
                cgroup,
                hardening,
                deadlines,
            })
        },
    );
    let source = prop_oneof![
        Just(None),
        Just(Some(ModuleSource::Memory)),
        Just(Some(ModuleSource::Artifact)),
        Just(Some(ModuleSource::Compiled)),
    ];
    let stats =
        prop_oneof![
            Just(None),
            (any::<[u64; 2]>(), any::<[u32; 3]>()).prop_map(|([restore_us, capture_us], [a, b, c])| Some(
                SessionStats { restore_us, capture_us, pages_restored: a, pages_compressed: b, memory_pages: c }
            )),
        ];
    let result = (outcome(), any::<[u64; 4]>(), source, any::<[u64; 2]>(), stats).prop_map(
        |(
            outcome,
            [stdout_len, stderr_len, stderr_dropped, snapshot_len],
            module_source,
            [prepare_us, exec_us],
            session,
        )| {
            FromWorker::Result(InvocationResult {
                outcome,
                stdout_len,
                stderr_len,
                stderr_dropped,
                module_source,
                prepare_us,
                exec_us,
                snapshot_len,
                session,
            })
        },
    );
    prop_oneof![
        hello,
        Just(FromWorker::Started),
        Just(FromWorker::RequestBodyWanted),
        Just(FromWorker::ResponseBody),
        result
    ]
    .boxed()
}

/// A stream of several frames, some valid and some not, concatenated and then possibly cut
/// short: what a confused or malicious peer could send.
fn garbage_stream() -> BoxedStrategy<Vec<u8>> {
    let piece = prop_oneof![
        vec(any::<u8>(), 0..64),
        (prefix(), header_bytes(), vec(any::<u8>(), 0..64)).prop_map(|(p, h, tail)| {
            let mut out = p.to_vec();
            out.extend(h);
            out.extend(tail);
            out
        }),
        (header_bytes(), vec(any::<u8>(), 0..64)).prop_map(|(h, payload)| {
            // A well-formed frame around arbitrary header bytes.
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&(h.len() as u32).to_le_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend(h);
            out.extend(payload);
            out
        }),
        (to_worker(), vec(any::<u8>(), 0..64)).prop_map(|(m, p)| frame(&m, &p)),
        (from_worker(), vec(any::<u8>(), 0..64)).prop_map(|(m, p)| frame(&m, &p)),
    ];
    (vec(piece, 1..5), any::<prop::sample::Index>(), prop::bool::weighted(0.3))
        .prop_map(|(pieces, cut, truncate)| {
            let mut stream = pieces.concat();
            if truncate {
                stream.truncate(cut.index(stream.len() + 1));
            }
            stream
        })
        .boxed()
}

fn frame<H: Serialize>(header: &H, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, header, &[payload]).expect("writing to a Vec cannot fail");
    out
}

/// A reader that hands out data in the given chunk sizes and is interrupted now and then,
/// as a socket may be.
struct Chunked<'a> {
    data: &'a [u8],
    chunks: Vec<(usize, bool)>,
    next: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (size, interrupt) = self.chunks.get(self.next).copied().unwrap_or((usize::MAX, false));
        self.next += 1;
        if interrupt {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = size.max(1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn chunks() -> BoxedStrategy<Vec<(usize, bool)>> {
    vec((1usize..20, prop::bool::weighted(0.2)), 0..32).boxed()
}

/// Reads frames until the stream ends or fails, checking what each read may return.
fn read_all<H: DeserializeOwned>(reader: &mut impl Read, max_payload: u64) -> Result<usize, TestCaseError> {
    let mut frames = 0;
    loop {
        match read_frame::<_, H>(reader, max_payload) {
            Ok(None) => return Ok(frames),
            Ok(Some((_, payload))) => {
                prop_assert!(payload.len() as u64 <= max_payload);
                frames += 1;
            }
            Err(e) => {
                // A byte slice never fails to read and nothing here expects a message, so only
                // the decoder's own refusals can appear.
                prop_assert!(
                    matches!(
                        e,
                        FrameError::BadMagic
                            | FrameError::HeaderTooLarge { .. }
                            | FrameError::PayloadTooLarge { .. }
                            | FrameError::Header(_)
                            | FrameError::Truncated
                    ),
                    "unexpected error {e:?}"
                );
                return Ok(frames);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn parse_prefix_accepts_only_magic_within_limits(prefix in prefix(), max_payload in any::<u64>()) {
        let header = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let payload = u64::from_le_bytes([
            prefix[8], prefix[9], prefix[10], prefix[11], prefix[12], prefix[13], prefix[14], prefix[15],
        ]);
        match parse_prefix(&prefix, max_payload) {
            Ok(lengths) => {
                prop_assert_eq!(&prefix[..4], &MAGIC[..]);
                prop_assert!(header <= MAX_HEADER_LEN && payload <= max_payload);
                prop_assert_eq!(lengths, FrameLengths { header: header as usize, payload: payload as usize });
            }
            Err(FrameError::BadMagic) => prop_assert_ne!(&prefix[..4], &MAGIC[..]),
            Err(FrameError::HeaderTooLarge { len, limit }) => {
                prop_assert_eq!((len, limit), (u64::from(header), u64::from(MAX_HEADER_LEN)));
                prop_assert!(len > limit);
            }
            Err(FrameError::PayloadTooLarge { len, limit }) => {
                prop_assert_eq!(len, payload);
                prop_assert!(len > limit);
            }
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn decode_header_never_panics(bytes in header_bytes()) {
        for result in [decode_header::<ToWorker>(&bytes).map(drop), decode_header::<FromWorker>(&bytes).map(drop)] {
            if let Err(e) = result {
                prop_assert!(matches!(e, FrameError::Header(_)), "unexpected error {e:?}");
            }
        }
    }

    #[test]
    fn read_frame_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..512), max_payload in max_payload()) {
        read_all::<ToWorker>(&mut bytes.as_slice(), max_payload)?;
        read_all::<FromWorker>(&mut bytes.as_slice(), max_payload)?;
    }

    #[test]
    fn read_frame_never_panics_on_garbage_streams(
        stream in garbage_stream(),
        max_payload in max_payload(),
        chunks in chunks(),
    ) {
        read_all::<ToWorker>(&mut stream.as_slice(), max_payload)?;
        read_all::<FromWorker>(&mut stream.as_slice(), max_payload)?;
        read_all::<ToWorker>(&mut Chunked { data: &stream, chunks: chunks.clone(), next: 0 }, max_payload)?;
        read_all::<FromWorker>(&mut Chunked { data: &stream, chunks, next: 0 }, max_payload)?;
    }

    #[test]
    fn to_worker_frames_round_trip(
        messages in vec((to_worker(), vec(vec(any::<u8>(), 0..32), 0..4)), 1..4),
        chunks in chunks(),
    ) {
        round_trip(&messages, chunks)?;
    }

    #[test]
    fn from_worker_frames_round_trip(
        messages in vec((from_worker(), vec(vec(any::<u8>(), 0..32), 0..4)), 1..4),
        chunks in chunks(),
    ) {
        round_trip(&messages, chunks)?;
    }

    #[test]
    fn truncated_frames_are_truncated_errors(msg in to_worker(), payload in vec(any::<u8>(), 0..64), cut in any::<prop::sample::Index>()) {
        let wire = frame(&msg, &payload);
        let cut = 1 + cut.index(wire.len() - 1);
        let err = read_frame::<_, ToWorker>(&mut &wire[..cut], payload.len() as u64);
        prop_assert!(matches!(err, Err(FrameError::Truncated)), "cut at {} of {}: {:?}", cut, wire.len(), err);
    }
}

/// Writes every message with its payload split into parts, then reads them all back, with
/// each frame's receiver limit set to exactly its payload size.
fn round_trip<H>(messages: &[(H, Vec<Vec<u8>>)], chunks: Vec<(usize, bool)>) -> Result<(), TestCaseError>
where
    H: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut wire = Vec::new();
    for (msg, parts) in messages {
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        write_frame(&mut wire, msg, &parts).map_err(|e| TestCaseError::fail(format!("write failed: {e}")))?;
    }
    let mut reader = Chunked { data: &wire, chunks, next: 0 };
    for (msg, parts) in messages {
        let payload = parts.concat();
        let read = read_frame::<_, H>(&mut reader, payload.len() as u64)
            .map_err(|e| TestCaseError::fail(format!("read failed: {e:?}")))?;
        let (back, back_payload) = read.ok_or_else(|| TestCaseError::fail("stream ended early"))?;
        prop_assert_eq!(&back, msg);
        prop_assert_eq!(back_payload, payload);
    }
    let end = read_frame::<_, H>(&mut reader, 0);
    prop_assert!(matches!(end, Ok(None)), "expected a clean end, got {:?}", end.map(|o| o.map(|(_, p)| p)));
    Ok(())
}

proptest! {
    /// Any bytes, and any mutation of a valid snapshot, parse to a result, never a panic.
    #[test]
    fn snapshot_parse_never_panics(bytes in vec(any::<u8>(), 0..512), flip in any::<(usize, u8)>()) {
        let _ = crate::snapshot::parse(&bytes);
        let mut w = crate::snapshot::Writer::new([1; 32], 4);
        w.global(0, 0x7f, &[1, 2, 3, 4]).unwrap();
        w.page(3, &bytes[..bytes.len().min(300)].iter().copied().chain([0]).collect::<Vec<_>>()).unwrap();
        let mut good = w.finish();
        let at = flip.0 % good.len();
        good[at] ^= flip.1;
        let _ = crate::snapshot::parse(&good);
        let cut = flip.0 % (good.len() + 1);
        let _ = crate::snapshot::parse(&good[..cut]);
    }
}
