//! compressed-tensors 0.20.0 FP8 weights (`naive-quantized` and
//! `float-quantized`): `{m}.weight` F8_E4M3 `[out, in]` codes and
//! `{m}.weight_scale` in the model dtype, one per tensor (`[1]`), per output
//! channel (`[out, 1]`), per group of `g` inputs (`[out, in/g]`) or per
//! block (`[ceil(out/bh), ceil(in/bw)]`), as `config.json`'s
//! `quantization_config` says. Keys, math and config: spec/layouts.md §7.

pub(crate) mod family;
pub(crate) mod math;

use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, LogicalTensor, Param, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::layout::family::{out_part, Detected, Detector};

/// The family's name.
pub(crate) const NAME: &str = "ctfp8";
/// The scale tensor's name.
pub(crate) const SCALE: &str = "weight_scale";
/// The `quant_method` of the configs this family reads and writes.
pub(crate) const METHOD: &str = "compressed-tensors";
/// The largest group or block side a config may give.
const MAX_SIDE: u64 = 1 << 16;

/// How the scales divide the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// One scale, stored `[1]`.
    Tensor,
    /// One scale per output row, `[O, 1]`.
    Channel,
    /// One scale per `g` inputs of a row, `[O, I/g]` (`I % g == 0`).
    Group(u64),
    /// One scale per `bh x bw` block, `[ceil(O/bh), ceil(I/bw)]`.
    Block([u64; 2]),
}

/// A layout of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Format {
    /// The scale strategy.
    pub strategy: Strategy,
    /// `float-quantized` (FP8 activations too, dynamic per token) rather
    /// than `naive-quantized` (weights only); the stored weights are the
    /// same.
    pub dynamic_activations: bool,
}

impl Strategy {
    /// The spelling after `fp8:ct:`.
    pub(crate) fn spelling(self) -> String {
        match self {
            Strategy::Tensor => "tensor".into(),
            Strategy::Channel => "channel".into(),
            Strategy::Group(g) => format!("group={g}"),
            Strategy::Block([r, c]) => format!("block={r}x{c}"),
        }
    }

    fn parse(s: &str) -> Option<Strategy> {
        let side = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| (1..=MAX_SIDE).contains(&n) && v == n.to_string())
        };
        match s {
            "tensor" => Some(Strategy::Tensor),
            "channel" => Some(Strategy::Channel),
            _ => {
                if let Some(g) = s.strip_prefix("group=") {
                    return side(g).map(Strategy::Group);
                }
                let (r, c) = s.strip_prefix("block=")?.split_once('x')?;
                Some(Strategy::Block([side(r)?, side(c)?]))
            }
        }
    }

    /// The block each scale covers in a `[o, i]` weight, as rows x columns
    /// (the whole tensor, a row, a group of a row, a block).
    pub(crate) fn block(self, o: u64, i: u64) -> [u64; 2] {
        match self {
            Strategy::Tensor => [o.max(1), i.max(1)],
            Strategy::Channel => [1, i.max(1)],
            Strategy::Group(g) => [1, g],
            Strategy::Block(b) => b,
        }
    }

    /// The stored scale's shape for a `[o, i]` weight.
    pub(crate) fn scale_shape(self, o: u64, i: u64) -> Vec<u64> {
        match self {
            Strategy::Tensor => vec![1],
            Strategy::Channel => vec![o, 1],
            Strategy::Group(g) => vec![o, i / g],
            Strategy::Block([r, c]) => vec![o.div_ceil(r), i.div_ceil(c)],
        }
    }

    /// Whether the strategy can describe a `[o, i]` weight (a group must
    /// divide the row, as compressed-tensors requires).
    pub(crate) fn fits(self, _o: u64, i: u64) -> bool {
        match self {
            Strategy::Group(g) => i.is_multiple_of(g),
            _ => true,
        }
    }
}

impl Format {
    /// The layer record.
    pub(crate) fn record(&self) -> WeightQuant {
        let mut params = Vec::new();
        if self.dynamic_activations {
            params.push(Param {
                key: "activations".into(),
                value: "dynamic".into(),
            });
        }
        params.push(Param {
            key: "strategy".into(),
            value: self.strategy.spelling(),
        });
        WeightQuant::Family {
            name: NAME.into(),
            params,
        }
    }

    /// Reads a record of this family.
    pub(crate) fn of(w: &WeightQuant) -> Result<Format> {
        let WeightQuant::Family { name, params } = w else {
            return Err(Error::layout("not a compressed-tensors FP8 record"));
        };
        if name != NAME {
            return Err(Error::layout(format!(
                "`{name}` is not a compressed-tensors FP8 record"
            )));
        }
        let (mut strategy, mut dynamic_activations) = (None, false);
        for p in params {
            match (p.key.as_str(), p.value.as_str()) {
                ("strategy", v) => {
                    strategy = Some(Strategy::parse(v).ok_or_else(|| {
                        Error::layout(format!("compressed-tensors FP8 strategy `{v}` is unknown"))
                    })?)
                }
                ("activations", "dynamic") => dynamic_activations = true,
                (k, v) => {
                    return Err(Error::layout(format!(
                        "unknown compressed-tensors FP8 record parameter {k}={v}"
                    )))
                }
            }
        }
        Ok(Format {
            strategy: strategy.ok_or_else(|| {
                Error::layout("a compressed-tensors FP8 record names its strategy")
            })?,
            dynamic_activations,
        })
    }

    /// The `--to` spelling.
    pub(crate) fn spelling(&self) -> String {
        let mut s = format!("fp8:ct:{}", self.strategy.spelling());
        if self.dynamic_activations {
            s.push_str(":float-quantized");
        }
        s
    }

    /// Parses a `--to` spelling.
    pub(crate) fn parse(s: &str) -> Option<Format> {
        let rest = s.strip_prefix("fp8:ct:")?;
        let (rest, dynamic_activations) = match rest.strip_suffix(":float-quantized") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        Some(Format {
            strategy: Strategy::parse(rest)?,
            dynamic_activations,
        })
    }

    /// The compressed-tensors format name.
    pub(crate) fn format_name(&self) -> &'static str {
        if self.dynamic_activations {
            "float-quantized"
        } else {
            "naive-quantized"
        }
    }
}

/// What `config.json` beside the input says: a compressed-tensors config
/// whose one config group quantizes weights to 8-bit floats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CtFp8Config {
    /// The weights' layout.
    pub format: Format,
    /// `dtype` / `torch_dtype`, when BF16, F16 or F32.
    pub dtype: Option<Dtype>,
}

impl CtFp8Config {
    /// Reads the config's text: `None` when it is not a compressed-tensors
    /// config with FP8 weights.
    pub(crate) fn from_text(text: &str) -> Result<Option<CtFp8Config>> {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return Ok(None);
        };
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some(METHOD) {
            return Ok(None);
        }
        let Some(groups) = q.get("config_groups").and_then(|g| g.as_object()) else {
            return Ok(None);
        };
        let float: Vec<&serde_json::Value> = groups
            .values()
            .filter(|g| g.pointer("/weights/type").and_then(|t| t.as_str()) == Some("float"))
            .collect();
        let g = match float.as_slice() {
            [] => return Ok(None),
            [g] => *g,
            _ => {
                return Err(Error::malformed(
                    "quantization_config has several config groups with FP8 weights, which \
                     this version of ckptkit does not read yet",
                ))
            }
        };
        let bad = |why: String| Err(Error::malformed(format!("quantization_config: {why}")));
        let w = &g["weights"];
        let get_u = |k: &str| w.get(k).and_then(|x| x.as_u64());
        if get_u("num_bits") != Some(8)
            || w.get("symmetric").and_then(|s| s.as_bool()) != Some(true)
        {
            return bad(format!(
                "FP8 weights of {} bits, symmetric {}: only 8-bit symmetric FP8 is read",
                w.get("num_bits").unwrap_or(&serde_json::Value::Null),
                w.get("symmetric").unwrap_or(&serde_json::Value::Null)
            ));
        }
        let side = |n: Option<u64>| n.filter(|n| (1..=MAX_SIDE).contains(n));
        let strategy = match w.get("strategy").and_then(|s| s.as_str()) {
            Some("tensor") => Strategy::Tensor,
            Some("channel") => Strategy::Channel,
            Some("group") => match side(get_u("group_size")) {
                Some(g) => Strategy::Group(g),
                None => return bad(format!("group_size {:?}", w.get("group_size"))),
            },
            Some("block") => {
                let b: Option<Vec<u64>> = w
                    .get("block_structure")
                    .and_then(|b| b.as_array())
                    .map(|a| a.iter().filter_map(|x| side(x.as_u64())).collect());
                match b.as_deref() {
                    Some([r, c]) if w["block_structure"].as_array().map(Vec::len) == Some(2) => {
                        Strategy::Block([*r, *c])
                    }
                    _ => return bad(format!("block_structure {:?}", w.get("block_structure"))),
                }
            }
            s => return bad(format!("FP8 weight strategy {s:?} is not read")),
        };
        let format_name = g
            .get("format")
            .and_then(|f| f.as_str())
            .or_else(|| q.get("format").and_then(|f| f.as_str()));
        let dynamic_activations = match format_name {
            Some("float-quantized") => true,
            Some("naive-quantized") | None => false,
            Some(f) => return bad(format!("FP8 weights in format `{f}`, which is not read")),
        };
        let dtype = crate::layout::family::config_dtype(&v);
        Ok(Some(CtFp8Config {
            format: Format {
                strategy,
                dynamic_activations,
            },
            dtype,
        }))
    }

    /// The config beside an input (a file's directory, or the directory).
    pub(crate) fn beside(input: &Path) -> Result<Option<CtFp8Config>> {
        match crate::io::files::config_beside(input)? {
            Some((p, text)) => CtFp8Config::from_text(&text).map_err(|e| e.with_file(&p)),
            None => Ok(None),
        }
    }
}

/// compressed-tensors FP8 layer detection: with a config whose weights
/// are FP8, every `{m}.weight` F8_E4M3 beside a `{m}.weight_scale` of the
/// strategy's shape.
pub(crate) struct CtFp8Detector<'a> {
    src: &'a dyn TensorSource,
    config: Option<CtFp8Config>,
    /// The layouts ckptkit's schema records, by module (a file ckptkit
    /// wrote carries its layout with it, config.json or not).
    recorded: std::collections::BTreeMap<String, (Format, Option<Dtype>)>,
}

impl<'a> CtFp8Detector<'a> {
    pub(crate) fn new(
        src: &'a dyn TensorSource,
        config: Option<CtFp8Config>,
        schema: Option<&crate::format::st_schema::Schema>,
    ) -> Result<Self> {
        let mut recorded = std::collections::BTreeMap::new();
        for (path, e) in schema.into_iter().flatten() {
            if !e.weights.starts_with("fp8:ct") {
                continue;
            }
            let f = Format::parse(&e.weights).ok_or_else(|| {
                Error::layout(format!(
                    "ckptkit.schema: `{}` is not a compressed-tensors FP8 layout",
                    e.weights
                ))
                .with_layer(path.clone())
            })?;
            let dtype = Dtype::from_name(&e.dtype)
                .filter(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32));
            recorded.insert(path.clone(), (f, dtype));
        }
        Ok(CtFp8Detector {
            src,
            config,
            recorded,
        })
    }
}

impl Detector for CtFp8Detector<'_> {
    fn claim<'k>(&self, _key: &'k str) -> Option<&'k str> {
        None
    }

    fn detect(
        &self,
        path: &str,
        _claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        let (format, dtype) = match (self.recorded.get(path), &self.config) {
            (Some((r, _)), Some(c)) if *r != c.format => {
                return Err(Error::layout(format!(
                    "ckptkit.schema records {} and config.json says {}: which one the weights \
                     follow cannot be told",
                    r.spelling(),
                    c.format.spelling()
                ))
                .with_layer(path.to_string()))
            }
            (Some((r, d)), c) => (*r, d.or(c.as_ref().and_then(|c| c.dtype))),
            (None, Some(c)) => (c.format, c.dtype),
            (None, None) => return Ok(Detected::NotMine),
        };
        let find = |name: &str| {
            let k = crate::layout::family::key(path, name);
            others.iter().find(|t| t.key == k).copied()
        };
        let (Some(q), Some(s)) = (find("weight"), find(SCALE)) else {
            return Ok(Detected::NotMine);
        };
        if q.dtype != Dtype::F8E4M3 {
            return Ok(Detected::NotMine); // int8 layers are the int8 family's
        }
        let at = |e: Error| {
            e.with_layer(path.to_string())
                .with_tensor(s.key.clone())
                .with_file(self.src.describe())
        };
        let strategy = format.strategy;
        let (o, i) = match q.shape.as_slice() {
            [o, i] => (*o, *i),
            s => {
                return Err(at(Error::layout(format!(
                    "compressed-tensors FP8 weights are [out, in]; this one is {s:?}"
                ))))
            }
        };
        let want = strategy.scale_shape(o, i);
        if !strategy.fits(o, i)
            || s.shape != want
            || !matches!(s.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32)
        {
            return Err(at(Error::layout(format!(
                "the scales do not cover the weight: a [{o}, {i}] weight with strategy {} \
                 has BF16, F16 or F32 scales {want:?}{}, and `{SCALE}` is {} {:?}",
                strategy.spelling(),
                if strategy.fits(o, i) {
                    ""
                } else {
                    " (and a group must divide the row)"
                },
                s.dtype,
                s.shape
            ))));
        }
        // compressed-tensors keeps the scale in the model's dtype
        let dtype = dtype.unwrap_or(s.dtype);
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype,
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
