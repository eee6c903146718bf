//! The demo (package `coreloop-demo`) as a binary of this package, so that the tests get
//! it as `CARGO_BIN_EXE_demo`, built by cargo before any of them runs, instead of building
//! another package's binary themselves. It is the demo: the same `main`, run by the
//! supervisor and every worker alike.

fn main() -> anyhow::Result<()> {
    coreloop_demo::main()
}
