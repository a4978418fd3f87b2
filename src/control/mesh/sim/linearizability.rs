//! A linearizability checker for one key's history: Wing and Gong's search, with Lowe's
//! memoisation of (operations linearized, state) pairs already explored, as in Jepsen's Knossos
//! and Porcupine.
//!
//! Written here rather than taken from a crate: stateright's `LinearizabilityTester` searches
//! without memoisation (exponential on the overlapping histories partitions produce) and brings
//! its model checker along; todc-utils is unmaintained.
//!
//! An operation whose outcome the client never learned (a timeout, a lost connection) has no
//! return: it may have taken effect at any point after its invocation, or never.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification: what one operation does to the state and may answer.
pub trait Model {
    /// The object's state.
    type State: Clone + Eq + Hash;
    /// An operation.
    type Op;
    /// What an operation answered.
    type Ret;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// The state after `op`, if `op` applied to `state` could have answered `ret` (`None`: the
    /// answer is unknown, so any answer fits).
    fn step(
        &self,
        state: &Self::State,
        op: &Self::Op,
        ret: Option<&Self::Ret>,
    ) -> Option<Self::State>;
}

/// One operation as a client saw it, times on one clock.
#[derive(Clone, Debug)]
pub struct Call<Op, Ret> {
    /// When the client sent it.
    pub invoked: u64,
    /// When the answer arrived, with the answer; `None` if it never did.
    pub returned: Option<(u64, Ret)>,
    /// The operation.
    pub op: Op,
}

#[derive(Clone, Copy)]
enum Event {
    Call(usize),
    Return(usize),
}

/// The events still to be placed, as a doubly linked list (index `len` is the head sentinel) so
/// an operation's call and return are lifted out and put back in O(1).
struct Events {
    events: Vec<Event>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_at: Vec<usize>,
    return_at: Vec<Option<usize>>,
}

impl Events {
    fn head(&self) -> usize {
        self.events.len()
    }

    fn unlink(&mut self, pos: usize) {
        let (p, q) = (self.prev[pos], self.next[pos]);
        self.next[p] = q;
        self.prev[q] = p;
    }

    /// Puts back what `unlink` took out; undone in reverse order, the neighbours are the same.
    fn relink(&mut self, pos: usize) {
        let (p, q) = (self.prev[pos], self.next[pos]);
        self.next[p] = pos;
        self.prev[q] = pos;
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_at[op]);
        if let Some(r) = self.return_at[op] {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(r) = self.return_at[op] {
            self.relink(r);
        }
        self.relink(self.call_at[op]);
    }
}

/// Whether `history` is linearizable with respect to `model`.
pub fn check<M: Model>(model: &M, history: &[Call<M::Op, M::Ret>]) -> bool {
    // Time order; at one instant calls come before returns, so operations that touch count as
    // concurrent (the lenient reading).
    let mut order: Vec<(u64, u8, Event)> = Vec::with_capacity(history.len() * 2);
    for (i, c) in history.iter().enumerate() {
        order.push((c.invoked, 0, Event::Call(i)));
        if let Some((t, _)) = &c.returned {
            order.push((*t, 1, Event::Return(i)));
        }
    }
    order.sort_by_key(|&(t, kind, _)| (t, kind));
    let n = order.len();
    let mut list = Events {
        events: order.into_iter().map(|(_, _, e)| e).collect(),
        next: (1..=n).chain([0]).collect(),
        prev: std::iter::once(n).chain(0..n).collect(),
        call_at: vec![0; history.len()],
        return_at: vec![None; history.len()],
    };
    for (pos, e) in list.events.iter().enumerate() {
        match *e {
            Event::Call(i) => list.call_at[i] = pos,
            Event::Return(i) => list.return_at[i] = Some(pos),
        }
    }
    if n == 0 {
        return true;
    }
    list.next[n] = 0;
    list.prev[n] = n - 1;

    let mut unanswered = history.iter().filter(|c| c.returned.is_some()).count();
    let mut linearized = vec![0u64; history.len().div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    // Each placed operation, with the state before it.
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut pos = list.next[list.head()];
    while unanswered > 0 {
        let placed = match (pos != list.head()).then(|| list.events[pos]) {
            Some(Event::Call(i)) => {
                let ret = history[i].returned.as_ref().map(|(_, r)| r);
                match model.step(&state, &history[i].op, ret) {
                    Some(after) => {
                        linearized[i / 64] |= 1 << (i % 64);
                        if seen.insert((linearized.clone(), after.clone())) {
                            stack.push((i, std::mem::replace(&mut state, after)));
                            list.lift(i);
                            if history[i].returned.is_some() {
                                unanswered -= 1;
                            }
                            pos = list.next[list.head()];
                            true
                        } else {
                            linearized[i / 64] &= !(1 << (i % 64));
                            pos = list.next[pos];
                            true
                        }
                    }
                    None => {
                        pos = list.next[pos];
                        true
                    }
                }
            }
            // An answered operation's return came before it could be placed, or only
            // unanswered calls are left and none fits: undo the last choice.
            Some(Event::Return(_)) | None => false,
        };
        if placed {
            continue;
        }
        let Some((i, before)) = stack.pop() else {
            return false;
        };
        state = before;
        linearized[i / 64] &= !(1 << (i % 64));
        list.unlift(i);
        if history[i].returned.is_some() {
            unanswered += 1;
        }
        pos = list.next[list.call_at[i]];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register: write v, or read and see v.
    struct Register;

    #[derive(Debug)]
    enum Op {
        Write(u8),
        Read,
    }

    impl Model for Register {
        type State = u8;
        type Op = Op;
        type Ret = u8;
        fn init(&self) -> u8 {
            0
        }
        fn step(&self, state: &u8, op: &Op, ret: Option<&u8>) -> Option<u8> {
            match op {
                Op::Write(v) => Some(*v),
                Op::Read => (ret.is_none_or(|r| r == state)).then_some(*state),
            }
        }
    }

    fn call(invoked: u64, returned: Option<(u64, u8)>, op: Op) -> Call<Op, u8> {
        Call {
            invoked,
            returned,
            op,
        }
    }

    #[test]
    fn a_read_may_see_a_concurrent_write_or_not() {
        for seen in [0, 1] {
            let h = [
                call(0, Some((10, 0)), Op::Write(1)),
                call(5, Some((6, seen)), Op::Read),
            ];
            assert!(check(&Register, &h), "read of {seen}");
        }
    }

    #[test]
    fn a_read_after_a_write_returned_must_see_it() {
        let h = [
            call(0, Some((1, 0)), Op::Write(1)),
            call(2, Some((3, 0)), Op::Read),
        ];
        assert!(!check(&Register, &h));
    }

    #[test]
    fn a_value_never_written_cannot_be_read() {
        let h = [call(0, Some((1, 7)), Op::Read)];
        assert!(!check(&Register, &h));
    }

    #[test]
    fn reads_cannot_go_back_in_time() {
        // Two concurrent writes: reads may see them in either order, but not 1, 2, then 1.
        let mut h = vec![
            call(0, Some((100, 0)), Op::Write(1)),
            call(0, Some((100, 0)), Op::Write(2)),
            call(10, Some((20, 2)), Op::Read),
            call(30, Some((40, 1)), Op::Read),
        ];
        assert!(check(&Register, &h));
        h.push(call(50, Some((60, 2)), Op::Read));
        assert!(!check(&Register, &h));
    }

    #[test]
    fn an_unanswered_write_may_take_effect_late_or_never() {
        let late = [
            call(0, None, Op::Write(1)),
            call(10, Some((11, 0)), Op::Read),
            call(20, Some((21, 1)), Op::Read),
        ];
        assert!(check(&Register, &late));
        let never = [
            call(0, None, Op::Write(1)),
            call(10, Some((11, 0)), Op::Read),
        ];
        assert!(check(&Register, &never));
        // But once seen, it cannot be unseen.
        let flicker = [
            call(0, None, Op::Write(1)),
            call(10, Some((11, 1)), Op::Read),
            call(20, Some((21, 0)), Op::Read),
        ];
        assert!(!check(&Register, &flicker));
    }

    #[test]
    fn a_refuted_history_is_refuted_in_bounded_time() {
        // Twelve overlapping writes, then a read that no order explains: the memo bounds the
        // search by (subset, state) pairs, 2^12 * 13, instead of the 12! orders.
        let mut h: Vec<Call<Op, u8>> = (1..=12)
            .map(|v| call(0, Some((1000, 0)), Op::Write(v)))
            .collect();
        h.push(call(2000, Some((2001, 12)), Op::Read));
        assert!(check(&Register, &h));
        h.push(call(3000, Some((3001, 13)), Op::Read));
        assert!(!check(&Register, &h));
    }
}
