//! Shows what a fuzz input does, for triage: the decoded message (and its re-encoding) for
//! `message_decode`, or the plan, the bytes sent and the responder's answer for
//! `http_serve`. Then runs the target's checks, so a crashing input panics here too, with
//! an ordinary (non-sanitizer) backtrace.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example show -- http_serve FILE...
//! cargo run --manifest-path fuzz/Cargo.toml --example show -- message_decode FILE...
//! ```

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .expect("usage: show <message_decode|http_serve> FILE...");
    for file in args {
        let data = std::fs::read(&file).unwrap_or_else(|err| panic!("{file}: {err}"));
        println!("=== {file} ({} bytes)", data.len());
        match target.as_str() {
            "message_decode" => {
                println!("{:?}", coreloop_ipc::Message::decode(&data));
                coreloop_fuzz::check_message(&data);
            }
            "http_serve" => {
                let Some((plan, input)) = coreloop_fuzz::plan(&data) else {
                    println!("(ignored: shorter than 2 bytes or too long)");
                    continue;
                };
                println!("{plan:?}");
                println!(
                    "--- sent\n{}",
                    String::from_utf8_lossy(input).escape_debug()
                );
                let out = coreloop_fuzz::run_http(&plan, input);
                println!("--- answered\n{}", String::from_utf8_lossy(&out));
                coreloop_fuzz::check_responses(&out, input);
            }
            other => panic!("unknown target {other}"),
        }
        println!("=== ok");
    }
}
