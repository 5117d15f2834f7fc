//! The input side of a conversion: its layers, the files it reads (an output
//! may never touch them), layers it must not change, and the warnings and
//! refusals that come from the plan as a whole.

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Layer;
use crate::io::open::{input_kind, open_source, InputKind};
use crate::io::source::{SourceTensor, TensorSource};
use crate::layout::family::Hints;
use crate::migrate::detect_layers;
use crate::migrate::plan::{Plan, Target};
use crate::Dtype;
use std::path::{Path, PathBuf};

use super::*;

/// Reads the layers of any input: a container's manifest, or the quanto-aware
/// grouping of a safetensors source with the hints found beside it or given.
pub fn input_layers(
    input: &Path,
    src: &dyn TensorSource,
    opts: &ConvertOptions,
) -> Result<Vec<Layer>> {
    if input_kind(input)? == InputKind::Container {
        // the format fixes a record's form; its family checks its meaning
        // (spec/container.md §6, V9)
        let mut layers = crate::io::open::open_container(input)?.layers().to_vec();
        for l in &layers {
            crate::layout::check_layer(l).map_err(|e| e.with_file(input))?;
        }
        // weights recorded flat take their shape from --shapes-from
        if let Some(p) = &opts.shapes_from {
            let shapes = open_source(p)?;
            crate::layout::registry::resolve_flat(&mut layers, shapes.as_ref())
                .map_err(|e| e.with_file(input))?;
        }
        return Ok(layers);
    }
    let shapes = match &opts.shapes_from {
        Some(p) => Some(open_source(p)?),
        None => None,
    };
    // each family reads its own side files beside the input (or given)
    let given: Vec<(&str, &Path)> = opts
        .qmap
        .iter()
        .map(|p| (crate::layout::quanto::QMAP_FILE, p.as_path()))
        .collect();
    let mut hints = Hints::default();
    hints.shapes_from = shapes.as_deref();
    for f in crate::layout::registry::FAMILIES {
        if let Some(side) = f.side_files(Some(input), &given)? {
            hints = hints.with_side_boxed(f.name(), side);
        }
    }
    detect_layers(src, &hints)
}

/// The `quant_method` of a `quantization_config` in the `config.json`
/// beside an input (a file's directory, or the directory itself), if any.
pub(crate) fn config_quant_method(input: &Path) -> Result<Option<String>> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let p = dir.join("config.json");
    if !crate::io::files::regular_file_exists(&p)? {
        return Ok(None);
    }
    let text = crate::io::files::read_side_file(&p)?;
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    Ok(v.get("quantization_config").map(|q| {
        q.get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown")
            .to_string()
    }))
}

/// The layers of an input that look quantized in a layout ckptkit does not
/// know ([`crate::migrate::Suspect`]).
pub fn input_suspects(
    input: &Path,
    src: &dyn TensorSource,
    layers: &[Layer],
) -> Result<Vec<crate::migrate::Suspect>> {
    let method = if input_kind(input)? == InputKind::Container {
        None
    } else {
        config_quant_method(input)?
    };
    Ok(crate::migrate::suspects(src, layers, method.as_deref()))
}

/// Integer weight payloads of a file (I8 / U8 parts of quantized weights)
/// whose data does not start at a multiple of 16 bytes in the file: torch's
/// CPU int8 matmul (`_weight_int8pack_mm`, which optimum-quanto uses for
/// bf16 on CPU) can crash on such a tensor once `safetensors.torch.load_file`
/// maps it in place. ckptkit's own writer aligns them (spec/container.md §3).
pub fn misaligned_integer_weights(src: &dyn TensorSource, layers: &[Layer]) -> Vec<String> {
    let mut out = Vec::new();
    for l in layers {
        for t in l.tensors.iter().filter(|t| t.encoding.is_quantized()) {
            for p in &t.parts {
                if !matches!(p.dtype, Dtype::I8 | Dtype::U8) || p.role != crate::Role::Data {
                    continue;
                }
                let loc = src.location(&p.key);
                // compressed container data is never mapped in place
                if let (Some(off), None) = (loc.offset, loc.shard) {
                    if off % 16 != 0 {
                        out.push(format!(
                            "`{}` ({}) starts at byte {off} of {}, not a multiple of 16: torch's \
                             CPU int8 matmul can crash on it when the file is memory-mapped \
                             (safetensors load_file); `migrate convert` writes it aligned",
                            p.key,
                            p.dtype,
                            loc.file
                                .map(|f| f.display().to_string())
                                .unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Refuses a plan that would change a layer of unknown quantized layout
/// (anything but copying it), unless the user vouches that it is plain.
pub(crate) fn refuse_suspects(
    p: &Plan,
    suspects: &[crate::migrate::Suspect],
    opts: &ConvertOptions,
) -> Result<()> {
    if opts.assume_plain || suspects.is_empty() {
        return Ok(());
    }
    // a legacy ComfyUI scaled-FP8 file: its marker makes every FP8 layer
    // of the file scaled, so changing any layer of it is refused (ComfyUI
    // would read a re-quantized or cast layer with the legacy rules)
    let marked = suspects.iter().find(|s| {
        s.tensors.iter().any(|t| {
            t == crate::migrate::detect::SCALED_FP8_MARKER
                || t.ends_with(&format!(".{}", crate::migrate::detect::SCALED_FP8_MARKER))
        })
    });
    if let Some(m) = marked {
        if let Some(lp) = p
            .layers
            .iter()
            .find(|lp| lp.passes != [crate::migrate::plan::Pass::Copy])
        {
            let own = suspects
                .iter()
                .find(|s| s.layer == lp.source.path)
                .map(|s| format!(" ({})", s.describe()))
                .unwrap_or_default();
            return Err(Error::new(ErrorKind::UnknownQuantized(format!(
                "this is a legacy ComfyUI scaled-FP8 checkpoint (marker `{}`): ckptkit does not \
                 convert those yet, and changing layer `{}`{own} as a plain layer would make a \
                 file ComfyUI misreads; let ComfyUI load it (it converts such files to \
                 comfy_quant) and save it again, or pass --assume-plain if the marker is stale",
                m.tensors.join(", "),
                lp.source.path
            )))
            .with_layer(lp.source.path.clone()));
        }
    }
    let by: std::collections::HashMap<&str, &crate::migrate::Suspect> =
        suspects.iter().map(|s| (s.layer.as_str(), s)).collect();
    // `--to plain` promises plain weights: a suspect layer it would copy
    // keeps its codes undequantized (what DeepSeek's converter does for an
    // FP8 weight whose scale is missing), unless --exclude leaves it out
    let plain = matches!(opts.target, crate::migrate::plan::Target::Plain(_));
    let excluded = |path: &str| {
        opts.select
            .exclude
            .iter()
            .any(|g| crate::migrate::plan::fnmatch(g, path))
    };
    let bad: Vec<String> = p
        .layers
        .iter()
        .filter(|lp| {
            lp.passes != [crate::migrate::plan::Pass::Copy] || (plain && !excluded(&lp.source.path))
        })
        .filter_map(|lp| by.get(lp.source.path.as_str()).map(|s| s.describe()))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let n = bad.len();
    Err(Error::new(ErrorKind::UnknownQuantized(format!(
        "{n} layer(s) look quantized in a layout ckptkit does not know, and this conversion \
         would change them as if they were plain, or leave their codes in a plain output, which \
         produces garbage: {}{}; convert them \
         with their own library, leave them out (--exclude), or pass --assume-plain if they \
         really are plain tensors",
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
        if n > 5 { "; ..." } else { "" }
    ))))
}

/// Warnings about a plan: `--include` / `--exclude` patterns that match no
/// layer of the input.
pub(crate) fn selection_warnings(layers: &[Layer], opts: &ConvertOptions) -> Vec<String> {
    let mut w = Vec::new();
    for (flag, pats) in [
        ("--include", &opts.select.include),
        ("--exclude", &opts.select.exclude),
    ] {
        for g in pats {
            if !layers
                .iter()
                .any(|l| crate::migrate::plan::fnmatch(g, &l.path))
            {
                w.push(format!("{flag} `{g}` matches no layer of the input"));
            }
        }
    }
    w
}

/// An explicit `--to` that changes no layer at all is an error (exit 1),
/// not a silent copy that reports "all lossless".
pub(crate) fn refuse_no_change(
    plans: &[&Plan],
    warnings: &[String],
    opts: &ConvertOptions,
) -> Result<()> {
    let explicit = matches!(opts.target, Target::Plain(_) | Target::Layout(_));
    if !explicit || opts.dry_run {
        return Ok(());
    }
    let layers: usize = plans.iter().map(|p| p.layers.len()).sum();
    let changed = plans
        .iter()
        .flat_map(|p| &p.layers)
        .filter(|l| l.passes != [crate::migrate::plan::Pass::Copy])
        .count();
    if changed > 0 {
        return Ok(());
    }
    let selected = !opts.select.include.is_empty() || !opts.select.exclude.is_empty();
    Err(Error::new(ErrorKind::NothingChanged(format!(
        "the target layout changes none of the {layers} layer(s){}{}",
        if selected {
            " selected by --include / --exclude"
        } else {
            " (they already have it, or none can take it)"
        },
        if warnings.is_empty() {
            String::new()
        } else {
            format!(" ({})", warnings.join("; "))
        }
    ))))
}

/// Every path a conversion reads: the input, the side files found beside a
/// file input, and the files given as hints or references.
pub(crate) fn read_set(input: &Path, opts: &ConvertOptions) -> Vec<PathBuf> {
    fn with_sides(v: &mut Vec<PathBuf>, p: &Path) {
        v.push(p.to_path_buf());
        if !p.is_dir() {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut sides: Vec<&str> = crate::layout::registry::side_names().collect();
            sides.push("config.json");
            sides.sort_unstable();
            sides.dedup();
            for side in sides {
                let s = dir.join(side);
                if std::fs::symlink_metadata(&s).is_ok() {
                    v.push(s);
                }
            }
        }
    }
    let mut v = Vec::new();
    if input_kind(input).ok() == Some(InputKind::Safetensors) {
        with_sides(&mut v, input);
    } else {
        v.push(input.to_path_buf());
    }
    for p in opts.qmap.iter().chain(&opts.shapes_from) {
        v.push(p.clone());
    }
    for p in &opts.extra_reads {
        with_sides(&mut v, p);
    }
    v
}

/// Refuses an output that equals, contains or lies inside anything the
/// conversion reads (symlinks and not-yet-existing parents resolved). The
/// companion files of a safetensors output are checked when they are
/// claimed ([`claim_companions`]).
pub(crate) fn check_overlap(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<()> {
    let writes = crate::io::paths::output_forms(output);
    for r in read_set(input, opts) {
        let rr = crate::io::paths::resolve(&r);
        for w in &writes {
            if !crate::io::paths::overlap(w, &rr) {
                continue;
            }
            let how = if *w == rr {
                "is"
            } else if w.starts_with(&rr) {
                "lies inside"
            } else {
                "contains"
            };
            let what = if r == input {
                "the input"
            } else {
                "a file this conversion reads"
            };
            return Err(Error::usage(format!(
                "output {} {how} {what} ({}); writing there could destroy it — choose another path",
                output.display(),
                r.display()
            )));
        }
    }
    Ok(())
}

/// Creates the missing parent directories of an output; returns them,
/// outermost first.
pub(crate) fn ensure_parent(output: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = output.parent().filter(|p| !p.as_os_str().is_empty());
    while let Some(d) = p {
        if let Ok(md) = std::fs::metadata(d) {
            if !md.is_dir() {
                return Err(Error::new(ErrorKind::FileType {
                    found: crate::io::files::type_name(&md),
                    expected: "a directory",
                })
                .with_file(d));
            }
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent().filter(|p| !p.as_os_str().is_empty());
    }
    missing.reverse();
    for d in &missing {
        std::fs::create_dir(d).map_err(|e| Error::from(e).with_file(d))?;
    }
    Ok(missing)
}

pub(crate) fn count_layers(tensors: &[SourceTensor]) -> usize {
    let mut s: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for t in tensors {
        s.insert(crate::format::layers::split_key(&t.key).0);
    }
    s.len()
}
