//! Engine integration tests (real sandboxes; they need root).

mod runs;
mod traffic;
mod util;
