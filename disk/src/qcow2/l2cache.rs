//! A bounded LRU cache of decoded L2 tables, keyed by host offset.
//!
//! Metadata is written through (the caller writes the entry to the file
//! before updating the cache), so nothing here is ever dirty and eviction
//! is free.

use std::collections::HashMap;

pub struct L2Cache {
    capacity: usize,
    tick: u64,
    tables: HashMap<u64, (u64, Box<[u64]>)>,
}

impl L2Cache {
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(1),
            tick: 0,
            tables: HashMap::new(),
        }
    }

    pub fn get(&mut self, offset: u64) -> Option<&mut [u64]> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(used, t)| {
            *used = tick;
            &mut t[..]
        })
    }

    pub fn insert(&mut self, offset: u64, table: Box<[u64]>) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            // Capacity is small (tens of tables), so a linear scan for the
            // least recently used one is cheaper than a linked list.
            if let Some(victim) = self
                .tables
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| *k)
            {
                self.tables.remove(&victim);
            }
        }
        self.tick += 1;
        self.tables.insert(offset, (self.tick, table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = L2Cache::new(2);
        c.insert(1, vec![1].into());
        c.insert(2, vec![2].into());
        assert!(c.get(1).is_some());
        c.insert(3, vec![3].into());
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some());
        assert!(c.get(3).is_some());
        assert_eq!(c.tables.len(), 2);
    }
}
