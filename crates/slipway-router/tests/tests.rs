//! Integration tests of the app-traffic router, all over real loopback sockets.

mod util;

mod proxy;
mod routing;
mod server;
mod static_files;
mod swap;
mod websocket;
