//! The budget of bytes the supervisor holds on clients' behalf: request bodies (function
//! stdin, session messages, snapshot imports, module uploads) from before they are read
//! until their request is done, session state read for a message, and response bodies
//! until they are written out.
//!
//! Without it each connection could make the server hold a full body (16 MiB by default,
//! a 64 MiB snapshot import) before the queue limit even applies. A request body reserves
//! its size before any of it is read (its Content-Length, or chunk by chunk when it has
//! none), waiting briefly when the budget is spent and then answering 503 `overloaded`.
//! Response bodies are already in memory when they are charged: they are counted (and
//! make new bodies wait) but never refused. `/ready` reports 503 while the budget cannot
//! take one more body of the default maximum size.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a request waits for budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Bytes held for clients against `WASMBOX_MAX_BUFFERED_BYTES`.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    freed: Notify,
    /// Requests answered 503 because the budget stayed spent.
    refused: AtomicU64,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: u64,
}

/// The budget stayed spent for [`BUDGET_WAIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

impl Budget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Budget { limit, used: AtomicU64::new(0), freed: Notify::new(), refused: AtomicU64::new(0) })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether a body of `size` bytes would have to wait now.
    pub fn short_of(&self, size: u64) -> bool {
        self.used().saturating_add(size) > self.limit
    }

    /// Nothing held: the start of a body whose size is not known yet.
    pub fn none(self: &Arc<Self>) -> Held {
        Held { budget: self.clone(), bytes: 0 }
    }

    /// `bytes` if they fit now.
    pub fn try_take(self: &Arc<Self>, bytes: u64) -> Option<Held> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()
            .map(|_| Held { budget: self.clone(), bytes })
    }

    /// `bytes`, waiting up to [`BUDGET_WAIT`] for others to give some back. More than the
    /// whole budget (state stored under an earlier, larger setting) takes all of it, so it
    /// still gets through when nothing else is held.
    pub async fn take(self: &Arc<Self>, bytes: u64) -> Result<Held, Exhausted> {
        let bytes = bytes.min(self.limit);
        let deadline = tokio::time::Instant::now() + BUDGET_WAIT;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(held) = self.try_take(bytes) {
                return Ok(held);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Exhausted);
            }
        }
    }

    /// Counts `bytes` that are already in memory (a response), over the limit if need be.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Held {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Held { budget: self.clone(), bytes }
    }
}

impl Held {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows what is held to at least `total` bytes, as [`Budget::take`] would.
    pub async fn grow_to(&mut self, total: u64) -> Result<(), Exhausted> {
        if total <= self.bytes {
            return Ok(());
        }
        let mut more = self.budget.take(total - self.bytes).await?;
        // The bytes move into `self`: `more` gives nothing back when it drops.
        self.bytes += std::mem::take(&mut more.bytes);
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_wait_for_budget_and_are_refused_when_it_stays_spent() {
        let budget = Budget::new(100);
        let a = budget.try_take(60).unwrap();
        assert!(budget.try_take(50).is_none());
        assert!(budget.short_of(41) && !budget.short_of(40));
        // Given back while waiting: the waiter gets it.
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(50).await.map(|h| h.bytes()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(50));
        assert_eq!(budget.used(), 0);
        // More than the whole budget takes all of it.
        assert_eq!(budget.take(1000).await.map(|h| h.bytes()), Ok(100));
        // Never given back: refused after the wait, and counted.
        let _b = budget.try_take(100).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(budget.take(1).await.unwrap_err(), Exhausted);
        assert!(started.elapsed() >= BUDGET_WAIT);
        assert_eq!(budget.refused(), 1);
    }

    #[tokio::test]
    async fn growing_and_charging_count_once_and_are_given_back() {
        let budget = Budget::new(100);
        let mut held = budget.none();
        held.grow_to(30).await.unwrap();
        held.grow_to(20).await.unwrap();
        held.grow_to(70).await.unwrap();
        assert_eq!((held.bytes(), budget.used()), (70, 70));
        // A response in memory is counted even past the limit.
        let response = budget.charge(80);
        assert_eq!(budget.used(), 150);
        assert!(budget.try_take(1).is_none());
        drop(held);
        drop(response);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_take(100).is_some());
    }
}
