//! Executing a plan: layers in parallel, copies streamed and checked.

use crate::error::Result;
use crate::io::source::Checked;
use crate::migrate::plan::Plan;
use rayon::prelude::*;

use super::*;

/// Lossy re-layouts accepted while executing a plan.
pub(crate) type Losses = std::sync::Mutex<Vec<crate::migrate::plan::Loss>>;

pub(crate) fn run_layers(
    src: &Checked<'_>,
    p: &Plan,
    idx: &[usize],
    losses: &Losses,
    sink: &dyn Sink,
    ctl: &crate::Control,
) -> Result<()> {
    idx.par_iter().try_for_each(|&i| {
        ctl.check()?;
        let lp = &p.layers[i];
        let (tensors, loss) =
            crate::migrate::plan::execute(src, lp).map_err(|e| e.with_layer(lp.path.clone()))?;
        for (k, b) in tensors {
            match b {
                crate::migrate::plan::Produced::Bytes(b) => sink.put(&k, &b)?,
                crate::migrate::plan::Produced::Copy(from) => {
                    copy_one(src, &from, &k, sink).map_err(|e| e.with_layer(lp.path.clone()))?
                }
            }
        }
        if let Some(l) = loss {
            if let Ok(mut g) = losses.lock() {
                g.push(l);
            }
        }
        Ok(())
    })
}
