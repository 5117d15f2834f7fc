//! Block FP8 as DeepSeek-V3 ships it and transformers' fine-grained FP8
//! quantizer writes it: `{m}.weight` F8_E4M3 `[out, in]` codes and
//! `{m}.weight_scale_inv` `[ceil(out/128), ceil(in/128)]`, F32 or (with
//! `scale_fmt: "ue8m0"`) F8_E8M0; `config.json`'s `quantization_config`
//! `{"quant_method": "fp8", "weight_block_size": [128, 128]}`. Keys, math,
//! ragged edge blocks and the E8M0 byte 0: spec/layouts.md §6.

pub(crate) mod family;
pub(crate) mod math;

use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, LogicalTensor, Param, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::layout::family::{out_part, Detected, Detector};

/// The family's name.
pub(crate) const NAME: &str = "fp8block";
/// The scale tensor's name (the inverse of the quantizer's multiplier).
pub(crate) const SCALE: &str = "weight_scale_inv";
/// The `quant_method` of the configs this family reads and writes.
pub(crate) const METHOD: &str = "fp8";
/// DeepSeek's and transformers' block: 128 x 128.
pub(crate) const BLOCK: [u64; 2] = [128, 128];
/// The largest block side a config may give (a block is a tile of a
/// matrix; larger values are refused rather than believed).
const MAX_BLOCK: u64 = 1 << 16;

/// A block FP8 layout: the block shape and how the scale is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Format {
    /// Rows x columns of one block.
    pub block: [u64; 2],
    /// Scales stored as F8_E8M0 powers of two (`scale_fmt: "ue8m0"`),
    /// else F32.
    pub ue8m0: bool,
}

impl Format {
    /// The layer record.
    pub(crate) fn record(&self) -> WeightQuant {
        WeightQuant::Family {
            name: NAME.into(),
            params: vec![
                Param {
                    key: "block".into(),
                    value: format!("{}x{}", self.block[0], self.block[1]),
                },
                Param {
                    key: "scale".into(),
                    value: if self.ue8m0 { "ue8m0" } else { "f32" }.into(),
                },
            ],
        }
    }

    /// Reads a record of this family.
    pub(crate) fn of(w: &WeightQuant) -> Result<Format> {
        let WeightQuant::Family { name, params } = w else {
            return Err(Error::layout("not a block FP8 record"));
        };
        if name != NAME {
            return Err(Error::layout(format!("`{name}` is not a block FP8 record")));
        }
        let (mut block, mut ue8m0) = (None, None);
        for p in params {
            match (p.key.as_str(), p.value.as_str()) {
                ("block", v) => block = Some(parse_block(v)?),
                ("scale", "f32") => ue8m0 = Some(false),
                ("scale", "ue8m0") => ue8m0 = Some(true),
                (k, v) => {
                    return Err(Error::layout(format!(
                        "unknown block FP8 record parameter {k}={v}"
                    )))
                }
            }
        }
        match (block, ue8m0) {
            (Some(block), Some(ue8m0)) => Ok(Format { block, ue8m0 }),
            _ => Err(Error::layout(
                "a block FP8 record names its block and scale form",
            )),
        }
    }

    /// The `--to` spelling.
    pub(crate) fn spelling(&self) -> String {
        let mut s = String::from("fp8:block");
        if self.block != BLOCK {
            s.push_str(&format!(":{}x{}", self.block[0], self.block[1]));
        }
        if self.ue8m0 {
            s.push_str(":ue8m0");
        }
        s
    }

    /// The stored scale's dtype.
    pub(crate) fn scale_dtype(&self) -> Dtype {
        if self.ue8m0 {
            Dtype::F8E8M0
        } else {
            Dtype::F32
        }
    }

    /// The scale grid of a `[n, k]` weight: `[ceil(n/bh), ceil(k/bw)]`.
    pub(crate) fn grid(&self, n: u64, k: u64) -> Vec<u64> {
        vec![n.div_ceil(self.block[0]), k.div_ceil(self.block[1])]
    }
}

/// `128x128` as a block.
fn parse_block(v: &str) -> Result<[u64; 2]> {
    let bad = || {
        Error::layout(format!(
            "block `{v}` is not ROWSxCOLS (1 to {MAX_BLOCK} each)"
        ))
    };
    let (a, b) = v.split_once('x').ok_or_else(bad)?;
    let side = |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|&n| (1..=MAX_BLOCK).contains(&n) && s == n.to_string())
    };
    Ok([side(a).ok_or_else(bad)?, side(b).ok_or_else(bad)?])
}

/// What `config.json` beside the input says: a `quant_method: "fp8"`
/// config's block (`None` when it says `weight_block_size: null`, a
/// per-tensor scale) and the model dtype it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fp8Config {
    /// `weight_block_size` (default 128 x 128); `None`: per tensor.
    pub block: Option<[u64; 2]>,
    /// `torch_dtype` / `dtype`, when BF16, F16 or F32.
    pub dtype: Option<Dtype>,
}

impl Fp8Config {
    /// Reads the config's text: `None` when it has no fp8
    /// `quantization_config`.
    pub(crate) fn from_text(text: &str) -> Result<Option<Fp8Config>> {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return Ok(None); // not JSON: other families say so if it matters
        };
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some(METHOD) {
            return Ok(None);
        }
        let block = match q.get("weight_block_size") {
            None => Some(BLOCK),
            Some(serde_json::Value::Null) => None,
            Some(b) => {
                let sides: Option<Vec<u64>> = b.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .filter(|n| (1..=MAX_BLOCK).contains(n))
                        .collect()
                });
                match sides.as_deref() {
                    Some([r, c]) if b.as_array().map(Vec::len) == Some(2) => Some([*r, *c]),
                    _ => {
                        return Err(Error::malformed(format!(
                            "quantization_config.weight_block_size is {b}, not two block sides \
                             of 1 to {MAX_BLOCK}"
                        )))
                    }
                }
            }
        };
        let dtype = crate::layout::family::config_dtype(&v);
        Ok(Some(Fp8Config { block, dtype }))
    }

    /// The config beside an input (a file's directory, or the directory).
    pub(crate) fn beside(input: &Path) -> Result<Option<Fp8Config>> {
        match crate::io::files::config_beside(input)? {
            Some((p, text)) => Fp8Config::from_text(&text).map_err(|e| e.with_file(&p)),
            None => Ok(None),
        }
    }
}

/// Block FP8 layer detection over one source: `{m}.weight` F8_E4M3 beside
/// `{m}.weight_scale_inv`, the scale grid checked against the block.
pub(crate) struct Fp8BlockDetector<'a> {
    src: &'a dyn TensorSource,
    config: Option<Fp8Config>,
    /// The model dtype of a layer with no bias: the config's, else the
    /// first BF16/F16/F32 tensor that is not a scale, else BF16 (what
    /// DeepSeek's converter writes).
    model_dtype: Dtype,
}

impl<'a> Fp8BlockDetector<'a> {
    pub(crate) fn new(src: &'a dyn TensorSource, config: Option<Fp8Config>) -> Self {
        let model_dtype = config
            .as_ref()
            .and_then(|c| c.dtype)
            .or_else(|| {
                src.tensors()
                    .iter()
                    .filter(|t| !crate::format::layers::split_key(&t.key).1.contains("scale"))
                    .map(|t| t.dtype)
                    .find(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32))
            })
            .unwrap_or(Dtype::BF16);
        Fp8BlockDetector {
            src,
            config,
            model_dtype,
        }
    }

    /// The model dtype of a layer: its bias's, else the model's.
    fn dtype_of(&self, path: &str, others: &[&SourceTensor]) -> Dtype {
        let bias = crate::layout::family::key(path, "bias");
        others
            .iter()
            .find(|t| t.key == bias)
            .map(|b| b.dtype)
            .filter(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32))
            .unwrap_or(self.model_dtype)
    }
}

impl Detector for Fp8BlockDetector<'_> {
    fn claim<'k>(&self, _key: &'k str) -> Option<&'k str> {
        // `{m}.weight` and `{m}.weight_scale_inv` are module m's by their keys
        None
    }

    fn detect(
        &self,
        path: &str,
        _claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        let find = |name: &str| {
            let k = crate::layout::family::key(path, name);
            others.iter().find(|t| t.key == k).copied()
        };
        let Some(s) = find(SCALE) else {
            return Ok(Detected::NotMine);
        };
        let at = |e: Error| {
            e.with_layer(path.to_string())
                .with_tensor(s.key.clone())
                .with_file(self.src.describe())
        };
        let Some(q) = find("weight") else {
            return Err(at(Error::layout(format!(
                "`{SCALE}` without the `weight` it scales"
            ))));
        };
        if q.dtype != Dtype::F8E4M3 || q.shape.len() != 2 {
            return Err(at(Error::layout(format!(
                "a `{SCALE}` scales F8_E4M3 [out, in] codes; `weight` is {} {:?}",
                q.dtype, q.shape
            ))));
        }
        let block = match &self.config {
            Some(Fp8Config { block: None, .. }) => {
                return Err(at(Error::layout(
                    "config.json says weight_block_size: null (one scale per tensor), which \
                     this version of ckptkit does not read yet",
                )))
            }
            Some(Fp8Config { block: Some(b), .. }) => *b,
            None => BLOCK,
        };
        let format = Format {
            block,
            ue8m0: s.dtype == Dtype::F8E8M0,
        };
        let grid = format.grid(q.shape[0], q.shape[1]);
        if !matches!(s.dtype, Dtype::F32 | Dtype::F8E8M0) || s.shape != grid {
            return Err(at(Error::layout(format!(
                "the block scales do not cover the weight: a [{}, {}] weight in blocks of \
                 {}x{}{} has F32 or F8_E8M0 scales {:?}, and `{SCALE}` is {} {:?}{}",
                q.shape[0],
                q.shape[1],
                block[0],
                block[1],
                if self.config.is_some() {
                    " (config.json's weight_block_size)"
                } else {
                    " (the default; no config.json with a weight_block_size was found)"
                },
                grid,
                s.dtype,
                s.shape,
                if self.config.is_none() {
                    "; put the model's config.json beside the file"
                } else {
                    ""
                }
            ))));
        }
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype: self.dtype_of(path, others),
                shape: q.shape.clone(),
                encoding: Encoding::Quantized,
                parts: vec![
                    out_part(Role::Data, q.key.clone(), q.dtype, q.shape.clone()),
                    out_part(Role::Scale, s.key.clone(), s.dtype, s.shape.clone()),
                ],
            },
            record: format.record(),
            used: vec![q.key.clone(), s.key.clone()],
        })
    }
}

#[cfg(test)]
mod tests;
