//! `check`: will a checkpoint load where a reference's layout is expected?

use crate::error::{ErrorKind, Result};
use crate::format::manifest::Layer;
use crate::io::open::open_source;
use crate::migrate::plan::{plan, PlanOptions, Target};
use std::collections::BTreeMap;
use std::path::Path;

use super::*;

/// Reads a `--like` reference: a family's side file alone (a
/// `quanto_qmap.json`), a checkpoint (with its side files beside it, if
/// any) or a container.
pub fn like_target(reference: &Path) -> Result<Target> {
    let is_json = reference.extension().and_then(|e| e.to_str()) == Some("json");
    // a family's own side file (quanto's map), alone or beside the reference
    let from_side = |alone: bool| -> Result<Option<Target>> {
        for f in crate::layout::registry::FAMILIES {
            if let Some(layers) = f.like_from_side_file(reference, alone)? {
                let mut m = BTreeMap::new();
                let mut order = Vec::new();
                for (k, layout, activations) in layers {
                    order.push(k.clone());
                    let like = crate::migrate::plan::LikeLayer {
                        layout,
                        activations,
                        shape: None,
                        dtype: None,
                    };
                    m.insert(k, like);
                }
                return Ok(Some(Target::Like(m, order)));
            }
        }
        Ok(None)
    };
    if is_json {
        return from_side(true)?.ok_or_else(|| {
            Error::usage(format!(
                "{} is not a side file any layout family reads (quanto's `quanto_qmap.json`)",
                reference.display()
            ))
        });
    }
    let src = open_source(reference)?;
    let layers = match input_layers(reference, src.as_ref(), &ConvertOptions::default()) {
        Ok(l) => l,
        // --like needs each layer's layout (qtype; the group rule follows
        // from the input's shapes), not the reference's logical shapes: a
        // reference whose packed layers cannot be told apart without a
        // shape hint still gives its layouts through its map
        Err(e) if matches!(e.kind(), ErrorKind::Ambiguous(_)) => match from_side(false)? {
            Some(t) => return Ok(t),
            None => return Err(e.with_file(reference)),
        },
        Err(e) => return Err(e),
    };
    like_of_layers(layers, &reference.display().to_string())
}

/// The `--like` target of a reference's layers (`reference` names it in
/// errors).
fn like_of_layers(layers: Vec<Layer>, reference: &str) -> Result<Target> {
    let mut m = BTreeMap::new();
    let mut order = Vec::new();
    // a file-level marker's layer is the output's to make, not a module
    // the input must have
    for l in layers
        .into_iter()
        .filter(|l| !crate::layout::registry::only_file_markers(l))
    {
        order.push(l.path.clone());
        let w = l.tensors.iter().find(|t| t.name == "weight");
        // the reference's record must be one its family reads
        crate::layout::registry::of(&l)
            .check_record(&l.quant.weights)
            .map_err(|e| e.with_layer(l.path.clone()).with_file(reference))?;
        m.insert(
            l.path.clone(),
            crate::migrate::plan::LikeLayer {
                layout: l.quant.weights.clone(),
                activations: l.quant.activations.clone(),
                // a flat weight's shape is unknown: nothing to compare
                shape: w
                    .filter(|w| w.encoding != crate::format::manifest::Encoding::QuantizedFlat)
                    .map(|w| w.shape.clone()),
                dtype: w.map(|w| w.dtype),
            },
        );
    }
    Ok(Target::Like(m, order))
}

/// Tensors described by key, dtype and shape (a model's state dict), for
/// detection: only the values given with them (small tensors such as a
/// packed layout's stored shape) can be read.
struct Described(
    Vec<crate::io::source::SourceTensor>,
    BTreeMap<String, String>,
    std::collections::HashMap<String, Vec<u8>>,
);

impl crate::io::source::TensorSource for Described {
    fn describe(&self) -> String {
        "the state dict".into()
    }
    fn tensors(&self) -> &[crate::io::source::SourceTensor] {
        &self.0
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.1
    }
    fn files(&self) -> Vec<String> {
        Vec::new()
    }
    fn read(&self, key: &str) -> Result<crate::io::TensorBytes> {
        match self.2.get(key) {
            Some(v) => Ok(crate::io::TensorBytes::Owned(v.clone())),
            None => Err(crate::Error::usage(format!(
                "tensor `{key}` of the state dict has no value (a meta tensor?), and its \
                 layout needs it: pass a model whose tensors hold values, or the checkpoint \
                 it was loaded from as `like`"
            ))
            .with_tensor(key.to_string())),
        }
    }
}

/// A `--like` target from a model's expected tensors (a state dict's keys,
/// dtypes and shapes, as `model.state_dict()` describes them, with the
/// bytes of those small tensors whose values a layout needs, such as
/// compressed-tensors' `weight_shape` or bitsandbytes' `weight_format`;
/// `None` for the rest): its layers are read as a checkpoint's would be,
/// from the tensors alone, with the
/// quanto map when given, as a `quanto_qmap.json` file `qmap` or as its JSON
/// text `qmap_json` (a quantized model's packed layers need it; nothing
/// beside any file is read).
#[allow(clippy::type_complexity)]
pub fn like_tensors(
    tensors: &[(String, crate::Dtype, Vec<u64>, Option<Vec<u8>>)],
    qmap: Option<&Path>,
    qmap_json: Option<&str>,
) -> Result<Target> {
    if qmap.is_some() && qmap_json.is_some() {
        return Err(Error::usage(
            "give the quanto map as a file or as JSON text, not both",
        ));
    }
    let mut described = Vec::with_capacity(tensors.len());
    let mut values = std::collections::HashMap::new();
    for (key, dtype, shape, value) in tensors {
        let len = crate::dtype::byte_len(*dtype, shape).map_err(|e| e.with_tensor(key.clone()))?;
        if let Some(v) = value {
            if v.len() as u64 != len {
                return Err(Error::usage(format!(
                    "the value given for `{key}` has {} bytes, {dtype} {shape:?} has {len}",
                    v.len()
                ))
                .with_tensor(key.clone()));
            }
            values.insert(key.clone(), v.clone());
        }
        described.push(crate::io::source::SourceTensor {
            key: key.clone(),
            dtype: *dtype,
            shape: shape.to_vec(),
            len,
            file: 0,
        });
    }
    let src = Described(described, BTreeMap::new(), values);
    let given: Vec<(&str, &Path)> = qmap
        .map(|p| (crate::layout::quanto::QMAP_FILE, p))
        .into_iter()
        .collect();
    let mut hints = crate::layout::family::Hints::default();
    for f in crate::layout::registry::FAMILIES {
        if let Some(side) = f.side_files(None, &given)? {
            hints = hints.with_side_boxed(f.name(), side);
        }
    }
    if let Some(text) = qmap_json {
        let side = crate::layout::quanto::QuantoMap::side_of_text(text)?;
        hints = hints.with_side_boxed(crate::layout::quanto::FAMILY_NAME, Box::new(side));
    }
    let layers = crate::migrate::detect::detect_layers(&src, &hints)?;
    like_of_layers(layers, "the state dict")
}

/// A layer whose layout differs between a checkpoint and its reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayoutMismatch {
    /// Module path.
    pub layer: String,
    /// What the checkpoint has, e.g. "plain BF16 `weight`".
    pub have: String,
    /// What the reference expects.
    pub expected: String,
}

/// Will a checkpoint load where a reference's layout is expected?
/// Serialized as `migrate check --json` prints it (with `compatible`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Keys the reference has and the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys the checkpoint has and the reference lacks.
    pub unexpected: Vec<String>,
    /// Per-layer layout differences.
    pub mismatches: Vec<LayoutMismatch>,
    /// Layers of the checkpoint that look quantized in a layout ckptkit
    /// does not know: it cannot tell whether they match, nor convert them.
    pub unknown_layouts: Vec<crate::migrate::Suspect>,
    /// The `migrate convert` command that makes the checkpoint load where
    /// the reference is expected (with `--allow-lossy` when the conversion
    /// may lose information), or `None` when nothing needs fixing.
    pub fix: Option<String>,
}

impl serde::Serialize for CheckReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let compatible = self.compatible();
        let mut m = s.serialize_struct("CheckReport", 6)?;
        m.serialize_field("compatible", &compatible)?;
        m.serialize_field("missing", &self.missing)?;
        m.serialize_field("unexpected", &self.unexpected)?;
        m.serialize_field("mismatches", &self.mismatches)?;
        // null when compatible; the command otherwise
        let fix = (!compatible).then(|| self.fix.clone().unwrap_or_default());
        m.serialize_field("fix", &fix)?;
        m.serialize_field("unknown_layouts", &self.unknown_layouts)?;
        m.end()
    }
}

/// A path as one shell word.
fn shell_word(p: &Path) -> String {
    let s = p.display().to_string();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl CheckReport {
    /// True when nothing differs.
    pub fn compatible(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatches.is_empty()
    }
}

pub(crate) fn describe_layout(l: &Layer) -> String {
    let keys: Vec<String> = l
        .tensors
        .iter()
        .filter(|t| t.name == "weight")
        .flat_map(|t| {
            t.parts.iter().map(|p| {
                format!(
                    "`{}`",
                    crate::format::layers::split_key_after(&p.key, &l.path)
                )
            })
        })
        .collect();
    format!(
        "{} {}",
        crate::layout::registry::layout_name(l),
        keys.join(" + ")
    )
}

/// Compares a checkpoint's keys and layouts with a reference (a
/// checkpoint, a container, or a `quanto_qmap.json`).
pub fn check(input: &Path, reference: &Path, opts: &ConvertOptions) -> Result<CheckReport> {
    let src = open_source(input)?;
    let layers = input_layers(input, src.as_ref(), opts)?;
    let mut report = CheckReport {
        unknown_layouts: input_suspects(input, src.as_ref(), &layers)?,
        ..Default::default()
    };
    let is_json = reference.extension().and_then(|e| e.to_str()) == Some("json");
    // what the input would become to match the reference
    let target = like_target(reference)?;
    // what the input would become (lossy layers included: the fix says so)
    let p = plan(
        &layers,
        &target,
        &PlanOptions {
            allow_lossy: true,
            ..Default::default()
        },
    )?;
    let planned = || -> Vec<Layer> { p.layers.iter().map(|l| l.output.clone()).collect() };
    let keys_of = |ls: &[Layer]| -> std::collections::BTreeSet<String> {
        ls.iter()
            .flat_map(|l| l.parts().map(|p| p.key.clone()).collect::<Vec<_>>())
            .collect()
    };
    let (expected_layers, want) = if is_json {
        let e = planned();
        let w = keys_of(&e);
        (e, w)
    } else {
        let r = open_source(reference)?;
        match input_layers(reference, r.as_ref(), &ConvertOptions::default()) {
            Ok(e) => {
                let w = keys_of(&e);
                (e, w)
            }
            // packed layers the reference's tensors alone do not tell apart:
            // its map gave the layouts (like_target), its keys are its own
            Err(e) if matches!(e.kind(), ErrorKind::Ambiguous(_)) => (
                planned(),
                r.tensors().iter().map(|t| t.key.clone()).collect(),
            ),
            Err(e) => return Err(e),
        }
    };
    let have: std::collections::BTreeSet<String> =
        src.tensors().iter().map(|t| t.key.clone()).collect();
    report.missing = want.difference(&have).cloned().collect();
    report.unexpected = have.difference(&want).cloned().collect();
    let by: std::collections::HashMap<&str, &Layer> =
        layers.iter().map(|l| (l.path.as_str(), l)).collect();
    for e in &expected_layers {
        if let Some(l) = by.get(e.path.as_str()) {
            if l.quant != e.quant {
                report.mismatches.push(LayoutMismatch {
                    layer: e.path.clone(),
                    have: describe_layout(l),
                    expected: describe_layout(e),
                });
            }
        }
    }
    if !report.compatible() {
        let lossy = p.layers.iter().any(crate::migrate::plan::needs_allow_lossy);
        report.fix = Some(format!(
            "migrate convert {} OUTPUT.safetensors --like {}{}",
            shell_word(input),
            shell_word(reference),
            if lossy { " --allow-lossy" } else { "" }
        ));
    }
    Ok(report)
}
