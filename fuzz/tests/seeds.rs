//! Runs every file of the seed corpus (and of `regressions/`, once it exists) through the
//! fuzz harnesses, without libFuzzer: a quick check that the seeds and the harnesses agree
//! with the code, on the stable toolchain with no extra tools.
//!
//! ```text
//! cargo test --manifest-path fuzz/Cargo.toml
//! ```

use std::path::Path;

fn each_file(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("regressions").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .map(|entry| entry.expect("dir entry").path())
            .collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).expect("read seed");
            eprintln!("{}", path.display());
            check(&data);
            count += 1;
        }
    }
    count
}

#[test]
fn message_decode_seeds() {
    assert!(each_file("message_decode", coreloop_fuzz::check_message) > 0);
}

#[test]
fn http_serve_seeds() {
    assert!(each_file("http_serve", coreloop_fuzz::check_http) > 0);
}
