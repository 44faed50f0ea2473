//! One thread at a time works on a key (parses a file), the others that
//! want the same key wait for it and then find its result cached, instead
//! of each doing the same work: a host-wide apply's workers all start on
//! the same glibc at once.

use std::sync::{Condvar, Mutex};

/// Keys being worked on now, each by one thread.
pub(crate) struct Claims<K: 'static> {
    keys: Mutex<Vec<K>>,
    done: Condvar,
}

impl<K: PartialEq + Clone> Claims<K> {
    pub(crate) const fn new() -> Self {
        Claims {
            keys: Mutex::new(Vec::new()),
            done: Condvar::new(),
        }
    }

    /// Wait until no other thread holds `key`, then hold it until the
    /// guard drops.
    pub(crate) fn claim(&'static self, key: &K) -> Claim<K> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        while keys.contains(key) {
            keys = self.done.wait(keys).unwrap_or_else(|p| p.into_inner());
        }
        keys.push(key.clone());
        Claim {
            claims: self,
            key: key.clone(),
        }
    }
}

/// Releases a claimed key (also when the work panicked or failed).
pub(crate) struct Claim<K: PartialEq + Clone + 'static> {
    claims: &'static Claims<K>,
    key: K,
}

impl<K: PartialEq + Clone + 'static> Drop for Claim<K> {
    fn drop(&mut self) {
        let mut keys = self.claims.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|k| *k != self.key);
        self.claims.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Claims;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    static TEST_CLAIMS: Claims<&'static str> = Claims::new();

    /// A key claimed by one thread is not claimed by a second until the
    /// first lets go; another key is claimed meanwhile.
    #[test]
    fn one_thread_holds_a_key_at_a_time() {
        let first = TEST_CLAIMS.claim(&"a");
        let claimed = Arc::new(AtomicBool::new(false));
        let second = {
            let claimed = claimed.clone();
            std::thread::spawn(move || {
                let _guard = TEST_CLAIMS.claim(&"a");
                claimed.store(true, Ordering::SeqCst);
            })
        };
        drop(TEST_CLAIMS.claim(&"b"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!claimed.load(Ordering::SeqCst), "claimed twice at once");
        drop(first);
        second.join().unwrap();
        assert!(claimed.load(Ordering::SeqCst));
    }
}
