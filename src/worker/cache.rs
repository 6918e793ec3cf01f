//! A small TTL cache for resolutions, so that MongoDB is not read per job.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, V)>>,
    /// One load in flight per key: concurrent misses wait for it.
    loading: Gates<K>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The cached value, or the one `load` returns (cached). However many
    /// callers miss the same key at once, `load` runs once.
    pub async fn get_or_load<E, F, Fut>(&self, key: &K, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        if let Some(value) = self.get(key) {
            return Ok(value);
        }
        let gate = self.loading.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        // Removes the gate when this caller is done, even if it is cancelled
        // (a deadline) mid-load: no gate outlives its load.
        let _forget = Forget { loading: &self.loading, key };
        let _turn = gate.lock().await;
        if let Some(value) = self.peek(key) {
            return Ok(value);
        }
        let loaded = load().await;
        if let Ok(value) = &loaded {
            self.insert(key.clone(), value.clone());
        }
        loaded
    }

    /// Drop expired entries and give their memory back.
    pub fn sweep(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
        entries.shrink_to_fit();
    }

    /// Entries held right now (fresh or not yet swept).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A fresh value without counting a hit or a miss.
    fn peek(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone())
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

type Gates<K> = Mutex<HashMap<K, std::sync::Arc<tokio::sync::Mutex<()>>>>;

struct Forget<'a, K: Eq + Hash> {
    loading: &'a Gates<K>,
    key: &'a K,
}

impl<K: Eq + Hash> Drop for Forget<'_, K> {
    fn drop(&mut self) {
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Only the last caller of this gate removes it.
        if loading.get(self.key).is_some_and(|gate| std::sync::Arc::strong_count(gate) <= 2) {
            loading.remove(self.key);
        }
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

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let cache = std::sync::Arc::new(TtlCache::new(Duration::from_secs(60)));
        let loads = std::sync::Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(&"k", || async {
                            loads.fetch_add(1, Ordering::Relaxed);
                            tokio::task::yield_now().await;
                            Ok::<_, ()>(7)
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(7));
        }
        assert_eq!(loads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_sweep_gives_back_what_expired() {
        let cache = TtlCache::new(Duration::from_millis(20));
        for i in 0..10_000 {
            cache.insert(i, i);
        }
        std::thread::sleep(Duration::from_millis(30));
        cache.sweep();
        assert_eq!(cache.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_load_leaves_no_gate_behind() {
        let cache = TtlCache::<u32, u32>::new(Duration::from_secs(60));
        let load = cache.get_or_load(&1, std::future::pending::<Result<u32, ()>>);
        assert!(tokio::time::timeout(Duration::from_millis(10), load).await.is_err());
        assert!(cache.loading.lock().unwrap().is_empty());
    }

    #[test]
    fn a_zero_ttl_never_serves() {
        let cache = TtlCache::new(Duration::ZERO);
        cache.insert("k", 1);
        assert_eq!(cache.get(&"k"), None);
    }
}
