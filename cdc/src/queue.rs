//! A connection's event queue: one sender (the owner), one receiver (the
//! connection's `EventStream`), a bound in messages, byte accounting, and
//! one operation a channel lacks: the sender can *purge* what the receiver
//! has not taken yet.
//!
//! # Invariants
//!
//! - Every message is charged to the connection's [`PendingBytes`] (and so
//!   to the memory quota) in the same critical section that pushes it, and
//!   uncharged in the one that removes it: taken by the receiver, purged by
//!   the sender, or dropped with the queue when the receiver goes. So the
//!   charge equals the bytes in the queue at every moment a lock is not
//!   held, and returns to 0 once the queue is empty or gone.
//! - Only the sender pushes; anything else only removes. A free slot (or
//!   free byte) the sender sees stays free until it uses it.
//! - Purging is how congestion frees memory at once: a consumer that never
//!   reads cannot keep its queued events alive after its subscriptions were
//!   stopped.
//! - Dropping the sender ends the stream *after* what is queued; dropping
//!   the receiver makes every later push fail (`Closed`) and frees what was
//!   queued.
//!
//! The lock guards a `VecDeque` push or pop and nothing else: no await, no
//! allocation beyond the deque's, no callback (wakers are woken after it is
//! released). A poisoned lock is still used: its data is a deque and two
//! flags, consistent after any single operation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use kvfeed_proto::cdcpb::ChangeDataEvent;

use crate::metrics::PendingBytes;

/// One message in a connection's queue, with its encoded size.
#[derive(Debug)]
pub(crate) struct Queued {
    pub event: ChangeDataEvent,
    pub bytes: usize,
    /// A congestion notice (see `owner::outbound`).
    pub notice: bool,
}

/// Why a push was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    Full,
    Closed,
}

#[derive(Debug)]
struct State {
    items: VecDeque<Queued>,
    sender: bool,
    receiver: bool,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    capacity: usize,
    pending: Arc<PendingBytes>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue holding at most `capacity` messages (at least 1).
pub(crate) fn channel(capacity: usize, pending: Arc<PendingBytes>) -> (QueueTx, QueueRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            sender: true,
            receiver: true,
            waker: None,
        }),
        capacity: capacity.max(1),
        pending,
    });
    (
        QueueTx {
            shared: Arc::clone(&shared),
        },
        QueueRx { shared },
    )
}

/// The owner's end.
#[derive(Debug)]
pub(crate) struct QueueTx {
    shared: Arc<Shared>,
}

impl QueueTx {
    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        !self.shared.lock().receiver
    }

    /// Free message slots.
    pub(crate) fn free(&self) -> usize {
        let len = self.shared.lock().items.len();
        self.shared.capacity.saturating_sub(len)
    }

    /// Queues `queued` and charges its bytes, or gives it back.
    pub(crate) fn try_push(&self, queued: Queued) -> Result<(), (PushError, Queued)> {
        let waker = {
            let mut state = self.shared.lock();
            if !state.receiver {
                return Err((PushError::Closed, queued));
            }
            if state.items.len() >= self.shared.capacity {
                return Err((PushError::Full, queued));
            }
            self.shared.pending.add(queued.bytes);
            state.items.push_back(queued);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Removes (and uncharges) everything the receiver has not taken.
    pub(crate) fn purge(&self) -> Vec<Queued> {
        let purged: Vec<Queued> = {
            let mut state = self.shared.lock();
            let purged: Vec<Queued> = state.items.drain(..).collect();
            for q in &purged {
                self.shared.pending.sub(q.bytes);
            }
            purged
        };
        purged
    }

    /// A handle that does not keep the queue open (for scan pacing).
    pub(crate) fn weak(&self) -> WeakQueue {
        WeakQueue(Arc::downgrade(&self.shared))
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.sender = false;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Looks at a queue without keeping it open.
#[derive(Clone, Debug)]
pub(crate) struct WeakQueue(Weak<Shared>);

impl WeakQueue {
    /// Free message slots; `None` once either end is gone.
    pub(crate) fn free(&self) -> Option<usize> {
        let shared = self.0.upgrade()?;
        let state = shared.lock();
        if !state.sender || !state.receiver {
            return None;
        }
        Some(shared.capacity.saturating_sub(state.items.len()))
    }
}

/// What [`QueueRx::try_recv`] found.
#[derive(Debug)]
pub(crate) enum TryRecv {
    Item(Queued),
    Empty,
    Ended,
}

/// The stream's end.
#[derive(Debug)]
pub(crate) struct QueueRx {
    shared: Arc<Shared>,
}

impl QueueRx {
    /// The next message (uncharged); `None` once the sender is gone and
    /// the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Queued>> {
        let mut state = self.shared.lock();
        if let Some(q) = state.items.pop_front() {
            self.shared.pending.sub(q.bytes);
            return Poll::Ready(Some(q));
        }
        if !state.sender {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(crate) async fn recv(&mut self) -> Option<Queued> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub(crate) fn try_recv(&mut self) -> TryRecv {
        let mut state = self.shared.lock();
        match state.items.pop_front() {
            Some(q) => {
                self.shared.pending.sub(q.bytes);
                TryRecv::Item(q)
            }
            None if state.sender => TryRecv::Empty,
            None => TryRecv::Ended,
        }
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver = false;
        for q in state.items.drain(..) {
            self.shared.pending.sub(q.bytes);
        }
        // Wakes scans waiting for room even when nothing was queued: they
        // must learn that the stream is gone.
        self.shared.pending.drained().notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FeedConfig;
    use crate::metrics::FeedMetrics;
    use crate::quota::MemoryQuota;

    fn queued(bytes: usize) -> Queued {
        Queued {
            event: ChangeDataEvent::default(),
            bytes,
            notice: false,
        }
    }

    fn setup(capacity: usize) -> (QueueTx, QueueRx, FeedMetrics) {
        let metrics = FeedMetrics::new().expect("metrics");
        let quota = Arc::new(MemoryQuota::new(&FeedConfig::default(), &metrics));
        let pending = Arc::new(PendingBytes::new(&metrics, quota));
        let (tx, rx) = channel(capacity, pending);
        (tx, rx, metrics)
    }

    #[test]
    fn charges_follow_messages_on_every_path() {
        let (tx, mut rx, metrics) = setup(2);
        tx.try_push(queued(10)).expect("room");
        tx.try_push(queued(5)).expect("room");
        assert!(matches!(tx.try_push(queued(1)), Err((PushError::Full, _))));
        assert_eq!(metrics.memory_quota_used(), 15);
        assert!(matches!(rx.try_recv(), TryRecv::Item(q) if q.bytes == 10));
        assert_eq!(
            (metrics.memory_quota_used(), metrics.pending_bytes()),
            (5, 5)
        );
        assert_eq!(tx.purge().len(), 1);
        assert_eq!(metrics.memory_quota_used(), 0);
        tx.try_push(queued(7)).expect("room");
        drop(rx);
        assert_eq!(
            metrics.memory_quota_used(),
            0,
            "dropping the receiver frees"
        );
        assert!(tx.is_closed());
        assert!(matches!(
            tx.try_push(queued(1)),
            Err((PushError::Closed, _))
        ));
    }

    #[test]
    fn the_stream_ends_after_what_is_queued() {
        let (tx, mut rx, _metrics) = setup(4);
        let weak = tx.weak();
        tx.try_push(queued(3)).expect("room");
        assert_eq!(weak.free(), Some(3));
        drop(tx);
        assert_eq!(weak.free(), None);
        assert!(matches!(rx.try_recv(), TryRecv::Item(_)));
        assert!(matches!(rx.try_recv(), TryRecv::Ended));
    }
}
