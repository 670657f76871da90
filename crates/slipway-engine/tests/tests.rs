//! Engine integration tests (real sandboxes; they need root).

#[path = "../../slipway-sandbox/tests/counting_upstream.rs"]
mod counting_upstream;
mod driver;
mod events;
mod runs;
mod runtime_egress;
mod traffic;
mod util;
mod versions;
