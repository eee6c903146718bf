//! `coreloop_ipc::Message::decode` on arbitrary datagrams, and the encode/decode round trip
//! of everything it accepts. The properties are listed on `coreloop_fuzz::check_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coreloop_fuzz::check_message(data));
