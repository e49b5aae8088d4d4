//! Serving the sandbox over HTTP/1.1 with keep-alive.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::SandboxService;

/// How long [`SandboxServer::shutdown`] lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running sandbox server. Dropping it stops accepting connections (in-flight requests
/// still finish); [`shutdown`](Self::shutdown) also waits for them.
pub struct SandboxServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for SandboxServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl SandboxServer {
    pub(crate) fn start(service: SandboxService, listener: TcpListener) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(service, listener, stopped));
        tracing::info!(%local_addr, "sandbox upstream listening");
        Ok(SandboxServer {
            local_addr,
            stop,
            task,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>`: the upstream base URL (endpoints are under `/api2/v2/`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Stops accepting connections, closes idle ones, and waits (up to 10 s) for in-flight
    /// requests to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // The accept loop only ends by itself; a panic in it is a bug worth surfacing.
        if let Err(e) = self.task.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

async fn accept_loop(
    service: SandboxService,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Idle keep-alive connections stay open (a gateway's pool reuses them); a timeout
        // here would race the client's reuse of the connection.
        .header_read_timeout(None);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Small request/response pairs: do not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let conn = builder.serve_connection(TokioIo::new(stream), service.clone());
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "sandbox connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            // A `true`, or the server handle dropped.
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("sandbox shutdown: in-flight requests did not finish in time");
    }
}
