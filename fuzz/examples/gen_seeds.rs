//! Writes the seed corpus: `fuzz/corpus/message_decode/` (encoded channel messages of every
//! kind, plus a few malformed ones) and `fuzz/corpus/http_serve/` (HTTP requests: valid,
//! pipelined, chunked, split, slow, and invalid). Re-run after changing the wire format or
//! the responder:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```
//!
//! Existing files with the same names are overwritten; other files are left alone.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

use coreloop_ipc::{ConnBatch, ConnMeta, MAX_BATCH, MAX_MESSAGE_LEN, Message, PeerAddr};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let messages = message_seeds();
    let requests = http_seeds();
    write_all(&root.join("message_decode"), &messages)?;
    write_all(&root.join("http_serve"), &requests)?;
    println!(
        "wrote {} message_decode and {} http_serve seeds under {}",
        messages.len(),
        requests.len(),
        root.display()
    );
    Ok(())
}

fn write_all(dir: &PathBuf, seeds: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let len = msg.encode(&mut buf).expect("encode");
    buf[..len].to_vec()
}

fn meta(id: u64, listener: u16, peer: PeerAddr) -> ConnMeta {
    ConnMeta { id, listener, peer }
}

fn message_seeds() -> Vec<(String, Vec<u8>)> {
    let v4 = PeerAddr::Inet(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(192, 0, 2, 7),
        54321,
    )));
    let v6 = PeerAddr::Inet(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        443,
        7,
        2,
    )));
    let mut mixed = ConnBatch::new();
    for (i, peer) in [PeerAddr::Unknown, PeerAddr::Unix, v4, v6]
        .into_iter()
        .enumerate()
    {
        assert!(mixed.push(meta(i as u64 + 10, i as u16, peer)));
    }
    let mut full = ConnBatch::new();
    for i in 0..MAX_BATCH {
        assert!(full.push(meta(u64::MAX - i as u64, u16::MAX, v6)));
    }
    let valid = [
        (
            "conns-one-v4",
            Message::Conns(ConnBatch::one(meta(1, 0, v4))),
        ),
        (
            "conns-one-unix",
            Message::Conns(ConnBatch::one(meta(2, 1, PeerAddr::Unix))),
        ),
        ("conns-mixed", Message::Conns(mixed)),
        ("conns-full-v6", Message::Conns(full)),
        ("drain", Message::Drain { timeout_ms: 30_000 }),
        ("ready", Message::Ready { pid: 4242 }),
        (
            "failed-ascii",
            Message::Failed {
                reason: "handler factory panicked".into(),
            },
        ),
        (
            "failed-utf8",
            Message::Failed {
                reason: "échec: ハンドラ 🦀".into(),
            },
        ),
        (
            // 500 bytes, the longest reason that survives encoding whole.
            "failed-max-reason",
            Message::Failed {
                reason: "é".repeat(250),
            },
        ),
        ("retiring", Message::Retiring),
        (
            "status",
            Message::Status {
                live: 3,
                closed: 1_000_000,
                rss_kib: 20_480,
            },
        ),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = valid
        .iter()
        .map(|(name, msg)| (format!("{name}.bin"), encode(msg)))
        .collect();
    let ready = encode(&Message::Ready { pid: 1 });
    let mut trailing = ready.clone();
    trailing.push(0);
    seeds.extend([
        ("bad-version.bin".to_owned(), vec![2, 16, 1, 0, 0, 0]),
        ("bad-kind.bin".to_owned(), vec![1, 99]),
        (
            "bad-truncated.bin".to_owned(),
            ready[..ready.len() - 1].to_vec(),
        ),
        ("bad-trailing.bin".to_owned(), trailing),
        ("bad-batch-zero.bin".to_owned(), vec![1, 1, 0]),
        ("bad-peer-tag.bin".to_owned(), {
            let mut b = vec![1, 1, 1];
            b.extend_from_slice(&[0; 10]);
            b.push(5);
            b
        }),
        // A reason longer than encode keeps, and not UTF-8: decodes, but lossily.
        ("failed-long-invalid-utf8.bin".to_owned(), {
            let mut b = vec![1, 17];
            b.extend_from_slice(&600u16.to_le_bytes());
            b.extend(std::iter::repeat_n(0xff, 600));
            b
        }),
    ]);
    seeds
}

/// Plan byte 0: limits profile (bits 0–1), keep open (bit 2), pause (bits 3–4).
const DEFAULTS: u8 = 0;
const TINY: u8 = 1;
const SMALL: u8 = 2;
const HUGE: u8 = 3;
const KEEP_OPEN: u8 = 4;
const GAP_1MS: u8 = 1 << 3;
const GAP_3S: u8 = 2 << 3;
const GAP_11S: u8 = 3 << 3;

fn http(flags: u8, chunk: u8, body: &str) -> Vec<u8> {
    let mut seed = vec![flags, chunk];
    seed.extend_from_slice(body.as_bytes());
    seed
}

fn http_seeds() -> Vec<(String, Vec<u8>)> {
    let get = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let seeds = [
        ("get-root", http(DEFAULTS, 0, get)),
        ("get-root-split-bytes", http(DEFAULTS, 1, get)),
        (
            "head-root",
            http(DEFAULTS, 0, "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ),
        (
            "whoami-http10-keepalive",
            http(
                KEEP_OPEN,
                0,
                "GET /whoami HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            ),
        ),
        (
            "lf-only",
            http(DEFAULTS, 0, "GET /whoami HTTP/1.1\nHost: x\n\n"),
        ),
        (
            "pipelined",
            http(
                DEFAULTS,
                0,
                "GET / HTTP/1.1\r\nHost: a\r\n\r\n\
                 HEAD /whoami HTTP/1.1\r\nHost: a\r\n\r\n\
                 GET /nope HTTP/1.1\r\nHost: a\r\n\r\n\
                 DELETE / HTTP/1.1\r\nHost: a\r\n\r\n\
                 GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n\
                 GET /after-close HTTP/1.1\r\n\r\n",
            ),
        ),
        (
            "pipelined-backpressure",
            http(
                SMALL,
                7,
                &"GET / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n".repeat(4),
            ),
        ),
        (
            "sleep-burn",
            http(
                DEFAULTS,
                0,
                "GET /sleep?ms=1 HTTP/1.1\r\n\r\nGET /burn?ms=0 HTTP/1.1\r\n\r\n\
                 GET /sleep?ms=99 HTTP/1.1\r\n\r\nGET /sleep HTTP/1.1\r\n\r\n",
            ),
        ),
        (
            "post-discard-length",
            http(
                DEFAULTS,
                0,
                "POST /discard HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world\
                 GET /discard HTTP/1.1\r\n\r\n",
            ),
        ),
        (
            "post-discard-chunked",
            http(
                DEFAULTS,
                5,
                "POST /discard HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                 5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: yes\r\n\r\n\
                 GET / HTTP/1.1\r\n\r\n",
            ),
        ),
        (
            "expect-continue",
            http(
                GAP_1MS,
                // The head alone, then the body once the server has answered 100.
                67,
                "POST /discard HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
            ),
        ),
        (
            "body-truncated-by-close",
            http(
                DEFAULTS,
                0,
                "POST /discard HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort",
            ),
        ),
        (
            "huge-limits-max-length",
            http(
                HUGE,
                0,
                "POST /discard HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nxx",
            ),
        ),
        (
            "huge-limits-max-chunk",
            http(
                HUGE,
                0,
                "POST /discard HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nxx",
            ),
        ),
        ("bad-request-line", http(DEFAULTS, 0, "GET\r\n\r\n")),
        (
            "bad-cl-and-te",
            http(
                DEFAULTS,
                0,
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
        ),
        (
            "bad-te-unknown",
            http(
                DEFAULTS,
                0,
                "POST / HTTP/1.1\r\nTransfer-Encoding: br, chunked\r\n\r\n0\r\n\r\n",
            ),
        ),
        (
            "bad-chunk-size",
            http(
                DEFAULTS,
                0,
                "POST /discard HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ),
        ),
        (
            "bad-expect",
            http(DEFAULTS, 0, "GET / HTTP/1.1\r\nExpect: teapot\r\n\r\n"),
        ),
        (
            "too-large-body",
            http(
                SMALL,
                0,
                "POST /discard HTTP/1.1\r\nContent-Length: 65\r\n\r\n",
            ),
        ),
        (
            "tiny-too-many-headers",
            http(TINY, 0, "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"),
        ),
        (
            "small-uri-too-long",
            http(
                SMALL,
                0,
                &format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(80)),
            ),
        ),
        (
            "slow-head-408",
            http(
                KEEP_OPEN | GAP_11S,
                6,
                "GET / HTTP/1.1\r\nHost: slow\r\n\r\n",
            ),
        ),
        (
            "slow-keepalive-then-idle",
            http(
                KEEP_OPEN | GAP_3S,
                18,
                "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            ),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, bytes)| (format!("{name}.http"), bytes))
        .collect()
}
