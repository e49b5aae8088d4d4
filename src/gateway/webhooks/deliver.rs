//! The dispatcher: claims due deliveries, sends each one signed, records the attempt and
//! schedules retries with exponential backoff for 24 h.
//!
//! Every attempt resolves the endpoint's host again and connects to an address it checked
//! ([`address::resolve`]), so a name that starts resolving to an internal address is refused
//! at that attempt and DNS cannot swap the address between the check and the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use tollgate_core::{Clock as _, SystemClock};

use super::address::{self, Target};
use super::{
    Attempt, DueDelivery, WebhookOptions, Webhooks, ATTEMPT_TIMEOUT, MAX_BACKOFF, RETRY_FOR,
};

/// How often the dispatcher looks for due deliveries when nothing wakes it.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Attempts in flight per replica.
pub const CONCURRENCY: usize = 16;
/// How long a claimed delivery is reserved for the replica that claimed it: longer than an
/// attempt, so no other replica sends it meanwhile.
pub const LEASE: Duration = Duration::from_secs(15);

/// The wait before attempt `attempt + 1` after `attempt` failed: `base`, doubling, at most
/// [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Starts the dispatcher of this replica.
pub fn spawn(webhooks: Webhooks, options: WebhookOptions, tls: ClientConfig) -> JoinHandle<()> {
    let tls = Arc::new(tls);
    let wake = webhooks.woken();
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            let free = permits.available_permits();
            if free > 0 {
                let now = SystemClock.now_ms();
                match webhooks
                    .store
                    .claim_due(now, LEASE.as_millis() as u64, free)
                    .await
                {
                    Ok(due) => {
                        let full = due.len() == free;
                        for delivery in due {
                            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                                return;
                            };
                            let webhooks = webhooks.clone();
                            let options = options.clone();
                            let tls = Arc::clone(&tls);
                            tokio::spawn(async move {
                                attempt(&webhooks, &options, &tls, delivery).await;
                                drop(permit);
                            });
                        }
                        if full {
                            // More may be due: look again at once.
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming webhook deliveries failed"),
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    })
}

/// Sends one delivery and records the outcome.
async fn attempt(
    webhooks: &Webhooks,
    options: &WebhookOptions,
    tls: &Arc<ClientConfig>,
    d: DueDelivery,
) {
    let started_ms = SystemClock.now_ms();
    let started = Instant::now();
    let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, send(options, tls, &d)).await;
    let (status, error) = match outcome {
        Ok(Ok(status)) => (Some(status.as_u16()), None),
        Ok(Err(e)) => (None, Some(e)),
        Err(_) => (
            None,
            Some(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
        ),
    };
    let record = Attempt {
        at_ms: started_ms,
        status,
        error,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let retry_at = if record.succeeded() {
        None
    } else {
        let at = SystemClock
            .now_ms()
            .saturating_add(backoff(options.retry_base, d.attempt).as_millis() as u64);
        (at <= d.event_ms.saturating_add(RETRY_FOR.as_millis() as u64)).then_some(at)
    };
    if record.succeeded() {
        tracing::debug!(delivery = %d.id, event = %d.kind, attempt = d.attempt, "webhook delivered");
    } else {
        tracing::info!(
            delivery = %d.id,
            event = %d.kind,
            attempt = d.attempt,
            status = ?record.status,
            error = record.error.as_deref().unwrap_or(""),
            gave_up = retry_at.is_none(),
            "webhook attempt failed"
        );
    }
    if let Err(e) = webhooks.store.record_attempt(d.id, record, retry_at).await {
        // The lease runs out and the delivery is attempted again: at least once.
        tracing::warn!(delivery = %d.id, error = %e, "recording a webhook attempt failed");
    }
}

/// POSTs the signed body to the endpoint; the receiver's status, or why there is none.
async fn send(
    options: &WebhookOptions,
    tls: &Arc<ClientConfig>,
    d: &DueDelivery,
) -> Result<StatusCode, String> {
    let target = address::parse(&d.url, options.allow_private)?;
    let addrs = address::resolve(&target, options.allow_private).await?;
    let mut last = String::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return exchange(&target, tls, stream, d).await;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

async fn exchange(
    target: &Target,
    tls: &Arc<ClientConfig>,
    stream: TcpStream,
    d: &DueDelivery,
) -> Result<StatusCode, String> {
    let unix = SystemClock.now_ms() / 1_000;
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let default_port = if target.tls { 443 } else { 80 };
    let host_header = if target.port == default_port {
        host
    } else {
        format!("{host}:{}", target.port)
    };
    let req = Request::post(target.path_and_query.as_str())
        .header(HOST, host_header)
        .header(CONTENT_TYPE, "application/json")
        .header(
            USER_AGENT,
            concat!("tollgate-webhooks/", env!("CARGO_PKG_VERSION")),
        )
        .header(
            "Tollgate-Signature",
            super::signature(&d.secret, unix, &d.body),
        )
        .header("Tollgate-Event", d.kind.as_str())
        .header("Tollgate-Event-Id", d.event_id.to_string())
        .header("Tollgate-Delivery", d.id.to_string())
        .header("Tollgate-Attempt", d.attempt.to_string())
        .body(Full::new(Bytes::from(d.body.clone())))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    if target.tls {
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("{} is not a TLS server name: {e}", target.host))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {} failed: {e}", target.host))?;
        post(TokioIo::new(stream), req).await
    } else {
        post(TokioIo::new(stream), req).await
    }
}

async fn post<I>(io: I, req: Request<Full<Bytes>>) -> Result<StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("the request failed: {e}"));
    // The body of the answer is not read: only its status counts.
    conn.abort();
    res.map(|r| r.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_an_hour() {
        let base = Duration::from_secs(30);
        assert_eq!(backoff(base, 1), Duration::from_secs(30));
        assert_eq!(backoff(base, 2), Duration::from_secs(60));
        assert_eq!(backoff(base, 5), Duration::from_secs(480));
        assert_eq!(backoff(base, 8), MAX_BACKOFF);
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
        assert_eq!(backoff(base, 0), Duration::from_secs(30));
    }
}
