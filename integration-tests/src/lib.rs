//! Black-box test harness for coreloop: runs the real demo binary (`coreloop-demo`), or
//! one of the fixture binaries of this package (`src/bin/fixture-*.rs`, built on the
//! [`fixture`] module), and looks at it only from the outside, through sockets, signals,
//! its log on stderr and `/proc`.
//!
//! - [`binary`]: finding the demo, and building the examples.
//! - [`server`]: [`Server`], a running server under test, and how to start it.
//! - [`events`]: the captured log as lifecycle [`Event`]s (the stable `event` field and
//!   typed fields), and the waits on them.
//! - [`process`]: `/proc`, pidfds, signals, ports.
//! - [`http`]: a minimal blocking HTTP/1.1 client.
//! - [`load`]: requests with a deadline, and client threads in the background.
//!
//! Everything is re-exported here. Everything that waits takes a bounded timeout.

pub mod binary;
pub mod events;
pub mod fixture;
pub mod http;
pub mod load;
pub mod process;
pub mod server;

pub use binary::*;
pub use events::*;
pub use http::*;
pub use load::*;
pub use process::*;
pub use server::*;
