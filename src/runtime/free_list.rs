//! The KV pool's free blocks in eviction order: a doubly linked list threaded through two
//! arrays indexed by block id, so that taking the oldest, returning a block at either end, and
//! pulling a cached block out of the middle when a prefix match revives it are all O(1).

/// No block: the end of the list.
const NIL: u32 = u32::MAX;

/// A set of block ids in order, each at most once.
#[derive(Debug, Clone)]
pub struct FreeList {
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Whether each block is in the list.
    member: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeList {
    /// The list `0, 1, …, n - 1`.
    pub fn full(n: usize) -> Self {
        assert!(n < NIL as usize, "a pool of {n} blocks does not fit u32 ids");
        let mut list =
            FreeList { prev: vec![NIL; n], next: vec![NIL; n], member: vec![false; n], head: NIL, tail: NIL, len: 0 };
        for b in 0..n as u32 {
            list.push_back(b);
        }
        list
    }

    /// Blocks in the list.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `b` is in the list.
    pub fn contains(&self, b: u32) -> bool {
        self.member[b as usize]
    }

    /// Appends `b` (not in the list) at the back: evicted last.
    pub fn push_back(&mut self, b: u32) {
        debug_assert!(!self.contains(b));
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.member[b as usize] = true;
        self.len += 1;
    }

    /// Puts `b` (not in the list) at the front: evicted first.
    pub fn push_front(&mut self, b: u32) {
        debug_assert!(!self.contains(b));
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        match self.head {
            NIL => self.tail = b,
            h => self.prev[h as usize] = b,
        }
        self.head = b;
        self.member[b as usize] = true;
        self.len += 1;
    }

    /// Takes the front block.
    pub fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        (b != NIL).then(|| {
            self.remove(b);
            b
        })
    }

    /// Takes `b` out of the list wherever it is; nothing if it is not there.
    pub fn remove(&mut self, b: u32) {
        if !self.contains(b) {
            return;
        }
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.member[b as usize] = false;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(mut l: FreeList) -> Vec<u32> {
        std::iter::from_fn(|| l.pop_front()).collect()
    }

    #[test]
    fn keeps_order_through_removals_and_pushes_at_both_ends() {
        let mut l = FreeList::full(5);
        l.remove(2);
        l.remove(0);
        l.remove(4);
        l.remove(4);
        assert_eq!(l.len(), 2);
        l.push_front(4);
        l.push_back(0);
        assert!(l.contains(0) && !l.contains(2));
        assert_eq!(drain(l), vec![4, 1, 3, 0]);
    }

    #[test]
    fn empties_and_refills() {
        let mut l = FreeList::full(2);
        assert_eq!((l.pop_front(), l.pop_front(), l.pop_front()), (Some(0), Some(1), None));
        assert_eq!(l.len(), 0);
        l.push_back(1);
        l.push_front(0);
        assert_eq!(drain(l), vec![0, 1]);
    }
}
