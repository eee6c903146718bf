//! Fuzz harnesses for coreloop, shared by the cargo-fuzz targets in `fuzz_targets/` and by
//! the seed regression test in `tests/seeds.rs`. See `docs/fuzzing.md`.
//!
//! - [`check_message`]: `coreloop_ipc::Message::decode` on arbitrary bytes, and the
//!   encode/decode round trip of everything it accepts.
//! - [`check_http`]: the demo's HTTP/1.1 responder (`coreloop_demo::serve`, from
//!   `crates/coreloop-demo` without its command line) driven over an in-memory duplex
//!   stream on a paused tokio clock, with a check of everything it writes back.

use std::time::Duration;

use coreloop::ShutdownSignal;
use coreloop_ipc::{MAX_BATCH, MAX_LISTENER_TEXT, MAX_MESSAGE_LEN, Message, ProtocolError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use coreloop_demo::{Identity, Limits};

/// `message::MAX_REASON_LEN` (private in coreloop-ipc): `encode` cuts a
/// `Message::Failed` reason to at most this many bytes, at a char boundary.
const MAX_REASON_LEN: usize = 500;

/// Decodes `data` as one channel datagram. Never panics unless a property fails:
///
/// - decoding never panics, and errors format without panicking;
/// - whatever decodes encodes into a `MAX_MESSAGE_LEN` buffer (documented: "always can"),
///   into a buffer of exactly the encoded length, and reports `BufferTooSmall` for one
///   byte less;
/// - the encoding decodes back to the same message, except that a `Failed` reason longer
///   than `MAX_REASON_LEN` bytes comes back cut at a char boundary (`encode`'s documented
///   behaviour, so the round trip is checked against the cut reason);
/// - the encoding is canonical: when nothing was cut or replaced (reason valid UTF-8 of at
///   most `MAX_REASON_LEN` bytes), the encoding is byte-for-byte the input;
/// - a `Conns` batch holds 1 to `MAX_BATCH` connections and needs as many descriptors; a
///   `Listener` (texts of at most `MAX_LISTENER_TEXT` bytes) and `LoopClock` need one; others none.
pub fn check_message(data: &[u8]) {
    let msg = match Message::decode(data) {
        Ok(msg) => msg,
        Err(err) => {
            let _ = err.to_string();
            return;
        }
    };
    let _ = msg.kind_name();
    match &msg {
        Message::Conns(batch) => {
            assert!(
                (1..=MAX_BATCH).contains(&batch.len()),
                "batch of {}",
                batch.len()
            );
            assert_eq!(msg.fd_count(), batch.len());
        }
        Message::Listener { spec, name, .. } => {
            assert!(spec.len() <= MAX_LISTENER_TEXT && name.len() <= MAX_LISTENER_TEXT);
            assert_eq!(msg.fd_count(), 1);
        }
        Message::LoopClock => assert_eq!(msg.fd_count(), 1),
        _ => assert_eq!(msg.fd_count(), 0),
    }

    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let len = msg
        .encode(&mut buf)
        .unwrap_or_else(|err| panic!("{msg:?} decoded but does not encode: {err}"));
    let encoded = &buf[..len];

    // Exactly `len` bytes are enough; one less is not.
    let mut exact = vec![0u8; len];
    assert_eq!(msg.encode(&mut exact), Ok(len));
    assert_eq!(exact, encoded);
    let mut short = vec![0u8; len - 1];
    assert!(matches!(
        msg.encode(&mut short),
        Err(ProtocolError::BufferTooSmall(_))
    ));

    // What the encoding must decode to: the message itself, with a long reason cut.
    let mut expected = msg.clone();
    let mut lossless = true;
    if let Message::Failed { reason } = &mut expected {
        lossless = reason.as_bytes() == &data[4..] && reason.len() <= MAX_REASON_LEN;
        let mut cut = reason.len().min(MAX_REASON_LEN);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let again = Message::decode(encoded)
        .unwrap_or_else(|err| panic!("encoding of {msg:?} does not decode: {err}"));
    assert_eq!(again, expected, "round trip changed the message");
    if lossless {
        assert_eq!(encoded, data, "encoding of {msg:?} is not the input");
    }

    // Stable after one round trip.
    let mut buf2 = [0u8; MAX_MESSAGE_LEN];
    let len2 = again.encode(&mut buf2).expect("re-encode");
    assert_eq!(
        &buf2[..len2],
        encoded,
        "second encoding differs from the first"
    );
}

/// Largest input [`check_http`] feeds (bigger inputs are ignored): the duplex buffer holds
/// all of it, so the client never blocks on a server that has stopped reading.
pub const MAX_HTTP_INPUT: usize = 60 * 1024;

/// Virtual time `serve` may take beyond the client's own pauses: far more than any of the
/// responder's timeouts (the longest default is the 75 s idle timeout) add up to.
const SLACK: Duration = Duration::from_secs(600);

/// How the client side of a [`check_http`] run behaves, taken from the input's first two
/// bytes. The rest of the input is the byte stream the client sends.
///
/// Byte 0 (flags):
/// - bits 0–1: limits profile (see [`limits_profile`]);
/// - bit 2: keep the connection open after sending (0: half-close, the server reads EOF);
/// - bits 3–4: pause after each chunk: 0 a task yield only, 1 1 ms, 2 3 s, 3 11 s (past
///   the default 10 s header and body timeouts).
///
/// Byte 1: chunk size in bytes; 0 sends everything in one write.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The responder's limits.
    limits: Limits,
    /// Do not half-close after the last chunk.
    keep_open: bool,
    /// Pause after each chunk (`None`: yield once).
    gap: Option<Duration>,
    /// Bytes per write.
    chunk: usize,
}

/// The limits used by profile `n` (0–3). `max_delay_ms` is 1 in every profile: `/burn`
/// spins on the real clock, and a long one would only make a slow input.
fn limits_profile(n: u8) -> Limits {
    let base = Limits {
        max_delay_ms: 1,
        ..Limits::default()
    };
    match n & 3 {
        // The demo's defaults.
        0 => base,
        // Tiny, with 1 s timeouts: most requests hit a limit, and the 3 s and 11 s pauses
        // between chunks outlast every timeout.
        1 => Limits {
            max_header_bytes: 32,
            max_headers: 1,
            max_request_line: 16,
            max_body_bytes: 0,
            max_pipeline: 1,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
            ..base
        },
        // Small, with the header array at its cap.
        2 => Limits {
            max_header_bytes: 256,
            max_headers: coreloop_demo::MAX_HEADERS_CAP,
            max_request_line: 64,
            max_body_bytes: 64,
            max_pipeline: 2,
            ..base
        },
        // The largest values the demo's command line accepts.
        _ => Limits {
            max_header_bytes: usize::MAX,
            max_headers: coreloop_demo::MAX_HEADERS_CAP,
            max_request_line: usize::MAX,
            max_body_bytes: u64::MAX,
            max_pipeline: 65536,
            ..base
        },
    }
}

/// Splits an input into its [`Plan`] and the bytes to send; `None` when too short or too
/// long.
pub fn plan(data: &[u8]) -> Option<(Plan, &[u8])> {
    let (&[flags, chunk], input) = data.split_first_chunk::<2>()?;
    if input.len() > MAX_HTTP_INPUT {
        return None;
    }
    let gap = match (flags >> 3) & 3 {
        0 => None,
        1 => Some(Duration::from_millis(1)),
        2 => Some(Duration::from_secs(3)),
        _ => Some(Duration::from_secs(11)),
    };
    let plan = Plan {
        limits: limits_profile(flags),
        keep_open: flags & 4 != 0,
        gap,
        chunk: if chunk == 0 {
            input.len().max(1)
        } else {
            usize::from(chunk)
        },
    };
    Some((plan, input))
}

/// Serves `data` (a [`Plan`] header, then the client's bytes) with `coreloop_demo::serve` and
/// checks the outcome; panics when a property fails:
///
/// - `serve` finishes within the client's pauses plus [`SLACK`] of virtual time (a
///   busy loop that never yields is caught by libFuzzer's `-timeout` instead);
/// - it returns `Ok`, or `UnexpectedEof` (the client closed in the middle of a body): the
///   client reads everything, so no write may fail;
/// - everything written back is a sequence of complete HTTP/1.1 responses (see
///   [`check_responses`]).
pub fn check_http(data: &[u8]) {
    let Some((plan, input)) = plan(data) else {
        return;
    };
    let output = run_http(&plan, input);
    check_responses(&output, input);
}

/// Runs `coreloop_demo::serve` against a client that sends `input` as `plan` says and reads
/// everything; returns what the server wrote.
pub fn run_http(plan: &Plan, input: &[u8]) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let chunks = u32::try_from(input.len().div_ceil(plan.chunk)).expect("input is bounded");
    let bound = plan.gap.unwrap_or_default() * chunks + SLACK;
    let who = Identity { worker: 0, pid: 1 };
    let shutdown = ShutdownSignal::default();

    runtime.block_on(async {
        let (mut server, client) = tokio::io::duplex(MAX_HTTP_INPUT + 4096);
        let (mut rd, mut wr) = tokio::io::split(client);
        let serving = async {
            let started = tokio::time::Instant::now();
            let result = tokio::time::timeout(
                bound,
                coreloop_demo::serve(&mut server, &who, &plan.limits, &shutdown),
            )
            .await;
            drop(server); // the client's reads end, its writes fail
            (result, started.elapsed())
        };
        let writing = async {
            for chunk in input.chunks(plan.chunk) {
                if wr.write_all(chunk).await.is_err() {
                    return; // the server is gone
                }
                match plan.gap {
                    None => tokio::task::yield_now().await,
                    Some(gap) => tokio::time::sleep(gap).await,
                }
            }
            if !plan.keep_open {
                let _ = wr.shutdown().await;
            }
            // Otherwise `wr` drops here, but `rd` keeps the stream open.
        };
        let reading = async {
            let mut out = Vec::new();
            rd.read_to_end(&mut out)
                .await
                .expect("reading the responses");
            out
        };
        let ((served, took), (), out) = tokio::join!(serving, writing, reading);
        match served {
            Ok(Ok(())) => {}
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Ok(Err(err)) => panic!("serve failed: {err} ({:?})", err.kind()),
            Err(_) => panic!("serve did not finish within {took:?} of virtual time"),
        }
        out
    })
}

/// Checks that `out` is a sequence of complete HTTP/1.1 responses, and returns how many
/// final (non-1xx) responses there are:
///
/// - each head parses, is HTTP/1.1, and has a status the responder uses;
/// - `100 Continue` has no body and no `Content-Length`; every other response has exactly
///   one `Content-Length`, followed by that many body bytes, or (an answer to `HEAD`) by
///   none, which is accepted at most as many times as the input contains `HEAD` (no body
///   the responder sends starts with `HTTP/`, so a head followed by a head or by the end
///   is bodyless);
/// - nothing follows a `Connection: close` response.
pub fn check_responses(out: &[u8], input: &[u8]) -> usize {
    let mut bodyless_allowed = input.windows(4).filter(|w| w == b"HEAD").count();
    let mut rest = out;
    let mut count = 0;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!(
                "response {count} is not a complete HTTP response ({other:?}): {:?}",
                String::from_utf8_lossy(rest)
            ),
        };
        assert_eq!(
            response.version,
            Some(1),
            "response {count} is not HTTP/1.1"
        );
        let code = response.code.expect("a complete response has a code");
        assert!(
            matches!(
                code,
                100 | 200 | 400 | 404 | 405 | 408 | 413 | 414 | 417 | 431 | 501
            ),
            "response {count}: unexpected status {code}"
        );
        let lengths: Vec<&[u8]> = response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| h.value)
            .collect();
        rest = &rest[head_len..];
        if code == 100 {
            assert!(lengths.is_empty(), "100 Continue with a Content-Length");
            continue;
        }
        assert_eq!(lengths.len(), 1, "response {count}: Content-Length headers");
        let length: usize = std::str::from_utf8(lengths[0])
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("response {count}: bad Content-Length {:?}", lengths[0]));
        let close = response.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
        });
        if length > 0 && (rest.is_empty() || rest.starts_with(b"HTTP/")) {
            assert!(
                bodyless_allowed > 0,
                "response {count} (status {code}) has Content-Length {length} but no body"
            );
            bodyless_allowed -= 1;
        } else {
            assert!(
                rest.len() >= length,
                "response {count}: Content-Length {length}, {} bytes follow",
                rest.len()
            );
            rest = &rest[length..];
        }
        if close {
            assert!(
                rest.is_empty(),
                "response {count} says Connection: close, yet {} more bytes follow",
                rest.len()
            );
        }
        count += 1;
    }
    count
}
