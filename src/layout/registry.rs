//! The registry: every layout family, in detection order, and what asks
//! "whose is this record?". Adding a family is one line in [`FAMILIES`].

use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, WeightQuant};
use crate::io::source::TensorSource;
use crate::layout::family::{Family, Unknown};

/// The registry: every family, in detection order. Adding a family is one
/// line here.
pub(crate) static FAMILIES: &[&dyn Family] = &[
    &crate::layout::plain::Plain,
    // first: it claims exactly the keys `ckptkit.gguf.tensors` records
    &crate::layout::gguf::family::Gguf,
    &crate::layout::quanto::family::Quanto,
    // before int8: a ComfyUI int8 layer with its marker is also shaped
    // like compressed-tensors' int-quantized preset
    &crate::layout::comfy::family::Comfy,
    &crate::layout::fp8block::family::Fp8Block,
    &crate::layout::ctfp8::family::CtFp8,
    &crate::layout::int8::family::Int8,
    #[cfg(test)]
    &crate::layout::toy::Toy,
];

/// The family that owns a record: a registered one, or [`Unknown`] for a
/// family record no registered family owns.
pub(crate) fn family_of(w: &WeightQuant) -> &'static dyn Family {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.owns(w))
        .unwrap_or(&Unknown)
}

/// Whether a layer's record is of a family this version does not know.
pub(crate) fn is_unknown(l: &Layer) -> bool {
    of(l).name() == Unknown.name()
}

/// Refuses layers of unknown families where their record cannot be kept
/// (`doing`: what the caller was about to do), naming the first.
pub(crate) fn refuse_unknown(layers: &[Layer], doing: &str) -> Result<()> {
    match layers.iter().find(|l| is_unknown(l)) {
        Some(l) => Err(Unknown::refuse(&l.quant.weights, doing).with_layer(l.path.clone())),
        None => Ok(()),
    }
}

/// The family of a layer's record.
/// Whether a layer holds nothing but file-level markers (ComfyUI's legacy
/// `scaled_fp8`): it describes the file, not a module of the model.
pub(crate) fn only_file_markers(l: &Layer) -> bool {
    l.quant.weights == WeightQuant::Plain
        && l.parts().next().is_some()
        && l.parts()
            .all(|p| FAMILIES.iter().any(|f| f.is_file_marker(&p.key)))
}

pub(crate) fn of(l: &Layer) -> &'static dyn Family {
    family_of(&l.quant.weights)
}

/// Every file beside an input that some family reads.
pub(crate) fn side_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.side_names().iter().copied())
}

/// Every companion file any family writes beside a safetensors output.
pub(crate) fn companion_names() -> impl Iterator<Item = &'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.companion_names().iter().copied())
}

/// The companion files an output of `layers` needs, with their contents.
pub(crate) fn companions(layers: &[&Layer]) -> Vec<(&'static str, String)> {
    FAMILIES
        .iter()
        .flat_map(|f| {
            f.companion_names()
                .iter()
                .filter_map(move |&n| f.companion(n, layers).map(|c| (n, c)))
        })
        .collect()
}

/// Sets and removes the `__metadata__` entries the families keep about an
/// output's layers (`Family::metadata`).
pub(crate) fn apply_metadata(
    md: &mut std::collections::BTreeMap<String, String>,
    layers: &[&Layer],
) {
    for f in FAMILIES {
        for (k, v) in f.metadata(layers) {
            match v {
                Some(v) => {
                    md.insert(k.to_string(), v);
                }
                None => {
                    md.remove(k);
                }
            }
        }
    }
}

/// A `--to` spelling of any quantized family, as (family, target record).
pub(crate) fn parse_target(s: &str) -> Option<Result<(&'static dyn Family, WeightQuant)>> {
    FAMILIES
        .iter()
        .find_map(|f| f.parse_target(s).map(|r| r.map(|w| (*f, w))))
}

/// Every family's `--to` spellings, for messages.
pub(crate) fn spellings() -> String {
    FAMILIES
        .iter()
        .map(|f| f.spellings())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The display name of a layer's layout.
pub fn layout_name(l: &Layer) -> String {
    let w = of(l).weights_name(l);
    match &l.quant.activations {
        Some(a) => format!("{w}, activations {a}"),
        None => w,
    }
}

/// Gives every flat weight of `layers` its logical shape from a plain
/// checkpoint of the same model (`{path}.{name}` there, same element
/// count), through its family, and checks the layer again.
pub(crate) fn resolve_flat(layers: &mut [Layer], shapes: &dyn TensorSource) -> Result<()> {
    for l in layers.iter_mut() {
        let Some(t) = l
            .tensors
            .iter()
            .find(|t| t.encoding == Encoding::QuantizedFlat)
        else {
            continue;
        };
        let key = format!("{}.{}", l.path, t.name);
        let n = t.shape.first().copied().unwrap_or(0);
        let shape = match shapes.get(&key) {
            Some(s) if crate::dtype::numel(&s.shape).ok() == Some(n) => s.shape.clone(),
            Some(s) => {
                return Err(Error::layout(format!(
                    "`{key}` in {} is {:?}, not the {n} elements this layer stores",
                    shapes.describe(),
                    s.shape
                ))
                .with_layer(l.path.clone()))
            }
            None => {
                return Err(Error::layout(format!(
                    "{} has no `{key}` to take this flat weight's shape from",
                    shapes.describe()
                ))
                .with_layer(l.path.clone()))
            }
        };
        let fam = of(l);
        fam.resolve_flat(l, &shape)?;
        fam.check_layer(l)?;
    }
    Ok(())
}

/// Checks a layer record: its family's rules (`Family::check_layer`).
/// `verify` runs it on every layer of a container, so that a container
/// `verify` accepts is one every conversion can read.
pub fn check_layer(l: &Layer) -> Result<()> {
    of(l).check_layer(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit journal may rename only onto its weights file and the
    /// companion names `io::atomic` knows (so a planted journal cannot
    /// replace arbitrary files): every family's companion must be one of
    /// them, or its commit would be refused by its own recovery.
    #[test]
    fn every_family_companion_is_one_a_journal_may_commit() {
        for name in companion_names() {
            assert!(
                crate::io::atomic::COMPANION_NAMES.contains(&name),
                "`{name}` is written beside outputs but io::atomic::COMPANION_NAMES lacks it"
            );
        }
        for name in crate::io::atomic::COMPANION_NAMES {
            assert!(
                companion_names().any(|c| c == name),
                "io::atomic::COMPANION_NAMES lists `{name}`, which no family writes"
            );
        }
    }

    /// The quanto map an output needs, from the families: its quanto
    /// layers and the plain ones with quantized activations, in order;
    /// none when the output has neither.
    #[test]
    fn companions_come_from_the_families() {
        let layer = |path: &str, weights: WeightQuant, act: Option<&str>| Layer {
            path: path.into(),
            quant: crate::format::manifest::Quantization {
                weights,
                activations: act.map(String::from),
            },
            tensors: Vec::new(),
            extensions: Vec::new(),
        };
        let q = layer(
            "b",
            WeightQuant::Quanto {
                qtype: "qint8".into(),
                group_size: None,
            },
            None,
        );
        let ln = layer("a", WeightQuant::Plain, Some("qfloat8"));
        let p = layer("c", WeightQuant::Plain, None);
        let got = companions(&[&q, &ln, &p]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "quanto_qmap.json");
        let v: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "b": {"weights": "qint8", "activations": "none"},
                "a": {"weights": "none", "activations": "qfloat8"},
            })
        );
        assert!(got[0].1.find("\"b\"") < got[0].1.find("\"a\""));
        assert!(companions(&[&p]).is_empty());
    }
}
