//! Writing a compressed shard of a planned conversion once, in data order.
//!
//! A compressed shard takes its tensors in data order ([`data_order`]):
//! by alignment class, then key. A layer's tensors of the largest class
//! (its weight's codes and, in a real model, its scale and bias) are
//! adjacent; its tensors of smaller classes (scalar activation scales, a
//! small layer's scale) come later, with the other small tensors. The
//! shard's keys are walked in that order; a layer is executed when its
//! first output falls due, that tensor is written, and the layer's other
//! computed outputs wait in memory until their turn (copied outputs do not
//! wait: they are streamed from the source when due). What waits is mostly
//! small; the wait is capped all the same ([`PENDING_CAP`]): past it, the
//! tensors due last are dropped and their layer executed again when they
//! fall due (execution is deterministic; a layer's loss is recorded once).
//! A few layers with outputs due soon are executed together, in parallel,
//! when those outputs fit under the cap.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;

use crate::control::Control;
use crate::error::{Error, Result};
use crate::format::st_header::data_order;
use crate::io::source::Checked;
use crate::io::writer::ContainerWriter;
use crate::io::TensorBytes;
use crate::migrate::plan::{Loss, Plan, Produced};

use super::{copy_one, outputs_of, Losses};

/// Bytes of computed tensors held in memory until their turn in a
/// compressed shard's data order. Data order keeps a layer's largest-class
/// tensors together, so what waits is mostly its small ones; a layer whose
/// outputs span classes with large tensors in each (odd shapes) can still
/// leave large outputs waiting. Past this cap the tensors due last are not
/// held but computed again, by executing their layer again, when due.
pub(crate) const PENDING_CAP: u64 = 256 << 20;

/// Most layers executed together (ahead of need, in parallel).
const MAX_BATCH: usize = 8;

/// Keys looked at ahead of the one due when gathering layers to execute
/// together; their outputs in this window are the ones kept for sure.
const LOOKAHEAD_KEYS: usize = 256;

/// What walking a shard in data order does: execute a layer, write a
/// tensor's bytes, stream a copied tensor, record a loss.
pub(crate) trait Due: Sync {
    /// A layer's loss (recorded once per layer).
    type Loss: Send;
    /// Stops when the conversion is cancelled.
    fn check(&self) -> Result<()>;
    /// Executes layer `layer`: its output keys with bytes or the source key
    /// to copy, and its loss. Deterministic; called `again` for a layer
    /// executed before, whose dropped outputs are due.
    #[allow(clippy::type_complexity)]
    fn execute(
        &self,
        layer: usize,
        again: bool,
    ) -> Result<(Vec<(String, Produced)>, Option<Self::Loss>)>;
    /// Writes one tensor's bytes.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Streams source tensor `from` as output tensor `to` (of `layer`).
    fn copy(&self, layer: usize, from: &str, to: &str) -> Result<()>;
    /// Records a layer's loss.
    fn loss(&self, loss: Self::Loss);
}

/// Computed tensors waiting for their turn, by position in data order, at
/// most `cap` bytes in all.
struct Waiting {
    by_pos: BTreeMap<usize, TensorBytes>,
    held: u64,
    cap: u64,
}

impl Waiting {
    fn has(&self, p: usize) -> bool {
        self.by_pos.contains_key(&p)
    }
    fn take(&mut self, p: usize) -> Option<TensorBytes> {
        let b = self.by_pos.remove(&p)?;
        self.held -= b.len() as u64;
        Some(b)
    }
    /// Bytes held for positions before `end`.
    fn held_before(&self, end: usize) -> u64 {
        self.by_pos.range(..end).map(|(_, b)| b.len() as u64).sum()
    }
    /// Holds the tensor at position `p` when it fits, making room by
    /// dropping tensors due after it, the last due first (they are
    /// computed again when due); else drops it (and nothing else).
    fn offer(&mut self, p: usize, b: TensorBytes) {
        let n = b.len() as u64;
        if self.held.saturating_add(n) <= self.cap {
            // under the cap (the common case): O(log n), no scan
            self.held += n;
            self.by_pos.insert(p, compact(b));
            return;
        }
        let later: u64 = self
            .by_pos
            .range(p + 1..)
            .map(|(_, b)| b.len() as u64)
            .sum();
        if (self.held - later).saturating_add(n) > self.cap {
            return;
        }
        while self.held.saturating_add(n) > self.cap {
            match self.by_pos.last_key_value() {
                Some((&q, _)) if q > p => {
                    if let Some((_, v)) = self.by_pos.pop_last() {
                        self.held -= v.len() as u64;
                    }
                }
                _ => break,
            }
        }
        if self.held.saturating_add(n) <= self.cap {
            self.held += n;
            self.by_pos.insert(p, compact(b));
        }
    }
}

/// Writes every tensor of `order` (a shard's output keys with their byte
/// lengths, in data order), each exactly once and in that order, executing
/// the layers `owner` names for them, with at most `cap` computed bytes
/// waiting for their turn.
pub(crate) fn write_in_order<D: Due>(
    d: &D,
    order: &[(String, u64)],
    owner: &HashMap<String, usize>,
    cap: u64,
) -> Result<()> {
    let n = order.len();
    let pos: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_str(), i))
        .collect();
    // each layer's output positions
    let mut outputs: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, (k, _)) in order.iter().enumerate() {
        if let Some(&l) = owner.get(k) {
            outputs.entry(l).or_default().push(i);
        }
    }
    let mut waiting = Waiting {
        by_pos: BTreeMap::new(),
        held: 0,
        cap,
    };
    // copied tensors known from executed layers: position -> (source key, layer)
    let mut copies: HashMap<usize, (String, usize)> = HashMap::new();
    // layers executed at least once (their loss recorded)
    let mut executed: HashSet<usize> = HashSet::new();
    let width = rayon::current_num_threads().clamp(1, MAX_BATCH);
    for (at, (key, _)) in order.iter().enumerate() {
        d.check()?;
        if let Some(b) = waiting.take(at) {
            d.put(key, &b)?;
            continue;
        }
        if let Some((from, layer)) = copies.remove(&at) {
            d.copy(layer, &from, key)?;
            continue;
        }
        let due = owner.get(key).copied().ok_or_else(|| {
            Error::usage(format!("tensor `{key}` is planned but no layer outputs it"))
                .with_tensor(key.clone())
        })?;
        // the layer due, and a few more with outputs due soon, as long as
        // the outputs due soon (the window) fit: those are then kept
        let end = (at + 1 + LOOKAHEAD_KEYS).min(n);
        let soon = |l: usize| -> u64 {
            outputs.get(&l).map_or(0, |ps| {
                ps.iter()
                    .filter(|&&p| p > at && p < end && !waiting.has(p) && !copies.contains_key(&p))
                    .map(|&p| order[p].1)
                    .sum()
            })
        };
        let mut room = cap
            .saturating_sub(waiting.held_before(end))
            .saturating_sub(soon(due));
        let mut batch = vec![due];
        for (p, (k, _)) in order.iter().enumerate().take(end).skip(at + 1) {
            if batch.len() >= width {
                break;
            }
            if waiting.has(p) || copies.contains_key(&p) {
                continue;
            }
            let Some(&l) = owner.get(k) else {
                continue;
            };
            if batch.contains(&l) {
                continue;
            }
            let need = soon(l);
            if need > room {
                break;
            }
            room -= need;
            batch.push(l);
        }
        let results: Vec<_> = if batch.len() == 1 {
            vec![d.execute(due, executed.contains(&due))]
        } else {
            batch
                .par_iter()
                .map(|&l| d.execute(l, executed.contains(&l)))
                .collect()
        };
        let mut written = false;
        let mut computed: Vec<(usize, TensorBytes)> = Vec::new();
        for (&l, r) in batch.iter().zip(results) {
            let (outs, loss) = r?;
            if executed.insert(l) {
                if let Some(loss) = loss {
                    d.loss(loss);
                }
            }
            for (k, produced) in outs {
                let Some(&kp) = pos.get(k.as_str()) else {
                    return Err(Error::usage(format!(
                        "layer output `{k}` is not planned in this shard"
                    ))
                    .with_tensor(k));
                };
                if kp < at || waiting.has(kp) || copies.contains_key(&kp) {
                    // written already, or waiting from an earlier execution
                    continue;
                }
                if kp == at {
                    match produced {
                        Produced::Bytes(b) => d.put(&k, &b)?,
                        Produced::Copy(from) => d.copy(l, &from, &k)?,
                    }
                    written = true;
                    continue;
                }
                match produced {
                    Produced::Copy(from) => {
                        copies.insert(kp, (from, l));
                    }
                    Produced::Bytes(b) => computed.push((kp, b)),
                }
            }
        }
        // the soonest due first: the window's outputs fit (room was kept
        // for them), later ones as far as the cap allows
        computed.sort_by_key(|(p, _)| *p);
        for (p, b) in computed {
            waiting.offer(p, b);
        }
        if !written {
            return Err(Error::usage(format!(
                "tensor `{key}` is planned but its layer did not output it"
            ))
            .with_tensor(key.clone()));
        }
    }
    Ok(())
}

/// The bytes of a tensor about to wait in the cache, in an allocation of
/// their size: a small tensor filled into a large reused buffer
/// ([`pool`](crate::io::pool)) is copied out and the buffer goes back, so
/// that what waits holds no more memory than the cache counts.
fn compact(b: TensorBytes) -> TensorBytes {
    let roomy = |cap: usize, len: usize| cap > len.saturating_mul(2).saturating_add(4096);
    match b {
        TensorBytes::Pooled(p) if roomy(p.capacity(), p.len()) => TensorBytes::Owned(p.to_vec()),
        TensorBytes::Owned(mut v) if roomy(v.capacity(), v.len()) => {
            v.shrink_to_fit();
            TensorBytes::Owned(v)
        }
        b => b,
    }
}

/// One shard of a planned conversion into a compressed container.
struct PlannedShard<'a, 's> {
    src: &'a Checked<'s>,
    p: &'a Plan,
    losses: &'a Losses,
    w: &'a ContainerWriter,
    ctl: &'a Control,
}

impl Due for PlannedShard<'_, '_> {
    type Loss = Loss;
    fn check(&self) -> Result<()> {
        self.ctl.check()
    }
    fn execute(
        &self,
        layer: usize,
        again: bool,
    ) -> Result<(Vec<(String, Produced)>, Option<Loss>)> {
        let lp = self
            .p
            .layers
            .get(layer)
            .ok_or_else(|| Error::usage(format!("layer {layer} is not in the plan")))?;
        let r = if again {
            // checked again, but the tensors read without a hash to check
            // were counted the first time
            let src = Checked::new(self.src.inner(), self.src.verifying());
            crate::migrate::plan::execute(&src, lp)
        } else {
            crate::migrate::plan::execute(self.src, lp)
        };
        r.map_err(|e| e.with_layer(lp.path.clone()))
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.w.write_tensor(key, bytes).map(|_| ())
    }
    fn copy(&self, layer: usize, from: &str, to: &str) -> Result<()> {
        copy_one(self.src, from, to, self.w).map_err(|e| match self.p.layers.get(layer) {
            Some(lp) => e.with_layer(lp.path.clone()),
            None => e,
        })
    }
    fn loss(&self, loss: Loss) {
        if let Ok(mut g) = self.losses.lock() {
            g.push(loss);
        }
    }
}

/// Executes the layers `idx` of `p` into the open compressed shard of `w`
/// (planned with [`outputs_of`]`(p, idx)`), writing every tensor once, in
/// data order.
pub(crate) fn write_shard_once(
    src: &Checked<'_>,
    p: &Plan,
    idx: &[usize],
    losses: &Losses,
    w: &ContainerWriter,
    ctl: &Control,
) -> Result<()> {
    let mut order = outputs_of(p, idx);
    data_order(&mut order);
    let order = order
        .into_iter()
        .map(|(k, d, s)| {
            let n = crate::dtype::byte_len(d, &s).map_err(|e| e.with_tensor(k.clone()))?;
            Ok((k, n))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut owner = HashMap::with_capacity(order.len());
    for &i in idx {
        if let Some(l) = p.layers.get(i) {
            for part in l.output.parts() {
                owner.insert(part.key.clone(), i);
            }
        }
    }
    let shard = PlannedShard {
        src,
        p,
        losses,
        w,
        ctl,
    };
    write_in_order(&shard, &order, &owner, PENDING_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Fake layers: layer `l` outputs `n` tensors `l.t{j}` of `size(l, j)`
    /// bytes, every third one a copy of source `src.l.t{j}`.
    struct Fake {
        layers: Vec<Vec<(String, usize)>>,
        /// Data order: by `rank(j)`, then layer, then `j`.
        rank: fn(usize) -> usize,
        runs: Vec<AtomicUsize>,
        written: Mutex<Vec<(String, Vec<u8>)>>,
        losses: Mutex<Vec<usize>>,
        cancel_after: Option<usize>,
    }

    fn bytes_of(key: &str, n: usize) -> Vec<u8> {
        let h = blake3::hash(key.as_bytes());
        (0..n).map(|i| h.as_bytes()[i % 32] ^ (i as u8)).collect()
    }

    impl Fake {
        fn new(n_layers: usize, per: usize, size: impl Fn(usize, usize) -> usize) -> Fake {
            let layers = (0..n_layers)
                .map(|l| {
                    (0..per)
                        .map(|j| (format!("l{l:03}.t{j}"), size(l, j)))
                        .collect()
                })
                .collect();
            Fake {
                layers,
                rank: |j| j,
                runs: (0..n_layers).map(|_| AtomicUsize::new(0)).collect(),
                written: Mutex::new(Vec::new()),
                losses: Mutex::new(Vec::new()),
                cancel_after: None,
            }
        }
        fn is_copy(j: usize) -> bool {
            j % 3 == 2
        }
        /// Keys in a data-order-like interleaving (by default by tensor
        /// index, then layer: each layer's outputs far apart), with sizes.
        fn order(&self) -> (Vec<(String, u64)>, HashMap<String, usize>) {
            let mut all = Vec::new();
            let mut owner = HashMap::new();
            for (l, ts) in self.layers.iter().enumerate() {
                for (j, (k, n)) in ts.iter().enumerate() {
                    all.push(((self.rank)(j), l, j, k.clone(), *n as u64));
                    owner.insert(k.clone(), l);
                }
            }
            all.sort();
            let order = all.into_iter().map(|(_, _, _, k, n)| (k, n)).collect();
            (order, owner)
        }
        fn expected(&self, key: &str) -> Vec<u8> {
            let n = self
                .layers
                .iter()
                .flatten()
                .find(|(k, _)| k == key)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            bytes_of(key, n)
        }
    }

    impl Due for Fake {
        type Loss = usize;
        fn check(&self) -> Result<()> {
            match self.cancel_after {
                Some(n) if self.written.lock().unwrap().len() >= n => {
                    Err(Error::new(crate::error::ErrorKind::Interrupted))
                }
                _ => Ok(()),
            }
        }
        fn execute(
            &self,
            layer: usize,
            again: bool,
        ) -> Result<(Vec<(String, Produced)>, Option<usize>)> {
            let before = self.runs[layer].fetch_add(1, Ordering::SeqCst);
            assert_eq!(again, before > 0, "layer {layer}: `again` iff run before");
            let outs = self.layers[layer]
                .iter()
                .enumerate()
                .map(|(j, (k, n))| {
                    let p = if Fake::is_copy(j) {
                        Produced::Copy(format!("src.{k}"))
                    } else {
                        Produced::Bytes(TensorBytes::Owned(bytes_of(k, *n)))
                    };
                    (k.clone(), p)
                })
                .collect();
            // odd layers are lossy
            Ok((outs, (layer % 2 == 1).then_some(layer)))
        }
        fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
            self.written
                .lock()
                .unwrap()
                .push((key.to_string(), bytes.to_vec()));
            Ok(())
        }
        fn copy(&self, layer: usize, from: &str, to: &str) -> Result<()> {
            assert_eq!(from, format!("src.{to}"));
            assert!(to.starts_with(&format!("l{layer:03}.")));
            let n = self.layers[layer]
                .iter()
                .find(|(k, _)| k == to)
                .map(|(_, n)| *n)
                .unwrap();
            self.put(to, &bytes_of(to, n))
        }
        fn loss(&self, loss: usize) {
            self.losses.lock().unwrap().push(loss);
        }
    }

    fn run(f: &Fake, cap: u64) -> Result<()> {
        let (order, owner) = f.order();
        write_in_order(f, &order, &owner, cap)
    }

    fn check_all_once(f: &Fake) {
        let (order, _) = f.order();
        let written = f.written.lock().unwrap();
        let keys: Vec<&str> = written.iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = order.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, want, "every tensor once, in data order");
        for (k, b) in written.iter() {
            assert_eq!(b, &f.expected(k), "{k}");
        }
        let mut losses = f.losses.lock().unwrap().clone();
        losses.sort();
        let want: Vec<usize> = (0..f.layers.len()).filter(|l| l % 2 == 1).collect();
        assert_eq!(losses, want, "each lossy layer's loss recorded once");
    }

    #[test]
    fn a_large_cache_executes_each_layer_once() {
        let f = Fake::new(20, 5, |l, j| 100 + 10 * l + j);
        run(&f, PENDING_CAP).unwrap();
        check_all_once(&f);
        for (l, r) in f.runs.iter().enumerate() {
            assert_eq!(r.load(Ordering::SeqCst), 1, "layer {l}");
        }
    }

    #[test]
    fn a_tiny_cache_recomputes_but_writes_each_tensor_once_in_order() {
        // each tensor 100..=300 bytes, the cap fits about two of them
        let f = Fake::new(12, 5, |l, j| 100 + 37 * ((l + j) % 6));
        run(&f, 450).unwrap();
        check_all_once(&f);
        let runs: usize = f.runs.iter().map(|r| r.load(Ordering::SeqCst)).sum();
        assert!(runs > 12, "the cap forced re-executions ({runs})");
    }

    #[test]
    fn no_cache_at_all_still_works() {
        let f = Fake::new(7, 4, |_, j| 50 + j);
        run(&f, 0).unwrap();
        check_all_once(&f);
        // with nothing held, a layer runs once per computed output (copies
        // are remembered, not held)
        for r in &f.runs {
            assert_eq!(r.load(Ordering::SeqCst), 3);
        }
    }

    #[test]
    fn tensors_larger_than_the_cap_are_written_when_due() {
        let f = Fake::new(6, 3, |l, j| if j == 0 { 5000 + l } else { 10 + j });
        run(&f, 1000).unwrap();
        check_all_once(&f);
    }

    #[test]
    fn small_outputs_first_large_last_runs_each_layer_at_most_twice() {
        // like quantized layers in data order: every layer's small tensors
        // (t0..t3, t2 a copy) first, then every layer's large one (t4)
        for cap in [0, 1_000, 3_005, 3_050, 7_777, 1 << 20] {
            let mut f = Fake::new(16, 5, |l, j| if j == 4 { 1000 } else { 10 + l + j });
            f.rank = |j| usize::from(j == 4);
            run(&f, cap).unwrap();
            check_all_once(&f);
            let runs: Vec<usize> = f.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
            // small tensors always fit once the cache can hold a few: they
            // push out the large ones due last, which are computed again
            if cap >= 1_000 {
                assert!(runs.iter().all(|&r| r <= 2), "cap {cap}: {runs:?}");
                let once = runs.iter().filter(|&&r| r == 1).count() as u64;
                let held = (cap.saturating_sub(16 * 40) / 1000).min(16);
                assert!(once >= held, "cap {cap}: {runs:?}");
            }
            if cap >= 1 << 20 {
                assert!(runs.iter().all(|&r| r == 1), "{runs:?}");
            }
        }
    }

    #[test]
    fn a_tensor_that_cannot_fit_drops_nothing_else() {
        // each layer: t0 (due first), t1 (due after every t0), t3 and the
        // copy t2 (due last); t1 is larger than the cap in even layers and
        // small in odd ones. Computed early, the large t1s are dropped
        // without pushing out the odd layers' waiting t1 and t3, so odd
        // layers run once, even ones twice (for t1)
        let mut f = Fake::new(10, 4, |l, j| if j == 1 && l % 2 == 0 { 5000 } else { 10 });
        f.rank = |j| [0, 1, 2, 2][j];
        run(&f, 1000).unwrap();
        check_all_once(&f);
        let runs: Vec<usize> = f.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        let want: Vec<usize> = (0..10).map(|l| if l % 2 == 0 { 2 } else { 1 }).collect();
        assert_eq!(runs, want);
    }

    #[test]
    fn a_missing_output_is_an_error_not_a_skip() {
        let f = Fake::new(3, 2, |_, _| 8);
        let (mut order, mut owner) = f.order();
        order.push(("ghost".into(), 8));
        owner.insert("ghost".into(), 1);
        let e = write_in_order(&f, &order, &owner, PENDING_CAP).unwrap_err();
        assert!(e.to_string().contains("ghost"), "{e}");
    }

    #[test]
    fn cancellation_stops_between_tensors() {
        let mut f = Fake::new(5, 3, |_, _| 16);
        f.cancel_after = Some(4);
        let e = run(&f, PENDING_CAP).unwrap_err();
        assert!(matches!(e.kind(), crate::error::ErrorKind::Interrupted));
        assert_eq!(f.written.lock().unwrap().len(), 4);
    }
}
