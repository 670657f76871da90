//! Engine integration tests (real sandboxes; they need root).

mod driver;
mod events;
mod runs;
mod runtime_egress;
mod traffic;
mod util;
mod versions;
