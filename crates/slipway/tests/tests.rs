//! End-to-end tests of the `slipway` binary: a real `slipway serve` child process and the CLI
//! commands run against it.

mod util;

mod cli;
mod deploy;
mod events;
mod serve;
mod trust;
mod versions;
