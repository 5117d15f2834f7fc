//! A small pool of output buffers reused from tensor to tensor.
//!
//! A freshly allocated buffer of tens of MiB is fresh pages: the first
//! write to each 4 KiB page faults into the kernel, which costs more than
//! the dequantization that fills it (criterion `dequantize` vs
//! `dequantize_into`, benches/kernels.rs). Workers take a buffer, fill it,
//! hand it to the writer inside [`TensorBytes::Pooled`](super::TensorBytes),
//! and the buffer comes back here when the writer drops it.
//!
//! Memory stays bounded: the pool keeps at most [`MAX_POOLED`] idle
//! buffers, so idle memory is at most that many times the largest tensor.

use std::ops::Deref;
use std::sync::Mutex;

/// Most idle buffers kept.
pub const MAX_POOLED: usize = 4;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes, reusing an idle allocation when one is large
/// enough (the smallest such), else allocating. A reused buffer keeps its
/// previous bytes (only growth is zero-filled): callers overwrite all of it
/// (`dequantize_into` writes every element and checks the length).
pub fn take(len: usize) -> Vec<u8> {
    let reused = POOL.lock().ok().and_then(|mut p| {
        let best = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        Some(p.swap_remove(best))
    });
    let mut v = reused.unwrap_or_default();
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0);
    }
    v
}

/// Returns a buffer to the pool (dropped when the pool is full: then the
/// smallest buffer goes, so the pool keeps the sizes that are needed).
pub fn give(v: Vec<u8>) {
    if v.capacity() == 0 {
        return;
    }
    if let Ok(mut p) = POOL.lock() {
        p.push(v);
        if p.len() > MAX_POOLED {
            if let Some(i) = p
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
            {
                p.swap_remove(i);
            }
        }
    }
}

/// A buffer that returns to the pool when dropped.
#[derive(Debug)]
pub struct Pooled(Vec<u8>);

impl Pooled {
    /// Wraps a buffer (usually from [`take`]).
    pub fn new(v: Vec<u8>) -> Self {
        Pooled(v)
    }

    /// Takes the bytes out; the allocation then does not return to the pool.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }

    /// Bytes allocated (a reused buffer may be much larger than its
    /// contents).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl Deref for Pooled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_zeroed_and_bounded() {
        // (the pool is process-wide: other tests may use it concurrently, so
        // only properties that hold regardless are asserted)
        let mut a = take(1 << 20);
        assert!(a.iter().all(|&b| b == 0));
        a.fill(7);
        drop(Pooled::new(a));
        let b = take(1000);
        assert_eq!(b.len(), 1000);
        for _ in 0..3 * MAX_POOLED {
            give(vec![1u8; 64]);
        }
        assert!(POOL.lock().unwrap().len() <= MAX_POOLED);
        let v = Pooled::new(vec![5u8; 10]).into_vec();
        assert_eq!(v, vec![5u8; 10]);
    }
}
