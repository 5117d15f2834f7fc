//! A process-wide count of the entries that name lookups examine on the
//! per-tensor and per-layer paths (a scan adds the entries it looked at, an
//! indexed lookup adds 1). Tests read it to check that the work per tensor
//! does not grow with the tensor count; one relaxed atomic add per lookup.

use std::sync::atomic::{AtomicU64, Ordering};

static EXAMINED: AtomicU64 = AtomicU64::new(0);

/// Records `n` examined entries.
#[inline]
pub fn add(n: usize) {
    EXAMINED.fetch_add(n as u64, Ordering::Relaxed);
}

/// Entries examined so far by this process.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
pub fn count() -> u64 {
    EXAMINED.load(Ordering::Relaxed)
}

/// Finds the first element of `items` that `hit` accepts, counting the
/// elements examined.
#[inline]
pub fn find<T>(items: impl IntoIterator<Item = T>, mut hit: impl FnMut(&T) -> bool) -> Option<T> {
    let mut n = 0;
    let r = items.into_iter().find(|x| {
        n += 1;
        hit(x)
    });
    add(n);
    r
}
