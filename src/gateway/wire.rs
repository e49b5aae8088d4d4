//! The socket under hyper: answers to requests hyper cannot parse become `{error, code}` JSON
//! with an `X-Request-Id` like every other answer, and connections close without a reset.
//!
//! hyper answers a request head it cannot parse (over-long URI or headers, garbage) by itself
//! with an empty `400`, `414` or `431`, before any service sees the request. [`ConnIo`]
//! recognizes exactly that answer on its way out (a status line of those three followed only
//! by `connection`, `content-length: 0` and `date` headers — nothing the gateway's own
//! responses look like: they always carry a `content-type` and an `x-request-id`) and writes
//! the JSON answer in its place.
//!
//! [`linger`] is the lingering close nginx does: after the last answer, send a FIN and read
//! (and drop) what the client still sends, within bounds. Closing a socket with unread data
//! makes the kernel send a reset, and a client still writing a body the gateway refused (413)
//! then loses the answer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use tollgate_core::{ErrorCode, Rejection, RequestId};

/// The most a lingering close reads and drops.
pub const LINGER_BYTES: usize = 1024 * 1024;

/// The longest a lingering close waits for the client to finish sending.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// hyper's own answers to unparsable request heads, and the JSON message of each.
const AUTOMATIC: [(&[u8], StatusCode, &str); 3] = [
    (
        b"HTTP/1.1 400 Bad Request\r\n",
        StatusCode::BAD_REQUEST,
        "The request is not valid HTTP/1.1.",
    ),
    (
        b"HTTP/1.1 414 URI Too Long\r\n",
        StatusCode::URI_TOO_LONG,
        "The request URI is too long.",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "The request headers are too large.",
    ),
];

/// A client connection as hyper sees it.
#[derive(Debug)]
pub struct ConnIo {
    stream: TcpStream,
    replacement: Option<Replacement>,
}

/// The JSON answer written instead of hyper's empty one.
#[derive(Debug)]
struct Replacement {
    bytes: Vec<u8>,
    written: usize,
    /// The length of hyper's answer, reported as written once the replacement is out.
    claimed: Option<usize>,
}

impl ConnIo {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream) -> ConnIo {
        ConnIo {
            stream,
            replacement: None,
        }
    }

    /// Writes the replacement out; `Ready(Ok(Some(n)))` reports hyper's `n` bytes as written.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        let Some(r) = &mut self.replacement else {
            return Poll::Ready(Ok(None));
        };
        while r.written < r.bytes.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &r.bytes[r.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            r.written += n;
        }
        Poll::Ready(Ok(r.claimed.take()))
    }
}

/// The status and message of `head` when it is one of hyper's automatic answers.
fn automatic_answer(head: &[u8]) -> Option<(StatusCode, &'static str, Option<&[u8]>)> {
    if head.len() > 512 || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let (prefix, status, message) = AUTOMATIC.iter().find(|(p, ..)| head.starts_with(p))?;
    let mut date = None;
    let headers = &head[prefix.len()..head.len() - 2];
    for line in headers.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with(b"date: ") {
            date = Some(line);
        } else if lower != b"content-length: 0" && lower != b"connection: close" {
            return None;
        }
    }
    Some((*status, message, date))
}

/// The gateway's answer for `status`: the same head hyper would send, with a JSON body.
fn json_answer(status: StatusCode, message: &'static str, date: Option<&[u8]>) -> Vec<u8> {
    let body = Rejection::new(ErrorCode::InvalidRequest)
        .with_status(status)
        .with_message(message)
        .to_json_bytes();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        RequestId::generate().as_str(),
    )
    .into_bytes();
    if let Some(date) = date {
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none() {
            if let Some((status, message, date)) = automatic_answer(buf) {
                tracing::debug!(status = status.as_u16(), "answering an unparsable request");
                this.replacement = Some(Replacement {
                    bytes: json_answer(status, message, date),
                    written: 0,
                    claimed: Some(buf.len()),
                });
            }
        }
        if let Some(n) = ready!(this.poll_replacement(cx))? {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // An automatic answer is a head alone: one slice.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(first), None) = (non_empty.next(), non_empty.next()) {
            if self.replacement.is_some() || automatic_answer(first).is_some() {
                return self.poll_write(cx, first);
            }
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Closes `io` without a reset: FIN first, then what the client still sends is read and
/// dropped until it closes too, [`LINGER_BYTES`] were dropped, or [`LINGER_TIME`] passed.
pub async fn linger(mut io: ConnIo) {
    if io.shutdown().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 8 * 1024];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answers_are_recognized_and_nothing_else() {
        let date = b"date: Thu, 03 Dec 2026 17:02:52 GMT";
        for (prefix, status, _) in AUTOMATIC {
            let mut head = prefix.to_vec();
            head.extend_from_slice(b"connection: close\r\ncontent-length: 0\r\n");
            head.extend_from_slice(date);
            head.extend_from_slice(b"\r\n\r\n");
            let (found, _, d) = automatic_answer(&head).expect("recognized");
            assert_eq!(found, status);
            assert_eq!(d, Some(&date[..]));
        }
        for other in [
            &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nx-request-id: 1\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n",
            b"{\"data\":1}",
        ] {
            assert!(automatic_answer(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn the_replacement_is_json_with_a_request_id() {
        let answer = json_answer(
            StatusCode::URI_TOO_LONG,
            "The request URI is too long.",
            None,
        );
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("\r\nx-request-id: "), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::json!({"error": "The request URI is too long.", "code": "INVALID_REQUEST"})
        );
    }
}
