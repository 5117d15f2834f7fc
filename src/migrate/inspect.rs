//! `inspect`: the layers of any input, their layouts, shapes and sizes, and
//! what looks wrong.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::io::open::open_source;
use crate::migrate::{
    input_layers, input_suspects, misaligned_integer_weights, report_layers, source_layers,
    ConvertOptions, LayerReport,
};

/// What [`inspect`] found. Serialized as `migrate inspect --json` prints
/// it (README, "JSON output").
#[derive(Debug, Clone, Default)]
pub struct InspectReport {
    /// The input.
    pub input: PathBuf,
    /// Per layer: path, layout, logical tensors, stored keys, bytes.
    pub layers: Vec<LayerReport>,
    /// Stored bytes of every layer.
    pub total_bytes: u64,
    /// Why the input cannot be converted as it is (layers in a layout
    /// ckptkit does not know, layers it cannot read unambiguously). When
    /// the layers cannot be read, `layers` lists the stored tensors
    /// grouped by module, as plain.
    pub problems: Vec<String>,
    /// What the user should know (integer weights not 16-byte aligned in
    /// the file).
    pub warnings: Vec<String>,
}

impl InspectReport {
    /// True when nothing stands in the way of converting the input.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl serde::Serialize for InspectReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("InspectReport", 5)?;
        m.serialize_field("input", &self.input.display().to_string())?;
        m.serialize_field("layers", &self.layers)?;
        m.serialize_field("total_bytes", &self.total_bytes)?;
        m.serialize_field("problems", &self.problems)?;
        m.serialize_field("warnings", &self.warnings)?;
        m.end()
    }
}

/// Reads the layers of any input (a safetensors file, a sharded directory,
/// a container) with the hints of `opts` (`qmap`, `shapes_from`) or those
/// found beside it. An input that cannot be opened is an error; one whose
/// layers cannot be read is reported with its problems.
pub fn inspect(input: &Path, opts: &ConvertOptions) -> Result<InspectReport> {
    let src = open_source(input)?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let layers = match input_layers(input, src.as_ref(), opts) {
        Ok(l) => {
            let mut r = report_layers(&l);
            // layers that look quantized in a layout ckptkit does not know
            for sus in input_suspects(input, src.as_ref(), &l)? {
                if let Some(x) = r.iter_mut().find(|x| x.path == sus.layer) {
                    x.layout = "unknown quantized".into();
                }
                problems.push(format!("unknown quantized layout: {}", sus.describe()));
            }
            for m in misaligned_integer_weights(src.as_ref(), &l) {
                warnings.push(format!("misaligned integer weight: {m}"));
            }
            r
        }
        Err(e) => {
            problems.push(e.to_string());
            report_layers(&source_layers(src.as_ref()))
        }
    };
    let total_bytes = layers.iter().map(|l| l.bytes).sum();
    Ok(InspectReport {
        input: input.to_path_buf(),
        layers,
        total_bytes,
        problems,
        warnings,
    })
}
