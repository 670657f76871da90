//! What the router benches share: the app they proxy to and the route that reaches it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use slipway_router::Upstream;
use tokio::net::{TcpListener, TcpStream};

/// Serves `body` to every request on `listener`, over HTTP/1.1 keep-alive, until the runtime
/// stops.
pub async fn serve_app(listener: TcpListener, body: &'static [u8]) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |_req| async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A route to an app on this machine's loopback.
pub struct Loopback(pub SocketAddr);

impl Upstream for Loopback {
    fn connect(&self) -> futures_util::future::BoxFuture<'static, std::io::Result<TcpStream>> {
        let addr = self.0;
        Box::pin(async move { TcpStream::connect(addr).await })
    }

    fn name(&self) -> String {
        "bench app".into()
    }
}
