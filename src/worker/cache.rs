//! A small TTL cache for resolutions, so that MongoDB is not read per job.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, V)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, entries: Mutex::new(HashMap::new()), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = entries.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone());
        let counter = if fresh.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        fresh
    }

    pub fn insert(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the map bounded by what is in use: drop expired entries when it grows.
        if entries.len() >= 4096 && entries.len().is_power_of_two() {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
        }
        entries.insert(key, (Instant::now(), value));
    }

    pub fn remove(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// (hits, misses) since start.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = TtlCache::new(Duration::from_millis(30));
        cache.insert("k", 1);
        assert_eq!(cache.get(&"k"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&"k"), None);
        assert_eq!(cache.stats(), (1, 1));
    }

    #[test]
    fn a_zero_ttl_never_serves() {
        let cache = TtlCache::new(Duration::ZERO);
        cache.insert("k", 1);
        assert_eq!(cache.get(&"k"), None);
    }
}
