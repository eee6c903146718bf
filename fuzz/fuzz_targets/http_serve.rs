//! The demo's HTTP/1.1 responder (`coreloop_demo::serve`, a dependency of `coreloop_fuzz`)
//! serving one connection over `tokio::io::duplex`, on a paused clock.
//!
//! Input: two plan bytes (limits profile, half-close or not, pause between chunks, chunk
//! size; see `coreloop_fuzz::Plan`), then the bytes the client sends. The properties are
//! listed on `coreloop_fuzz::check_http`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coreloop_fuzz::check_http(data));
