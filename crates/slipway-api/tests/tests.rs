//! slipway-api integration tests: in-process through `app(state)`, and a few over a real
//! socket.

mod util;

mod agents;
mod audit;
mod errors;
mod gates;
mod openapi;
mod socket;
mod spec;
