//! The files that travel with weights: `config.json` (rewritten by whose
//! config it is), the other files of a model directory and ckptkit's schema
//! (each family's own companion files are its own: `Family::companion`).

use crate::error::{Error, Result};
use crate::layout::registry::family_of;
use crate::migrate::plan::Plan;
use std::path::Path;

pub(crate) use crate::layout::family::ConfigOwner;

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
    let text = crate::io::files::read_side_file(&from)?;
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None); // not ours to judge: copied as is
    };
    let Some(obj) = v.as_object_mut() else {
        return Ok(None);
    };
    let owner = config_owner(obj);
    // the output's layouts, one record each (a family's label names a
    // layout: quanto's group sizes follow each layer's shape)
    let mut layouts: std::collections::BTreeMap<String, &crate::WeightQuant> = Default::default();
    for l in &p.layers {
        let w = &l.output.quant.weights;
        if *w != crate::WeightQuant::Plain {
            layouts.entry(family_of(w).label(w)).or_insert(w);
        }
    }
    let method = obj
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    // a quantization config one of the families writes
    let stale_family = method.as_deref().and_then(|m| {
        crate::layout::registry::FAMILIES
            .iter()
            .copied()
            .find(|f| f.config_methods().contains(&m))
    });
    // plain 2-D layers: what a library's ignore / skip list names
    let skip: Vec<String> = p
        .layers
        .iter()
        .filter(|l| {
            l.output.quant.weights == crate::WeightQuant::Plain
                && l.output
                    .tensors
                    .iter()
                    .any(|t| t.name == "weight" && t.shape.len() == 2)
        })
        .map(|l| l.path.clone())
        .collect();
    let mut warning = None;
    if layouts.is_empty() {
        if stale_family.is_none() {
            return Ok(None);
        }
        obj.remove("quantization_config");
    } else if layouts.len() > 1 {
        warning = Some(format!(
            "{}: a quantization_config cannot describe layers of several layouts ({}); \
             it was left as it was",
            dest.display(),
            layouts.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
        // a stale config whose family writes none for this kind of config
        // (quanto in a transformers config) goes anyway
        let writes_none = stale_family.is_some_and(|f| {
            layouts
                .values()
                .find(|w| f.owns(w))
                .is_some_and(|w| f.quantization_config(w, owner, &skip) == Some(None))
        });
        if writes_none {
            obj.remove("quantization_config");
        } else {
            return Ok(warning);
        }
    } else {
        let w = layouts
            .values()
            .next()
            .copied()
            .unwrap_or(&crate::WeightQuant::Plain);
        match family_of(w).quantization_config(w, owner, &skip) {
            // the family writes none (quanto in a transformers config)
            Some(None) => {
                if method.is_none() {
                    return Ok(None);
                }
                obj.remove("quantization_config");
            }
            Some(Some(cfg)) => {
                obj.insert("quantization_config".into(), cfg);
            }
            None => return Ok(None),
        }
    }
    let out = serde_json::to_string_pretty(&v).map_err(|e| Error::json("writing JSON", e))?;
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
/// except weights in any format, the families' companion files
/// (`quanto_qmap.json`: written for the new layout) and hidden files; sub-directories are not carried. Returns the
/// names carried and the names skipped, with why.
pub(crate) fn carry_model_files(
    input: &Path,
    out: &Path,
    ctl: &crate::Control,
) -> Result<(Vec<String>, Vec<String>)> {
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
        } else if crate::layout::registry::companion_names().any(|c| c == name) {
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
        ctl.check()?;
        copy_file(&p, &out.join(name), &out.join(name), ctl)?;
        carried.push(name.to_string());
    }
    Ok((carried, skipped))
}

/// The `__metadata__` of an output of plan `p` from a source whose own is
/// `src`: the source's, with `format`, ckptkit's schema of the plan, and
/// the entries the families keep about their layers (a stale one removed).
pub(crate) fn output_metadata(
    src: &std::collections::BTreeMap<String, String>,
    p: &Plan,
) -> std::collections::BTreeMap<String, String> {
    let mut md = src.clone();
    md.remove(crate::format::st_schema::SCHEMA_KEY);
    md.entry("format".into()).or_insert_with(|| "pt".into());
    if let Some(s) = schema_for(p) {
        md.insert(crate::format::st_schema::SCHEMA_KEY.into(), s);
    }
    let layers: Vec<&crate::format::manifest::Layer> = p.layers.iter().map(|l| &l.output).collect();
    crate::layout::registry::apply_metadata(&mut md, &layers);
    md
}

/// ckptkit's schema of the quanto layers of a plan (for `__metadata__`).
pub(crate) fn schema_for(p: &Plan) -> Option<String> {
    let mut s = crate::format::st_schema::Schema::new();
    for l in &p.layers {
        let o = &l.output;
        let w = o.tensors.iter().find(|t| t.name == "weight");
        let (weights, gs, descriptor) =
            match family_of(&o.quant.weights).schema_entry(&o.quant.weights) {
                Some(e) => e,
                None if o.quant.activations.is_some() => ("none".to_string(), None, None),
                None => continue,
            };
        s.insert(
            o.path.clone(),
            crate::format::st_schema::SchemaEntry {
                weights,
                activations: o.quant.activations.clone().unwrap_or_else(|| "none".into()),
                group_size: gs,
                dtype: w.map(|w| w.dtype.to_string()).unwrap_or_default(),
                // a flat weight's shape is unknown: recorded empty
                shape: w
                    .filter(|w| w.encoding != crate::format::manifest::Encoding::QuantizedFlat)
                    .map(|w| w.shape.clone())
                    .unwrap_or_default(),
                descriptor,
            },
        );
    }
    (!s.is_empty()).then(|| crate::format::st_schema::schema_json(&s))
}

/// Copies a file that is carried unchanged into an output, reading only a
/// regular file and naming the right path in errors: the input when reading
/// fails, the output (`shown`, its final name) when writing does (a full
/// disk is the output's problem).
pub(crate) fn copy_file(from: &Path, to: &Path, shown: &Path, ctl: &crate::Control) -> Result<u64> {
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
        ctl.check()?;
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
