//! One test binary for the crate (see util.rs for the shared helpers).

mod counting_upstream;
mod util;

mod basic;
mod egress;
mod hostile;
mod lifecycle;
mod network;
mod runtime_egress;
mod spare;
