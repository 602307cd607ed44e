//! Example session function: a key/value "room" (named i64 counters, plus a ballast buffer for
//! heap-size benchmarks) kept in memory from one message to the next.
//!
//! Guest contract for WasmBox sessions:
//! - The module is a WASI preview1 *reactor* (this crate is a `cdylib`): it exports `_initialize`
//!   (wasi-libc's, see build.rs), which the runtime calls once when the session is created, and a
//!   message handler of type `() -> ()` (`handle` by default; `other` is a second one, for testing
//!   a configured handler name).
//! - Each message is the handler's stdin (read it to the end); the reply is what it writes to
//!   stdout. File descriptors do not persist between messages, and std's stdout buffers in linear
//!   memory, so a handler writes its reply and flushes stdout before returning.
//! - When the handler returns normally, the runtime snapshots linear memory and the mutable
//!   globals, and restores them into a fresh instance for the next message: statics and the heap
//!   persist. A message that traps (a panic: `panic = "abort"`), runs past its deadline or exceeds
//!   its memory limit is rolled back; only a normal return commits.
//!
//! Messages (one line; trailing whitespace ignored), each answered with one line:
//! `incr KEY [N]` (new value), `get KEY` (value, 0 if missing), `set KEY N` (`ok`),
//! `del KEY` (1 if it existed, else 0), `keys` (`KEY=VALUE` pairs sorted, space-separated),
//! `trap KEY` / `spin KEY` (increment KEY, then trap / loop forever: both must be rolled back),
//! `grow MIB` (allocate and touch MIB MiB, then free it), `fill MIB [SEED]` (replace the ballast
//! with MIB MiB of partly compressible pseudo-random bytes), `touch [N]` (change N ballast bytes,
//! reply the ballast length), `sum` (FNV-1a hash of the ballast) and `echo REST` (reply REST
//! verbatim). Anything else: `unknown
//! command` on stderr and exit status 2.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Mutex;

/// The counters.
static STATE: Mutex<BTreeMap<String, i64>> = Mutex::new(BTreeMap::new());
/// Bulk heap data for benchmarks (`fill`, `touch`).
static BALLAST: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// How many bytes `touch` has changed so far: picks the next positions.
static TOUCHES: Mutex<u64> = Mutex::new(0);

#[unsafe(no_mangle)]
pub extern "C" fn handle() {
    let mut message = Vec::new();
    std::io::stdin().lock().read_to_end(&mut message).unwrap_or_else(|e| fail(&format!("reading stdin: {e}")));
    // `echo` replies the rest of the message verbatim, without adding a newline.
    if let Some(rest) = message.strip_prefix(b"echo ") {
        return reply(rest);
    } else if message.trim_ascii_end() == b"echo" {
        return reply(b"");
    }
    let Ok(text) = std::str::from_utf8(&message) else { fail("unknown command") };
    let words: Vec<&str> = text.split_whitespace().collect();
    let answer = match words[..] {
        ["incr", key] => incr(key, 1).to_string(),
        ["incr", key, n] => incr(key, number(n)).to_string(),
        ["get", key] => get(key).to_string(),
        ["set", key, n] => {
            STATE.lock().unwrap().insert(key.to_string(), number(n));
            "ok".to_string()
        }
        ["del", key] => u8::from(STATE.lock().unwrap().remove(key).is_some()).to_string(),
        ["keys"] => {
            let state = STATE.lock().unwrap();
            state.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
        ["trap", key] => {
            incr(key, 1);
            panic!("trap requested");
        }
        ["spin", key] => {
            incr(key, 1);
            // black_box makes the loop opaque, so it stays a real loop and the increment is
            // stored before it.
            loop {
                std::hint::black_box(&STATE);
            }
        }
        ["grow", mib] => {
            let mib: usize = number(mib);
            let mut block = vec![0u8; mib << 20];
            for i in (0..block.len()).step_by(4096) {
                block[i] = 1;
            }
            std::hint::black_box(&mut block);
            format!("grew {mib}")
        }
        ["fill", mib] => fill(number(mib), 1),
        ["fill", mib, seed] => fill(number(mib), number(seed)),
        ["touch"] => touch(1),
        ["touch", n] => touch(number(n)),
        ["sum"] => {
            // FNV-1a over the ballast: proves a heap came through a snapshot intact.
            let ballast = BALLAST.lock().unwrap();
            let hash =
                ballast.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            format!("{hash:016x}")
        }
        _ => fail("unknown command"),
    };
    reply(format!("{answer}\n").as_bytes());
}

/// A second handler: replies `other:` and the value of `count`.
#[unsafe(no_mangle)]
pub extern "C" fn other() {
    reply(format!("other:{}\n", get("count")).as_bytes());
}

fn incr(key: &str, n: i64) -> i64 {
    let mut state = STATE.lock().unwrap();
    let value = state.entry(key.to_string()).or_insert(0);
    *value = value.wrapping_add(n);
    *value
}

fn get(key: &str) -> i64 {
    STATE.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// Replaces the ballast with `mib` MiB: in each 64-byte line, 32 pseudo-random bytes (from
/// `seed`) and then 32 bytes of a fixed pattern, so it compresses to about half.
fn fill(mib: usize, seed: u64) -> String {
    let mut ballast = BALLAST.lock().unwrap();
    *ballast = Vec::new(); // free the old one first
    let mut data = vec![0u8; mib << 20];
    let mut x = seed.max(1);
    for line in data.chunks_exact_mut(64) {
        for word in line[..32].chunks_exact_mut(8) {
            x ^= x >> 12; // xorshift64*
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        line[32..].copy_from_slice(b"WasmBox session ballast pattern.");
    }
    *ballast = data;
    format!("filled {mib}")
}

/// Changes `n` bytes of the ballast at pseudo-random positions and replies its length.
fn touch(n: u64) -> String {
    let mut ballast = BALLAST.lock().unwrap();
    let mut touches = TOUCHES.lock().unwrap();
    let len = ballast.len();
    if len > 0 {
        for _ in 0..n {
            *touches += 1;
            // splitmix64 of the running count: a position that does not repeat soon.
            let mut z = touches.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let i = ((z ^ (z >> 31)) % len as u64) as usize;
            ballast[i] = ballast[i].wrapping_add(1);
        }
    }
    len.to_string()
}

fn number<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| fail(&format!("unknown command (not a number: {s:?})")))
}

/// Writes the reply and flushes it: nothing may stay in std's buffer (in linear memory).
fn reply(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).unwrap_or_else(|e| fail(&format!("writing stdout: {e}")));
}

/// Prints to stderr and exits with status 2 (not a normal return: nothing is kept).
fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}
