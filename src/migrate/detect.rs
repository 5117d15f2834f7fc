//! Layer detection: grouping a source's stored tensors into layers and
//! logical tensors, each family reading its own (`layout::family`), and
//! what `inspect` reports of them.

use std::collections::BTreeMap;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::format::layers::{plain_layers, split_key};
use crate::format::manifest::{
    Encoding, Layer, LogicalTensor, Part, Quantization, Role, Shard, WeightQuant,
};
use crate::io::source::{SourceTensor, TensorSource};
use crate::layout::family::Hints;
use crate::layout::quanto;
use crate::layout::registry::layout_name;

/// A layer as `inspect` reports it, for any source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerReport {
    /// Module path.
    pub path: String,
    /// Human-readable layout (`plain BF16`, `quanto qint8`, ...).
    pub layout: String,
    /// Logical tensors: name, dtype, shape.
    pub tensors: Vec<(String, String, Vec<u64>)>,
    /// Stored keys.
    pub stored: Vec<String>,
    /// Stored bytes.
    pub bytes: u64,
}

/// Describes the layers of a container from its manifest.
pub fn report_layers(layers: &[Layer]) -> Vec<LayerReport> {
    layers
        .iter()
        .map(|l| LayerReport {
            path: l.path.clone(),
            layout: layout_name(l),
            tensors: l
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.clone()))
                .collect(),
            stored: l.parts().map(|p| p.key.clone()).collect(),
            bytes: l
                .parts()
                .map(|p| crate::dtype::byte_len(p.dtype, &p.shape).unwrap_or(0))
                .sum(),
        })
        .collect()
}

/// Plain layers of any tensor source: every stored tensor is a plain
/// logical tensor of the layer named by its key up to the last dot.
pub fn source_layers(src: &dyn crate::io::source::TensorSource) -> Vec<Layer> {
    let shards: Vec<Shard> = src
        .files()
        .iter()
        .enumerate()
        .map(|(fi, name)| Shard {
            name: name.clone(),
            offset: 0,
            stored_len: 0,
            header_len: 0,
            header_blake3: [0; 32],
            compression: crate::format::manifest::Compression::None,
            tensors: src
                .tensors()
                .iter()
                .filter(|t| t.file == fi)
                .map(|t| crate::format::manifest::StoredTensor {
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    blake3: [0; 32],
                    codec: crate::format::manifest::Codec::Plain,
                    chunks: Vec::new(),
                })
                .collect(),
        })
        .collect();
    plain_layers(&shards)
}

/// Natural order of module paths: numeric components compare as numbers.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => {
                let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                    (Ok(i), Ok(j)) => i.cmp(&j),
                    _ => p.cmp(q),
                };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

fn plain_tensor(name: &str, t: &SourceTensor) -> LogicalTensor {
    LogicalTensor {
        name: name.to_string(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        encoding: Encoding::Plain,
        parts: vec![quanto::part(Role::Data, t)],
    }
}

/// Reads the layers of a source. Each family's detector claims the stored
/// keys its key scheme owns (quanto's `weight._data`, `weight._scale`, ...)
/// and reads the modules it recognises (from its side files, ckptkit's
/// schema, or the tensors themselves: spec/layouts.md §2.5, §3); what no
/// family reads is plain. Any contradiction between a hint and the tensors
/// is an error naming the layer; layers that stay ambiguous are listed
/// together in one error that says which hint resolves them.
pub fn detect_layers(src: &dyn TensorSource, hints: &Hints<'_>) -> Result<Vec<Layer>> {
    use crate::layout::family::{DetectCtx, Detected};
    use crate::layout::registry::FAMILIES;
    let schema = crate::format::st_schema::schema_of(src.metadata())
        .map_err(|e| e.with_file(src.describe()))?;
    let ctx = DetectCtx {
        src,
        schema: schema.as_ref(),
        hints,
    };
    let mut detectors = Vec::new();
    for f in FAMILIES {
        if let Some(d) = f.detector(&ctx)? {
            detectors.push(d);
        }
    }
    // group the stored tensors by module: claimed by a family, or plain
    /// A module's tensors in source order, each with the family that
    /// claimed it.
    #[derive(Default)]
    struct Module<'s> {
        items: Vec<(Option<usize>, &'s SourceTensor)>,
    }
    let mut groups: BTreeMap<String, Module<'_>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for t in src.tensors() {
        let claim = detectors
            .iter()
            .enumerate()
            .find_map(|(i, d)| d.claim(&t.key).map(|m| (i, m)));
        let module = claim.map(|(_, m)| m).unwrap_or_else(|| split_key(&t.key).0);
        let g = groups.entry(module.to_string()).or_insert_with(|| {
            order.push(module.to_string());
            Module::default()
        });
        g.items.push((claim.map(|(i, _)| i), t));
    }
    let mut ambiguous: Vec<String> = Vec::new();
    let mut ambiguous_by: Vec<usize> = Vec::new();
    let mut layers = Vec::with_capacity(order.len());
    order.sort_by(|a, b| natural_cmp(a, b));
    'module: for path in order {
        let Some(g) = groups.remove(&path) else {
            continue;
        };
        let mut found = None;
        for (i, d) in detectors.iter().enumerate() {
            let mine: Vec<&SourceTensor> = g
                .items
                .iter()
                .filter(|(j, _)| *j == Some(i))
                .map(|(_, t)| *t)
                .collect();
            let others: Vec<&SourceTensor> = g
                .items
                .iter()
                .filter(|(j, _)| *j != Some(i))
                .map(|(_, t)| *t)
                .collect();
            match d.detect(&path, &mine, &others)? {
                Detected::Found {
                    weight,
                    record,
                    used,
                } => {
                    found = Some((i, weight, record, used));
                    break;
                }
                Detected::Ambiguous => {
                    ambiguous.push(path.clone());
                    if !ambiguous_by.contains(&i) {
                        ambiguous_by.push(i);
                    }
                    continue 'module;
                }
                Detected::NotMine => {}
            }
        }
        // a family whose records say the module is its own, and did not read it
        for (i, d) in detectors.iter().enumerate() {
            if found.as_ref().map(|f| f.0) != Some(i) {
                if let Some(e) = d.insists(&path) {
                    return Err(e);
                }
            }
        }
        // an activation record only describes a module its family read, or
        // one that carries quanto's activation-scale buffers
        let has_act_buffers = g
            .items
            .iter()
            .any(|(_, t)| split_key(&t.key).1 == "input_scale");
        let activations = detectors
            .iter()
            .enumerate()
            .find_map(|(i, d)| d.activations(&path).map(|a| (i, a)))
            .filter(|(i, _)| found.as_ref().map(|f| f.0) == Some(*i) || has_act_buffers)
            .map(|(_, a)| a);
        let mut tensors: Vec<LogicalTensor> = Vec::new();
        let mut weights = WeightQuant::Plain;
        let mut used: Vec<String> = Vec::new();
        if let Some((_, weight, record, u)) = found {
            tensors.push(weight);
            weights = record;
            used = u;
        }
        for (_, t) in g.items.iter().filter(|(_, t)| !used.contains(&t.key)) {
            tensors.push(plain_tensor(
                crate::format::layers::split_key_after(&t.key, &path),
                t,
            ));
        }
        // two stored tensors that read as the same logical tensor (a plain
        // `weight` beside quanto's `weight._data`): which one the model
        // loads is undefined, so the layer is refused rather than guessed
        for (i, t) in tensors.iter().enumerate() {
            if let Some(u) = tensors[..i].iter().find(|u| u.name == t.name) {
                let stored = |l: &LogicalTensor| {
                    l.parts
                        .iter()
                        .map(|p| format!("`{}`", p.key))
                        .collect::<Vec<_>>()
                        .join(" + ")
                };
                return Err(Error::new(ErrorKind::Layout(format!(
                    "stored tensors {} and {} both read as `{}`; which one a loader takes is \
                     undefined; re-save the checkpoint with only one of them",
                    stored(u),
                    stored(t),
                    t.name
                )))
                .with_layer(path.clone())
                .with_file(src.describe()));
            }
        }
        layers.push(Layer {
            path,
            quant: Quantization {
                weights,
                activations,
            },
            tensors,
            extensions: Vec::new(),
        });
    }
    if !ambiguous.is_empty() {
        let n = ambiguous.len();
        let list: Vec<&str> = ambiguous.iter().take(20).map(|s| s.as_str()).collect();
        let hint = ambiguous_by
            .iter()
            .map(|&i| detectors[i].ambiguity_hint())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::new(ErrorKind::Ambiguous(format!(
            "{n} quantized layer(s) whose qtype or logical shape cannot be told from the tensors alone: {}{}; \
             {hint}, or convert from a ckptkit container or a file ckptkit wrote",
            list.join(", "),
            if n > 20 { ", ..." } else { "" }
        ))));
    }
    for d in &detectors {
        d.finish(&layers)?;
    }
    Ok(layers)
}

/// A layer that looks quantized in a layout ckptkit does not know: an
/// 8-bit or packed tensor (F8_*, I8, U8, I32) beside scale-like tensors
/// or a `scaled_fp8` marker, or named as quantized by a `quantization_config`
/// in `config.json`. Converting it as plain (casting its codes) would give
/// garbage, so conversions that would change it are refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Suspect {
    /// Module path.
    pub layer: String,
    /// The stored tensors that made it suspicious.
    pub tensors: Vec<String>,
    /// Why, in words.
    pub reason: String,
}

impl Suspect {
    /// One line for messages: the layer, its tensors, why.
    pub fn describe(&self) -> String {
        let layer = if self.layer.is_empty() {
            "(top level)"
        } else {
            &self.layer
        };
        format!(
            "layer `{layer}` ({}): {}",
            self.tensors.join(", "),
            self.reason
        )
    }
}

/// 8-bit and packed storage dtypes: what quantized payloads are stored in.
fn is_code_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E4M3Fnuz
            | Dtype::F8E5M2Fnuz
            | Dtype::F8E8M0
            | Dtype::I8
            | Dtype::U8
            | Dtype::I32
    )
}

/// Names of the tensors quantized layouts keep beside their codes: scales
/// (`weight_scale`, `scale_weight`, `weight_scale_inv`, `scales`, bnb's
/// `SCB` and `absmax`), zero points, GPTQ's `qzeros` and `g_idx`, quant
/// states.
fn is_scale_like(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("scale")
        || n == "scb"
        || n.contains("absmax")
        || n.contains("zero_point")
        || n == "qzeros"
        || n == "g_idx"
        || n.contains("quant_map")
        || n.contains("quant_state")
}

/// The marker tensor ComfyUI's legacy scaled-FP8 checkpoints carry.
pub const SCALED_FP8_MARKER: &str = "scaled_fp8";

/// Finds the plain layers that look quantized in an unknown layout
/// ([`Suspect`]). `quantized_by_config` is the `quant_method` of a
/// `quantization_config` found beside the input, if any. Layers that a
/// family recognised (quanto, int8) are never suspects.
pub fn suspects(
    src: &dyn TensorSource,
    layers: &[Layer],
    quantized_by_config: Option<&str>,
) -> Vec<Suspect> {
    let markers: Vec<&SourceTensor> = src
        .tensors()
        .iter()
        .filter(|t| t.key == SCALED_FP8_MARKER || t.key.ends_with(".scaled_fp8"))
        .collect();
    let marker = !markers.is_empty();
    // stored keys by module, to find companions like `x.weight.absmax`
    // (grouped under module `x.weight`) of a code tensor `x.weight`
    let mut by_module: std::collections::HashMap<&str, Vec<&SourceTensor>> = Default::default();
    for t in src.tensors() {
        by_module.entry(split_key(&t.key).0).or_default().push(t);
    }
    let mut out = Vec::new();
    for l in layers {
        if l.quant.weights != WeightQuant::Plain {
            continue;
        }
        let codes: Vec<&Part> = l
            .parts()
            .filter(|p| is_code_dtype(p.dtype) && !p.shape.contains(&0))
            .collect();
        if codes.is_empty() {
            continue;
        }
        let mut companions: Vec<String> = l
            .tensors
            .iter()
            .filter(|t| is_scale_like(&t.name))
            .flat_map(|t| t.parts.iter().map(|p| p.key.clone()))
            .collect();
        for c in &codes {
            if let Some(v) = by_module.get(c.key.as_str()) {
                companions.extend(v.iter().map(|t| t.key.clone()));
            }
        }
        let code_keys: Vec<String> = codes
            .iter()
            .map(|p| format!("{} {}", p.key, p.dtype))
            .collect();
        let reason = if !companions.is_empty() {
            Some(format!(
                "8-bit or packed codes beside scale-like tensors ({})",
                companions.join(", ")
            ))
        } else if marker
            && codes
                .iter()
                .any(|p| p.dtype.size() == 1 && p.dtype != Dtype::U8 && p.dtype != Dtype::I8)
        {
            Some(format!(
                "FP8 codes in a checkpoint that carries the `{SCALED_FP8_MARKER}` marker"
            ))
        } else {
            quantized_by_config.map(|m| {
                format!(
                    "8-bit or packed codes in a model whose config.json names it quantized \
                     (`quant_method: {m}`) in a layout ckptkit cannot read"
                )
            })
        };
        if let Some(reason) = reason {
            out.push(Suspect {
                layer: l.path.clone(),
                tensors: code_keys,
                reason,
            });
        }
    }
    // the legacy marker itself, when some FP8 codes of the file are left
    // unread (a layer without its `scale_weight`): the whole file is in
    // ComfyUI's legacy layout, and changing any layer of it is refused
    let unread_fp8 = layers.iter().any(|l| {
        l.quant.weights == WeightQuant::Plain
            && l.parts().any(|p| {
                matches!(p.dtype, Dtype::F8E4M3 | Dtype::F8E5M2)
                    && !p.shape.contains(&0)
                    && !markers.iter().any(|m| m.key == p.key)
            })
    });
    for t in markers.iter().filter(|_| unread_fp8) {
        out.push(Suspect {
            layer: split_key(&t.key).0.to_string(),
            tensors: vec![t.key.clone()],
            reason: format!(
                "the `{SCALED_FP8_MARKER}` marker of a legacy ComfyUI scaled-FP8 checkpoint"
            ),
        });
    }
    out
}
