//! Engine integration tests (real sandboxes; they need root).

mod events;
mod runs;
mod traffic;
mod util;
mod versions;
