//! The simulator's event queue: events ordered by (simulated ms,
//! scheduling order), exactly as a binary heap of `(at_ms, order)` keys
//! would pop them, but cheaper for the sim's traffic (millions of events,
//! nearly all due within a minute).
//!
//! Events due within [`WHEEL_MS`] of the last popped instant go to a
//! timing wheel: one FIFO list per millisecond. Every event in the wheel
//! is due in `[now, now + WHEEL_MS)`, so a slot holds events of one
//! instant only, and since the scheduling order only grows, a slot's FIFO
//! order is its `order` order. Later (or, defensively, earlier) events go
//! to a binary heap. `pop` takes the smaller (at, order) of the wheel's
//! earliest event and the heap's top, so the order is the heap's order in
//! every case.
//!
//! The wheel's lists are linked through one pool of nodes, reused last
//! freed first: no allocation per event, no buffer per slot (a slot is two
//! indices, so the 65,536 slots take 512 KiB), and the node an event is
//! pushed into was most likely just popped, so it is still in the cache.
//! (A buffer per slot kept, after an hour of simulated time, the capacity
//! of every slot's busiest instant: 2.7 million entries for 40,000 events.)

use std::collections::BinaryHeap;

/// Milliseconds the wheel spans (65.5 s: network delays, ticks, probes,
/// heartbeats and parked long-polls land in it).
const WHEEL_MS: u64 = 1 << 16;

/// No node: the end of a slot's list.
const NIL: u32 = u32::MAX;

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

/// One event in a slot's list.
#[derive(Debug)]
struct Node<T> {
    order: u64,
    next: u32,
    /// `None` while the node is free.
    ev: Option<T>,
}

/// A slot's list: its first and last node, or `NIL`.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY: List = List { head: NIL, tail: NIL };

/// Events by (at_ms, scheduling order), earliest first.
#[derive(Debug)]
pub struct EventQueue<T> {
    /// The instant of the last popped event (never decreases).
    now_ms: u64,
    /// Scheduling order of the last pushed event.
    order: u64,
    /// Slot `at_ms % WHEEL_MS`.
    wheel: Vec<List>,
    nodes: Vec<Node<T>>,
    /// Free nodes, the last freed on top.
    free: Vec<u32>,
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
            wheel: vec![EMPTY; WHEEL_MS as usize],
            nodes: Vec::new(),
            free: Vec::new(),
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
        // Beyond the wheel, or (never in practice) a pool of 2^32 nodes.
        if !(at_ms >= self.now_ms && at_ms - self.now_ms < WHEEL_MS)
            || (self.free.is_empty() && self.nodes.len() >= NIL as usize)
        {
            self.far.push(Far { at_ms, order: self.order, ev: Box::new(ev) });
            return;
        }
        if self.n_wheel == 0 || at_ms < self.cursor_ms {
            self.cursor_ms = at_ms;
        }
        let node = Node { order: self.order, next: NIL, ev: Some(ev) };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.nodes[idx as usize] = node;
                idx
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).unwrap_or(NIL)
            }
        };
        let list = &mut self.wheel[slot(at_ms)];
        match list.tail {
            NIL => list.head = idx,
            tail => self.nodes[tail as usize].next = idx,
        }
        list.tail = idx;
        self.n_wheel += 1;
    }

    /// The earliest event and its instant.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        let wheel_next = if self.n_wheel > 0 {
            while self.wheel[slot(self.cursor_ms)].head == NIL {
                self.cursor_ms += 1;
            }
            let head = self.wheel[slot(self.cursor_ms)].head;
            Some((self.cursor_ms, self.nodes[head as usize].order))
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
        let list = &mut self.wheel[slot(at_ms)];
        let idx = list.head;
        let node = &mut self.nodes[idx as usize];
        list.head = node.next;
        if list.head == NIL {
            list.tail = NIL;
        }
        let ev = node.ev.take();
        self.free.push(idx);
        self.n_wheel -= 1;
        self.now_ms = at_ms;
        ev.map(|ev| (at_ms, ev))
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
