//! Engine integration tests (real sandboxes; they need root).

mod runs;
mod events;
mod traffic;
mod util;
mod versions;
