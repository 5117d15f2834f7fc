//! The files that travel with weights: `config.json` (rewritten by whose
//! config it is), the other files of a model directory, ckptkit's schema and
//! the quanto map.

use crate::error::{Error, ErrorKind, Result};
use crate::io::atomic::check_interrupt;
use crate::layout::quanto::{self, QuantoMap, QMAP_FILE};
use crate::migrate::plan::Plan;
use std::path::Path;

/// Whose `config.json` it is: the quantization config a loader reads
/// depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConfigOwner {
    /// diffusers (`_class_name`): `QuantoConfig` with `weights_dtype`.
    Diffusers,
    /// transformers (`model_type` / `architectures`, no `_class_name`).
    Transformers,
    /// Neither.
    Unknown,
}

pub(crate) fn config_owner(obj: &serde_json::Map<String, serde_json::Value>) -> ConfigOwner {
    if obj.contains_key("_class_name") {
        ConfigOwner::Diffusers
    } else if obj.contains_key("model_type") || obj.contains_key("architectures") {
        ConfigOwner::Transformers
    } else {
        ConfigOwner::Unknown
    }
}

/// Makes `config.json` (copied or beside the input) follow the new layout,
/// by whose config it is (spec/layouts.md §4): nothing is rewritten when no
/// layer's layout changed; a diffusers config gets diffusers' `QuantoConfig`
/// for a quanto output; a transformers config gets no quanto
/// `quantization_config` (optimum-quanto's own transformers save writes
/// none, and transformers cannot load pre-quantized quanto checkpoints) and
/// loses a stale one; compressed-tensors and bitsandbytes outputs get their
/// libraries' forms; a config whose output has no quantized layer loses a
/// quantization config ckptkit knows. Returns a warning when the config
/// cannot describe the output (mixed layouts).
pub(crate) fn update_config(input: &Path, dest: &Path, p: &Plan) -> Result<Option<String>> {
    if p.layers
        .iter()
        .all(|l| l.passes == [crate::migrate::plan::Pass::Copy])
    {
        return Ok(None); // the layout did not change: the config is carried as is
    }
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let srcp = dir.join("config.json");
    let from = if dest.is_file() {
        dest.to_path_buf()
    } else {
        srcp
    };
    if !crate::io::files::regular_file_exists(&from)? {
        return Ok(None);
    }
    let text = quanto::read_side_file(&from)?;
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None); // not ours to judge: copied as is
    };
    let Some(obj) = v.as_object_mut() else {
        return Ok(None);
    };
    let owner = config_owner(obj);
    let qtypes: std::collections::BTreeSet<String> = p
        .layers
        .iter()
        .filter_map(|l| match &l.output.quant.weights {
            crate::WeightQuant::Quanto { qtype, .. } => Some(qtype.clone()),
            crate::WeightQuant::Int8 { layout, .. } => Some(layout.clone()),
            _ => None,
        })
        .collect();
    let method = obj
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    let ours = method
        .as_deref()
        .is_some_and(|m| ["quanto", "compressed-tensors", "bitsandbytes"].contains(&m));
    // plain 2-D layers: what a library's ignore / skip list names
    let skip: Vec<String> = p
        .layers
        .iter()
        .filter(|l| {
            matches!(l.output.quant.weights, crate::WeightQuant::Plain)
                && l.output
                    .tensors
                    .iter()
                    .any(|t| t.name == "weight" && t.shape.len() == 2)
        })
        .map(|l| l.path.clone())
        .collect();
    let mut warning = None;
    let is_quanto = |q: &str| crate::layout::quanto::QType::from_name(q).is_some();
    if qtypes.is_empty() {
        if !ours {
            return Ok(None);
        }
        obj.remove("quantization_config");
    } else if qtypes.len() > 1 {
        warning = Some(format!(
            "{}: a quantization_config cannot describe layers of several layouts ({}); \
             it was left as it was",
            dest.display(),
            qtypes.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
        if owner == ConfigOwner::Transformers && method.as_deref() == Some("quanto") {
            obj.remove("quantization_config");
        } else {
            return Ok(warning);
        }
    } else {
        let q = qtypes.iter().next().cloned().unwrap_or_default();
        if is_quanto(&q) && owner == ConfigOwner::Transformers {
            // transformers reads no quanto config from a pre-quantized checkpoint
            if method.is_none() {
                return Ok(None);
            }
            obj.remove("quantization_config");
        } else {
            let Some(cfg) = library_config(&q, skip) else {
                return Ok(None);
            };
            obj.insert("quantization_config".into(), cfg);
        }
    }
    let out =
        serde_json::to_string_pretty(&v).map_err(|e| Error::new(ErrorKind::Json(e.to_string())))?;
    std::fs::write(dest, out + "\n").map_err(|e| Error::from(e).with_file(dest))?;
    Ok(warning)
}

/// Weight files of any format, which a converted model directory does not
/// carry: the conversion writes the model's weights itself.
pub(crate) fn is_weights_name(n: &str) -> bool {
    const EXT: [&str; 10] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".onnx",
        ".msgpack",
        ".h5",
        ".index.json",
    ];
    EXT.iter().any(|e| n.ends_with(e))
}

/// Copies every top-level regular file of a model directory into the
/// output directory (following symlinks, as Hugging Face caches use them),
/// except weights in any format, `quanto_qmap.json` (written for the new
/// layout) and hidden files; sub-directories are not carried. Returns the
/// names carried and the names skipped, with why.
pub(crate) fn carry_model_files(input: &Path, out: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut carried = Vec::new();
    let mut skipped = Vec::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(input).map_err(|e| Error::from(e).with_file(input))? {
        let e = e.map_err(|er| Error::from(er).with_file(input))?;
        names.push(e.file_name());
    }
    names.sort();
    for n in names {
        let shown = n.to_string_lossy().into_owned();
        let Some(name) = n.to_str() else {
            skipped.push(format!("{shown} (name is not UTF-8)"));
            continue;
        };
        let p = input.join(name);
        let why = if name.starts_with('.') {
            Some("hidden")
        } else if name == QMAP_FILE {
            Some("written for the new layout")
        } else if is_weights_name(name) {
            Some("weights")
        } else {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => Some("directory"),
                Ok(m) if m.is_file() => None,
                _ => Some("not a regular file"),
            }
        };
        if let Some(w) = why {
            skipped.push(format!("{name} ({w})"));
            continue;
        }
        check_interrupt()?;
        copy_file(&p, &out.join(name), &out.join(name))?;
        carried.push(name.to_string());
    }
    Ok((carried, skipped))
}

/// The `quantization_config` a library writes for a layout: diffusers'
/// QuantoConfig, transformers' BitsAndBytesConfig, compressed-tensors'
/// config (the forms tests/fixtures/int8 and spec/layouts.md record).
pub(crate) fn library_config(layout: &str, skip: Vec<String>) -> Option<serde_json::Value> {
    Some(match layout {
        "qint8" | "qint4" | "qint2" | "qfloat8_e4m3fn" => {
            let w = match layout {
                "qint8" => "int8",
                "qint4" => "int4",
                "qint2" => "int2",
                _ => "float8",
            };
            serde_json::json!({"quant_method": "quanto", "weights_dtype": w, "modules_to_not_convert": skip})
        }
        "int8:bnb" => serde_json::json!({
            "_load_in_4bit": false, "_load_in_8bit": true,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "load_in_4bit": false, "load_in_8bit": true, "quant_method": "bitsandbytes"
        }),
        n if n.starts_with("int8:ct") => {
            let int_q = n.ends_with(":int-quantized");
            let group = n
                .split(':')
                .find_map(|x| x.strip_prefix("group="))
                .and_then(|g| g.parse::<u64>().ok());
            let format = if int_q {
                "int-quantized"
            } else {
                "pack-quantized"
            };
            let input = if int_q {
                serde_json::json!({"dynamic": true, "group_size": null, "num_bits": 8,
                    "strategy": "token", "symmetric": true, "type": "int"})
            } else {
                serde_json::Value::Null
            };
            serde_json::json!({
                "config_groups": {"group_0": {
                    "format": format, "input_activations": input, "output_activations": null,
                    "targets": ["Linear"],
                    "weights": {"dynamic": false, "group_size": group, "num_bits": 8,
                        "strategy": if group.is_some() { "group" } else { "channel" },
                        "symmetric": true, "type": "int"}}},
                "format": format, "global_compression_ratio": null, "ignore": skip,
                "kv_cache_scheme": null, "moe_sparsity_config": null,
                "quant_method": "compressed-tensors", "quantization_status": "compressed",
                "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"
            })
        }
        _ => return None,
    })
}

/// ckptkit's schema of the quanto layers of a plan (for `__metadata__`).
pub(crate) fn schema_for(p: &Plan) -> Option<String> {
    let mut s = quanto::Schema::new();
    for l in &p.layers {
        let o = &l.output;
        let w = o.tensors.iter().find(|t| t.name == "weight");
        let (weights, gs, descriptor) = match &o.quant.weights {
            crate::WeightQuant::Quanto { qtype, group_size } => (qtype.clone(), *group_size, None),
            crate::WeightQuant::Int8 { layout, descriptor } => (
                layout.clone(),
                None,
                quanto::SchemaEntry::int8_descriptor(descriptor),
            ),
            _ if o.quant.activations.is_some() => ("none".to_string(), None, None),
            _ => continue,
        };
        s.insert(
            o.path.clone(),
            quanto::SchemaEntry {
                weights,
                activations: o.quant.activations.clone().unwrap_or_else(|| "none".into()),
                group_size: gs,
                dtype: w.map(|w| w.dtype.to_string()).unwrap_or_default(),
                shape: w.map(|w| w.shape.clone()).unwrap_or_default(),
                descriptor,
            },
        );
    }
    (!s.is_empty()).then(|| quanto::schema_json(&s))
}

/// The quanto map of a plan's output (modules in natural path order).
pub fn qmap_for(p: &Plan) -> QuantoMap {
    let mut entries = Vec::new();
    for l in &p.layers {
        let o = &l.output;
        let w = match &o.quant.weights {
            crate::WeightQuant::Quanto { qtype, .. } => qtype.clone(),
            _ if o.quant.activations.is_some() => "none".into(),
            _ => continue,
        };
        entries.push((
            o.path.clone(),
            quanto::QmapEntry {
                weights: w,
                activations: o.quant.activations.clone().unwrap_or_else(|| "none".into()),
            },
        ));
    }
    QuantoMap { entries }
}

/// Copies a file that is carried unchanged into an output, reading only a
/// regular file and naming the right path in errors: the input when reading
/// fails, the output (`shown`, its final name) when writing does (a full
/// disk is the output's problem).
pub(crate) fn copy_file(from: &Path, to: &Path, shown: &Path) -> Result<u64> {
    use std::io::{Read, Write};
    let mut r = crate::io::files::open_regular(from)?;
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| Error::from(e).with_file(shown))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        check_interrupt()?;
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from(e).with_file(from).with_offset(n)),
        };
        w.write_all(&buf[..k])
            .map_err(|e| Error::from(e).with_file(shown).with_offset(n))?;
        n += k as u64;
    }
    Ok(n)
}
