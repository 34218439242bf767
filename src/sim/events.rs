//! The simulator's event queue: events ordered by (simulated ms,
//! scheduling order), exactly as a binary heap of `(at_ms, order)` keys
//! would pop them, but cheaper for the sim's traffic (millions of events,
//! nearly all due within a minute).
//!
//! Events due within [`WHEEL_MS`] of the last popped instant go to a
//! timing wheel: one FIFO slot per millisecond. Every event in the wheel
//! is due in `[now, now + WHEEL_MS)`, so a slot holds events of one
//! instant only, and since the scheduling order only grows, a slot's FIFO
//! order is its `order` order. Later (or, defensively, earlier) events go
//! to a binary heap. `pop` takes the smaller (at, order) of the wheel's
//! earliest event and the heap's top, so the order is the heap's order in
//! every case.

use std::collections::{BinaryHeap, VecDeque};

/// Milliseconds the wheel spans (65.5 s: network delays, ticks, probes,
/// request timeouts and heartbeats land in it).
const WHEEL_MS: u64 = 1 << 16;

/// An event due beyond the wheel.
#[derive(Debug)]
struct Far<T> {
    at_ms: u64,
    order: u64,
    ev: Box<T>,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.order) == (other.at_ms, other.order)
    }
}
impl<T> Eq for Far<T> {}
impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Far<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: invert for earliest first.
        (other.at_ms, other.order).cmp(&(self.at_ms, self.order))
    }
}

/// Events by (at_ms, scheduling order), earliest first.
#[derive(Debug)]
pub struct EventQueue<T> {
    /// The instant of the last popped event (never decreases).
    now_ms: u64,
    /// Scheduling order of the last pushed event.
    order: u64,
    /// Slot `at_ms % WHEEL_MS`: (order, event), FIFO. Boxed, so a slot
    /// keeps 16 bytes per entry of capacity, whatever the event's size.
    wheel: Vec<VecDeque<(u64, Box<T>)>>,
    n_wheel: usize,
    /// No wheel event is due before this instant (meaningful while
    /// `n_wheel > 0`): the scan for the next event starts here.
    cursor_ms: u64,
    far: BinaryHeap<Far<T>>,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue {
            now_ms: 0,
            order: 0,
            wheel: (0..WHEEL_MS).map(|_| VecDeque::new()).collect(),
            n_wheel: 0,
            cursor_ms: 0,
            far: BinaryHeap::new(),
        }
    }
}

fn slot(at_ms: u64) -> usize {
    (at_ms % WHEEL_MS) as usize
}

impl<T> EventQueue<T> {
    /// Schedules `ev` at `at_ms`, after everything already scheduled then.
    pub fn push(&mut self, at_ms: u64, ev: T) {
        self.order += 1;
        if at_ms >= self.now_ms && at_ms - self.now_ms < WHEEL_MS {
            if self.n_wheel == 0 || at_ms < self.cursor_ms {
                self.cursor_ms = at_ms;
            }
            self.wheel[slot(at_ms)].push_back((self.order, Box::new(ev)));
            self.n_wheel += 1;
        } else {
            self.far.push(Far { at_ms, order: self.order, ev: Box::new(ev) });
        }
    }

    /// The earliest event and its instant.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        let wheel_next = if self.n_wheel > 0 {
            while self.wheel[slot(self.cursor_ms)].is_empty() {
                self.cursor_ms += 1;
            }
            self.wheel[slot(self.cursor_ms)].front().map(|(order, _)| (self.cursor_ms, *order))
        } else {
            None
        };
        let far_first = match (self.far.peek(), wheel_next) {
            (Some(f), Some(w)) => (f.at_ms, f.order) < w,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if far_first {
            let f = self.far.pop()?;
            self.now_ms = self.now_ms.max(f.at_ms);
            return Some((f.at_ms, *f.ev));
        }
        let (at_ms, _) = wheel_next?;
        let (_, ev) = self.wheel[slot(at_ms)].pop_front()?;
        self.n_wheel -= 1;
        self.now_ms = at_ms;
        Some((at_ms, *ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::rng::Rng;

    /// The same pops as a binary heap of (at, order) keys, for a mix of
    /// near, far, same-instant and past events pushed while popping.
    #[test]
    fn pops_in_heap_order() {
        let mut rng = Rng::new(7);
        let mut queue = EventQueue::default();
        let mut heap = BinaryHeap::new();
        let mut order = 0u64;
        let mut now = 0u64;
        let mut push = |queue: &mut EventQueue<u64>, heap: &mut BinaryHeap<std::cmp::Reverse<(u64, u64)>>, at: u64| {
            order += 1;
            queue.push(at, order);
            heap.push(std::cmp::Reverse((at, order)));
        };
        for _ in 0..200 {
            let at = rng.range(0, 3 * WHEEL_MS);
            push(&mut queue, &mut heap, at);
        }
        let mut popped = 0;
        while let Some((at, ev)) = queue.pop() {
            let std::cmp::Reverse(want) = heap.pop().expect("the heap has as many");
            assert_eq!((at, ev), want);
            popped += 1;
            now = now.max(at);
            if popped < 20_000 {
                for _ in 0..rng.range(0, 3) {
                    let at = match rng.range(0, 10) {
                        0 => now,
                        1 => now.saturating_sub(rng.range(1, 100)),
                        2 => now + WHEEL_MS + rng.range(0, WHEEL_MS),
                        3 => now + WHEEL_MS - 1,
                        _ => now + rng.range(0, 40_000),
                    };
                    push(&mut queue, &mut heap, at);
                }
            }
        }
        assert!(heap.is_empty() && popped > 20_000, "{popped}");
    }
}
