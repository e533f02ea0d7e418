//! The gRPC port's accept loop: connections are admitted, not just taken.
//!
//! What tonic's own loop lacks, each a way one peer could lock everyone
//! out (see the hardening notes in the README's limits):
//! - **A connection cap.** At most `server.max-connections` connections are
//!   open at once (by default a little below the process's open-file limit,
//!   so files the store needs stay available). Past it a new connection is
//!   accepted and closed at once: the peer learns quickly, and nothing
//!   waits in the kernel's backlog.
//! - **A handshake deadline.** A connection must deliver the 24-byte HTTP/2
//!   preface within `server.handshake-timeout`, or it is closed. The
//!   preface is read in a task of its own, so a stalled peer never holds
//!   the accept loop, and replayed to tonic ahead of the socket.
//! - **Backoff on resource errors.** When `accept` fails for want of file
//!   descriptors (or memory), the loop waits a little before trying again
//!   instead of spinning at full CPU on an error that cannot clear at once.
//!
//! A connection's slot (a semaphore permit) lives in the stream handed to
//! tonic, so it is released when tonic drops the connection, on every path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client preface every gRPC connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long the loop waits after an `accept` that failed for want of
/// resources.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// Connections admitted but not yet taken by tonic.
const ADMITTED_QUEUE: usize = 64;

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest wait for a connection's HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// An admitted connection: the bytes read while admitting it, the socket
/// and its slot.
pub struct Admitted {
    head: Vec<u8>,
    /// How much of `head` tonic has read.
    pos: usize,
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.pos);
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` under `admission`, handing admitted connections
/// to the returned channel (tonic's incoming stream). The loop ends when
/// the receiver is dropped (the server stopped).
pub fn admit(listener: TcpListener, admission: Admission) -> mpsc::Receiver<io::Result<Admitted>> {
    let (tx, rx) = mpsc::channel(ADMITTED_QUEUE);
    let slots = Arc::new(Semaphore::new(admission.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_resource_error(&e) => {
                    tracing::warn!(error = %e, "cannot accept a connection: out of resources; backing off");
                    tokio::time::sleep(RESOURCE_BACKOFF).await;
                    continue;
                }
                // Errors of one connection (reset before accept, …).
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(
                    max_connections = admission.max_connections,
                    "connection refused: server.max-connections reached"
                );
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                match tokio::time::timeout(admission.handshake_timeout, preface(&mut stream)).await
                {
                    Ok(Ok(head)) => {
                        let _ = tx
                            .send(Ok(Admitted {
                                head,
                                pos: 0,
                                stream,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "connection closed before its preface")
                    }
                    Err(_) => tracing::debug!(
                        timeout = ?admission.handshake_timeout,
                        "connection closed: no HTTP/2 preface in time"
                    ),
                }
            });
        }
    });
    rx
}

/// Reads until the peer has sent the whole HTTP/2 preface (or anything
/// that is not one: tonic answers that with a protocol error); answers the
/// bytes read, which tonic is handed first.
async fn preface(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; PREFACE.len()];
    while head.len() < PREFACE.len() {
        let n = stream.read(&mut buf[..PREFACE.len() - head.len()]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if head[..] != PREFACE[..head.len()] {
            break;
        }
    }
    Ok(head)
}

/// Whether an `accept` error means the process is out of descriptors or
/// memory (which does not clear at once).
fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// The default connection cap: the process's soft open-file limit less
/// room for the store's files, at least 64.
pub fn default_max_connections() -> usize {
    const RESERVED_FILES: usize = 256;
    open_file_limit()
        .map_or(1024, |limit| limit.saturating_sub(RESERVED_FILES))
        .max(64)
}

/// The soft `RLIMIT_NOFILE`, from `/proc/self/limits` (Linux).
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_below_the_file_limit() {
        let cap = default_max_connections();
        assert!(cap >= 64);
        if let Some(limit) = open_file_limit() {
            assert!(cap < limit || limit < 320, "{cap} of {limit}");
        }
    }

    #[test]
    fn resource_errors_are_told_apart() {
        assert!(is_resource_error(&io::Error::from_raw_os_error(24)));
        assert!(!is_resource_error(&io::Error::from_raw_os_error(104)));
    }
}
