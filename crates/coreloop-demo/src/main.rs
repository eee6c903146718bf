//! The demo binary: everything is in the library (see its documentation).

fn main() -> anyhow::Result<()> {
    coreloop_demo::main()
}
