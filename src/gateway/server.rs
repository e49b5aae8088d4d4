//! Serving a listener: accept within the connection limit, HTTP/1.1 on each connection,
//! graceful drain within a deadline, lingering close.
//!
//! At the limit the listener stops accepting: new connections wait in the kernel's backlog
//! (served as soon as a connection closes) rather than being refused, so a burst is served
//! late rather than failed. Idle keep-alive connections close after [`HEADER_READ_TIMEOUT`],
//! so idle clients cannot hold the slots for long.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use tollgate_core::BoxError;

use super::wire::{linger, ConnIo};

/// How long a connection may take to send a request head, idle keep-alive time included.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest request head hyper buffers (bigger ones get a 431).
const MAX_HEAD_BYTES: usize = 256 * 1024;

/// How one listener serves.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Its name in logs (`public`, `internal`).
    pub name: &'static str,
    /// Open connections at most; `None` for no limit.
    pub max_connections: Option<usize>,
    /// How long a drain waits for connections before dropping them.
    pub drain_timeout: Duration,
}

/// A listener being served by a task of its own.
#[derive(Debug)]
pub struct Served {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Served {
    /// Serves `listener` until [`Served::drain`], each connection with the service
    /// `service(peer)` makes for its client's address.
    pub fn spawn<F, S, B>(
        listener: TcpListener,
        service: F,
        options: ServeOptions,
    ) -> std::io::Result<Served>
    where
        F: Fn(SocketAddr) -> S + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Unpin
            + Send
            + 'static,
        S::Future: Send + Unpin + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, service, options, stopped));
        Ok(Served { addr, stop, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the open connections finish their requests (idle ones close at
    /// once) within the drain timeout, drops the rest, and returns when all are closed.
    pub async fn drain(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop<F, S, B>(
    listener: TcpListener,
    service: F,
    options: ServeOptions,
    mut stopped: watch::Receiver<bool>,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Unpin
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let builder = Arc::new(builder);
    let slots = options.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let mut connections = JoinSet::new();
    loop {
        // A slot first: at the limit, connections stay in the backlog, unaccepted.
        let permit = match &slots {
            None => None,
            Some(slots) => tokio::select! {
                permit = Arc::clone(slots).acquire_owned() => permit.ok(),
                _ = stopped.wait_for(|s| *s) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            },
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(listener = options.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            Arc::clone(&builder),
            service(peer),
            stopped.clone(),
            permit,
        ));
    }
    drop(listener);
    let open = connections.len();
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = options.name,
            open = connections.len(),
            "drain timeout: dropping the connections still open"
        );
        connections.shutdown().await;
    } else if open > 0 {
        tracing::info!(listener = options.name, "all connections drained");
    }
}

/// One connection: HTTP/1.1 until the client is done or the drain asks it to finish, then
/// a lingering close. Holds its slot (`_permit`) until the socket is closed.
async fn serve_connection<S, B>(
    stream: TcpStream,
    builder: Arc<http1::Builder>,
    service: S,
    mut stopped: watch::Receiver<bool>,
    _permit: Option<OwnedSemaphorePermit>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Unpin
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let mut conn = builder.serve_connection(TokioIo::new(ConnIo::new(stream)), service);
    let mut stopping = pin!(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let mut asked_to_finish = false;
    // Polled without hyper's own shutdown, so the socket comes back for the lingering close.
    let result = poll_fn(|cx| {
        if !asked_to_finish && stopping.as_mut().poll(cx).is_ready() {
            Pin::new(&mut conn).graceful_shutdown();
            asked_to_finish = true;
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    linger(conn.into_parts().io.into_inner()).await;
}
