//! Allocation of sandbox slots. A slot gives a running sandbox its unique
//! unprivileged uid/gid (`base + slot`), its cgroup name and its state
//! directory, so no two running sandboxes ever share an identity.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Hands out slots `0..count`; a slot is reused only after release.
#[derive(Debug)]
pub struct SlotAllocator {
    base: u32,
    count: u32,
    used: Mutex<BTreeSet<u32>>,
}

/// A slot in use; `uid == gid == base + index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub uid: u32,
}

impl SlotAllocator {
    pub fn new(base: u32, count: u32) -> Self {
        Self {
            base,
            count,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// Takes the lowest free slot, or `None` when all are in use.
    pub fn take(&self) -> Option<Slot> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let index = (0..self.count).find(|i| !used.contains(i))?;
        used.insert(index);
        Some(Slot {
            index,
            uid: self.base + index,
        })
    }

    /// Takes slot `index` (a re-adopted VM's), or `None` when it is out of
    /// range or already in use.
    pub fn claim(&self, index: u32) -> Option<Slot> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if index >= self.count || !used.insert(index) {
            return None;
        }
        Some(Slot {
            index,
            uid: self.base + index,
        })
    }

    pub fn release(&self, slot: Slot) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.remove(&slot.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_until_released() {
        let a = SlotAllocator::new(5000, 2);
        let s0 = a.take().unwrap();
        let s1 = a.take().unwrap();
        assert_ne!(s0.uid, s1.uid);
        assert_eq!((s0.uid, s1.uid), (5000, 5001));
        assert!(a.take().is_none());
        a.release(s0);
        assert_eq!(a.take().unwrap(), s0);
        a.release(s1);
        assert_eq!(a.claim(1), Some(s1));
        assert_eq!(a.claim(1), None, "already in use");
        assert_eq!(a.claim(2), None, "out of range");
    }
}
