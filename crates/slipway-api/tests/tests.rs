//! slipway-api integration tests: in-process through `app(state)`, and a few over a real
//! socket.

mod util;

mod agents;
mod errors;
mod gates;
mod audit;
mod openapi;
mod socket;
mod spec;
