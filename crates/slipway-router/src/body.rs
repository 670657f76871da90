//! Response and request body types of the router.
//!
//! One enum instead of a boxed trait object: every response the router sends is one of a few
//! shapes, and none of them is ever collected into memory except the small ones built here.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio_util::io::ReaderStream;

use crate::proxy::Checkin;
use crate::table::InFlightGuard;

/// Error type of the router's bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Chunk size when streaming a file from disk.
pub(crate) const FILE_CHUNK: usize = 64 * 1024;

/// The body of every response the router sends.
pub struct RouterBody {
    kind: Kind,
}

enum Kind {
    /// A small body held in memory (pages, small files); `None` once sent.
    Full(Option<Bytes>),
    /// An app's response, streamed. The guard keeps the route's in-flight count up until the
    /// body is finished or dropped, so draining waits for downloads too; the connection goes
    /// back to its pool only if the body was read to the end.
    Proxied {
        inner: Incoming,
        checkin: Option<Checkin>,
        guard: InFlightGuard,
    },
    /// A file streamed from disk, with exactly `remaining` bytes left to send. Reads go
    /// through `tokio::fs` (the blocking pool): for a 1 MiB file that was about 1.8x the
    /// requests/s of `pread` on the I/O thread (`docs/bench-router.md`), as reading one chunk
    /// overlaps with writing the previous one.
    File {
        stream: ReaderStream<tokio::io::Take<tokio::fs::File>>,
        remaining: u64,
    },
}

impl RouterBody {
    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full(if bytes.is_empty() { None } else { Some(bytes) }),
        }
    }

    pub(crate) fn proxied(inner: Incoming, checkin: Checkin, guard: InFlightGuard) -> Self {
        Self {
            kind: Kind::Proxied {
                inner,
                checkin: Some(checkin),
                guard,
            },
        }
    }

    pub(crate) fn file(file: tokio::fs::File, len: u64) -> Self {
        use tokio::io::AsyncReadExt as _;
        let stream = ReaderStream::with_capacity(file.take(len), FILE_CHUNK);
        Self {
            kind: Kind::File {
                stream,
                remaining: len,
            },
        }
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Proxied {
                inner,
                checkin,
                guard,
            } => {
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                if frame.is_none() || inner.is_end_stream() {
                    // Hand the connection back as soon as the app's answer is complete, not
                    // when the client has received it.
                    if let Some(checkin) = checkin.take() {
                        checkin.finish(guard.pool(), frame.as_ref().is_none_or(Result::is_ok));
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Kind::File { stream, remaining } => {
                use futures_util::Stream as _;
                match Pin::new(stream).poll_next(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(chunk))) => {
                        *remaining = remaining.saturating_sub(chunk.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    // The file shrank under us: fail the response rather than send fewer bytes
                    // than the Content-Length promised.
                    Poll::Ready(None) if *remaining > 0 => {
                        Poll::Ready(Some(Err("file ended before its announced length".into())))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Proxied { inner, .. } => inner.is_end_stream(),
            Kind::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Proxied { inner, .. } => inner.size_hint(),
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

impl Drop for RouterBody {
    fn drop(&mut self) {
        if let Kind::Proxied {
            inner,
            checkin,
            guard,
        } = &mut self.kind
        {
            if let Some(checkin) = checkin.take() {
                // The server may drop a body it knows is complete without polling it to `None`
                // (empty bodies, HEAD); anything else was abandoned half-way.
                checkin.finish(guard.pool(), inner.is_end_stream());
            }
        }
    }
}

/// The body of a request forwarded to an app: the client's body, cut off when it crosses the
/// configured limit.
pub(crate) struct LimitedBody {
    /// `None` once the limit was crossed: the rest of the client's body then waits in
    /// [`Overflow`] for the proxy to drain it.
    inner: Option<Incoming>,
    remaining: u64,
    /// `None` for a body that is already complete (most requests): it cannot cross the
    /// limit, and this saves an allocation per request.
    overflow: Option<Arc<Overflow>>,
}

/// Shared between a [`LimitedBody`] and the proxy that sent it: set when the limit was
/// crossed, so the proxy answers 413 instead of 502 and can drain what the client still sends.
#[derive(Default)]
pub(crate) struct Overflow {
    exceeded: AtomicBool,
    rest: Mutex<Option<Incoming>>,
}

impl Overflow {
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }

    /// The unread remainder of a body that crossed the limit.
    pub(crate) fn take_rest(&self) -> Option<Incoming> {
        self.rest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl LimitedBody {
    pub(crate) fn new(inner: Incoming, limit: u64, overflow: Option<Arc<Overflow>>) -> Self {
        Self {
            inner: Some(inner),
            remaining: limit,
            overflow,
        }
    }
}

/// The request body crossed [`crate::RouterConfig::max_request_body`].
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
pub(crate) struct BodyTooLarge;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Some(Err(BodyTooLarge.into())));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        let rest = this.inner.take();
                        if let Some(overflow) = &this.overflow {
                            overflow.exceeded.store(true, Ordering::Release);
                            *overflow
                                .rest
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner()) = rest;
                        }
                        return Poll::Ready(Some(Err(BodyTooLarge.into())));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}
