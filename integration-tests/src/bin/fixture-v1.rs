//! Fixture: version 1 of a server with a version in `/whoami` (binary-upgrade tests).

fn main() -> anyhow::Result<()> {
    coreloop_integration_tests::fixture::versioned_main("1.0.0-test")
}
