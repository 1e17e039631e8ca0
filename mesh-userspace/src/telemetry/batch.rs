//! A bounded batch between the proxy and a writer thread of its own (access log lines, spans).
//!
//! A channel wakes its reader for every item: with one line per request that is a futex wake
//! and a context switch per request (measured: a third of the CPU an access-logged request
//! cost). Here the producer appends under an uncontended lock and wakes the writer only when
//! the batch was empty (the writer then gives it `linger` to fill) or has grown to `wake_at`;
//! under load the writer wakes a few times a second. A full batch refuses the item: the
//! producer never waits.
#![forbid(unsafe_code)]
use std::{
    sync::{Condvar, Mutex, MutexGuard},
    time::Duration,
};

pub struct Batch<T> {
    state: Mutex<State<T>>,
    filled: Condvar,
    /// Items at which the writer is woken before its linger is over.
    wake_at: usize,
    /// Items held at most; more are refused.
    max: usize,
    /// How long the writer lets a batch fill after its first item.
    linger: Duration,
}

struct State<T> {
    items: Vec<T>,
    closed: bool,
}

impl<T> Batch<T> {
    pub fn new(wake_at: usize, max: usize, linger: Duration) -> Self {
        Self { state: Mutex::new(State { items: Vec::new(), closed: false }), filled: Condvar::new(), wake_at, max, linger }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A writer that panicked left nothing half-done in a Vec: go on with it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends what `fill` pushes (any number of items), unless the batch holds `max` already;
    /// false: refused. Never waits for the writer.
    pub fn push_with(&self, fill: impl FnOnce(&mut Vec<T>)) -> bool {
        let mut state = self.lock();
        let before = state.items.len();
        if before >= self.max || state.closed {
            return false;
        }
        fill(&mut state.items);
        let after = state.items.len();
        drop(state);
        if before == 0 || (before < self.wake_at && after >= self.wake_at) {
            self.filled.notify_one();
        }
        true
    }

    pub fn push(&self, item: T) -> bool {
        self.push_with(|items| items.push(item))
    }

    /// Waits for items, lets them gather for up to `linger` (less once `wake_at` are there),
    /// and swaps them into `into` (emptied first). False once the batch is closed and drained.
    pub fn take(&self, into: &mut Vec<T>) -> bool {
        into.clear();
        let state = self.lock();
        let state = self.filled.wait_while(state, |s| s.items.is_empty() && !s.closed).unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut state, _) = self
            .filled
            .wait_timeout_while(state, self.linger, |s| s.items.len() < self.wake_at && !s.closed)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.items.is_empty() && state.closed {
            return false;
        }
        std::mem::swap(&mut state.items, into);
        true
    }

    /// No more items: the writer takes what is left, then `take` says false.
    pub fn close(&self) {
        self.lock().closed = true;
        self.filled.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn items_reach_the_writer_in_order_and_a_full_batch_refuses_without_waiting() {
        // A linger far longer than the test: only `wake_at` and `close` can end a wait.
        let batch = Arc::new(Batch::new(4, 8, Duration::from_secs(3600)));
        for i in 0..8 {
            assert!(batch.push(i));
        }
        assert!(!batch.push(8), "the ninth item is refused: nobody took the first eight");
        let mut taken = Vec::new();
        assert!(batch.take(&mut taken), "eight items are past wake_at: taken at once");
        assert_eq!(taken, (0..8).collect::<Vec<_>>());

        let writer = std::thread::spawn({
            let batch = batch.clone();
            move || {
                let mut all = Vec::new();
                let mut taken = Vec::new();
                while batch.take(&mut taken) {
                    all.append(&mut taken);
                }
                all
            }
        });
        for i in 100..103 {
            assert!(batch.push(i));
        }
        batch.close();
        assert!(!batch.push(200), "closed: refused");
        assert_eq!(writer.join().unwrap(), vec![100, 101, 102], "what was pushed before the close is drained");
    }

    #[test]
    fn a_lone_item_is_taken_after_the_linger() {
        let batch = Batch::new(1000, 2000, Duration::from_millis(1));
        assert!(batch.push_with(|items| items.extend_from_slice(b"one line\n")));
        let mut taken = Vec::new();
        assert!(batch.take(&mut taken));
        assert_eq!(taken, b"one line\n");
    }
}
