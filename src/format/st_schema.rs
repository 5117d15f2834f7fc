//! ckptkit's schema in a safetensors file's `__metadata__`
//! (`ckptkit.schema`, spec/layouts.md §2.7): per module, the layout a
//! ckptkit-written file holds, so that reading it back needs no side file.
//! Pure JSON; each family reads the entries of its own layouts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The `__metadata__` key under which ckptkit records its layer schema.
pub const SCHEMA_KEY: &str = "ckptkit.schema";

/// One layer of ckptkit's schema as recorded in `__metadata__`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEntry {
    /// Weight qtype name, or `none`.
    pub weights: String,
    /// Activation qtype name, or `none`.
    pub activations: String,
    /// Group size.
    pub group_size: Option<u64>,
    /// Logical weight dtype.
    pub dtype: String,
    /// Logical weight shape.
    pub shape: Vec<u64>,
    /// For an int8 layer in a user layout, the full descriptor
    /// (`weights` is then its name); absent for quanto layers and the
    /// built-in int8 presets. An additive field of schema version 1 (readers
    /// ignore fields they do not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<serde_json::Value>,
}

/// ckptkit's schema: module path → entry.
pub type Schema = BTreeMap<String, SchemaEntry>;

/// Parses the schema from a source's metadata, if present.
pub fn schema_of(metadata: &BTreeMap<String, String>) -> Result<Option<Schema>> {
    match metadata.get(SCHEMA_KEY) {
        None => Ok(None),
        Some(s) => {
            #[derive(Deserialize)]
            struct W {
                version: u32,
                layers: Schema,
            }
            let w: W = serde_json::from_str(s).map_err(|e| Error::json(SCHEMA_KEY, e))?;
            if w.version != 1 {
                return Err(Error::new(ErrorKind::Json(format!(
                    "{SCHEMA_KEY}: unknown version {}",
                    w.version
                ))));
            }
            Ok(Some(w.layers))
        }
    }
}

/// Renders a schema for `__metadata__`.
pub fn schema_json(schema: &Schema) -> String {
    serde_json::json!({"version": 1, "layers": schema}).to_string()
}
