//! A plan's output as a GGUF file (spec/gguf.md §4): which ggml type each
//! output tensor is written as, and the key-value metadata.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::gguf::read::Value;
use crate::format::gguf::write::OutTensor;
use crate::format::gguf::GgmlType;
use crate::format::manifest::{Role, WeightQuant};
use crate::migrate::plan::Plan;

/// Key-value pairs of a GGUF header, in order.
type Kvs = Vec<(String, Value)>;

/// `general.architecture`.
const ARCH_KEY: &str = "general.architecture";
/// `general.quantization_version` (2 since ggml's 2023 block formats).
const QVERSION_KEY: &str = "general.quantization_version";

/// The architectures ComfyUI-GGUF's loader accepts for diffusion models
/// (`loader.py`, `IMG_ARCH_LIST`, at 795e451).
const IMAGE_ARCHS: &[&str] = &[
    "flux",
    "sd1",
    "sdxl",
    "sd3",
    "aura",
    "hidream",
    "cosmos",
    "ltxv",
    "hyvid",
    "wan",
    "lumina2",
    "qwen_image",
];

/// One of ComfyUI-GGUF's architecture probes (`tools/convert.py` at
/// 795e451): `arch` matches when every key of one of its `sets` is a
/// tensor name; a `banned` name among them is the diffusers name of that
/// model, which ComfyUI-GGUF refuses to convert (its loader reads the
/// reference names).
struct Probe {
    arch: &'static str,
    sets: &'static [&'static [&'static str]],
    banned: &'static [&'static str],
}

/// The probes, in ComfyUI-GGUF's order (the first match wins).
const PROBES: &[Probe] = &[
    Probe {
        arch: "flux",
        sets: &[
            &["transformer_blocks.0.attn.norm_added_k.weight"],
            &["double_blocks.0.img_attn.proj.weight"],
        ],
        banned: &["transformer_blocks.0.attn.norm_added_k.weight"],
    },
    Probe {
        arch: "sd3",
        sets: &[
            &["transformer_blocks.0.attn.add_q_proj.weight"],
            &["joint_blocks.0.x_block.attn.qkv.weight"],
        ],
        banned: &["transformer_blocks.0.attn.add_q_proj.weight"],
    },
    Probe {
        arch: "aura",
        sets: &[
            &["double_layers.3.modX.1.weight"],
            &["joint_transformer_blocks.3.ff_context.out_projection.weight"],
        ],
        banned: &["joint_transformer_blocks.3.ff_context.out_projection.weight"],
    },
    Probe {
        arch: "hidream",
        sets: &[&[
            "caption_projection.0.linear.weight",
            "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",
        ]],
        banned: &[],
    },
    Probe {
        arch: "cosmos",
        sets: &[&[
            "blocks.0.mlp.layer1.weight",
            "blocks.0.adaln_modulation_cross_attn.1.weight",
        ]],
        banned: &[],
    },
    Probe {
        arch: "ltxv",
        sets: &[&[
            "adaln_single.emb.timestep_embedder.linear_2.weight",
            "transformer_blocks.27.scale_shift_table",
            "caption_projection.linear_2.weight",
        ]],
        banned: &[],
    },
    Probe {
        arch: "hyvid",
        sets: &[&[
            "double_blocks.0.img_attn_proj.weight",
            "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
        ]],
        banned: &[],
    },
    Probe {
        arch: "wan",
        sets: &[&[
            "blocks.0.self_attn.norm_q.weight",
            "text_embedding.2.weight",
            "head.modulation",
        ]],
        banned: &[],
    },
    Probe {
        arch: "sdxl",
        sets: &[
            &[
                "down_blocks.0.downsamplers.0.conv.weight",
                "add_embedding.linear_1.weight",
            ],
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight",
            ],
            &["label_emb.0.0.weight"],
        ],
        banned: &[],
    },
    Probe {
        arch: "sd1",
        sets: &[
            &["down_blocks.0.downsamplers.0.conv.weight"],
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
            ],
        ],
        banned: &[],
    },
    Probe {
        arch: "lumina2",
        sets: &[&[
            "cap_embedder.1.weight",
            "context_refiner.0.attention.qkv.weight",
        ]],
        banned: &[],
    },
];

/// The prefix ComfyUI-GGUF's loader strips from tensor names.
const LOADER_PREFIX: &str = "model.diffusion_model.";

/// What ComfyUI-GGUF's probes make of a model's tensor names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probed {
    /// The architecture matched.
    pub arch: &'static str,
    /// A diffusers name of that model found among the names (ComfyUI-GGUF
    /// refuses to convert such a model: its loader reads reference names).
    pub diffusers_name: Option<&'static str>,
    /// The prefix stripped before matching, when it is one ComfyUI-GGUF's
    /// loader does not strip (`model.`, `net.`): the names then do not load
    /// there as they are.
    pub foreign_prefix: Option<&'static str>,
}

/// Runs ComfyUI-GGUF's architecture probes on tensor names, after its
/// converter's prefix rule (`strip_prefix`): `model.diffusion_model.` or
/// else `model.` when some name starts with it (names without it are left
/// out), else `net.` when every name starts with it.
pub(crate) fn probe_arch<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Option<Probed> {
    let prefix = ["model.diffusion_model.", "model."]
        .into_iter()
        .find(|p| names.clone().any(|n| n.starts_with(p)))
        .or_else(|| {
            let mut all = names.clone().peekable();
            (all.peek().is_some() && all.all(|n| n.starts_with("net."))).then_some("net.")
        });
    let set: std::collections::BTreeSet<&str> = match prefix {
        Some(p) => names.filter_map(|n| n.strip_prefix(p)).collect(),
        None => names.collect(),
    };
    let probe = PROBES.iter().find(|p| {
        p.sets
            .iter()
            .any(|keys| keys.iter().all(|k| set.contains(k)))
    })?;
    Some(Probed {
        arch: probe.arch,
        diffusers_name: probe.banned.iter().copied().find(|k| set.contains(k)),
        foreign_prefix: prefix.filter(|p| *p != LOADER_PREFIX),
    })
}

/// `general.architecture` of a GGUF output whose input records none and
/// for which `--gguf-arch` is not given: what ComfyUI-GGUF's probes find in
/// the output's tensor names, with a note saying so; refused when they find
/// nothing or diffusers names.
fn arch_from_names(tensors: &[OutTensor]) -> Result<(String, String)> {
    let names = tensors.iter().map(|t| t.name.as_str());
    match probe_arch(names) {
        Some(Probed {
            arch,
            diffusers_name: Some(k),
            ..
        }) => Err(Error::usage(format!(
            "the tensor names are diffusers' names of a `{arch}` model (`{k}`): ComfyUI-GGUF and \
             stable-diffusion.cpp load the reference (BFL/ComfyUI) names, so ckptkit does not guess \
             an architecture for these; convert a checkpoint with reference names, or give \
             --gguf-arch to write these names anyway"
        ))),
        Some(p) => Ok((
            p.arch.to_string(),
            format!(
                "general.architecture `{}` from the tensor names (ComfyUI-GGUF's probes); \
                 --gguf-arch sets another",
                p.arch
            ),
        )),
        None => Err(Error::usage(
            "a GGUF output needs `general.architecture`: the input records none and ComfyUI-GGUF's \
             probes recognise no model in the tensor names; give it with --gguf-arch (ComfyUI-GGUF \
             reads flux, sd1, sdxl, sd3, aura, hidream, cosmos, ltxv, hyvid, wan, lumina2, \
             qwen_image; llama.cpp its model families)",
        )),
    }
}

/// A warning when a GGUF output of a diffusion architecture (one
/// ComfyUI-GGUF loads) has tensor names that will not load there: diffusers
/// names, names under a prefix its loader does not strip, or names its
/// probes take for another model or none. `None` for other architectures
/// (LLMs: their names are llama.cpp's tables', out of ckptkit's scope).
pub(crate) fn name_warning(arch: &str, tensors: &[OutTensor]) -> Option<String> {
    if !IMAGE_ARCHS.contains(&arch) {
        return None;
    }
    let probed = probe_arch(tensors.iter().map(|t| t.name.as_str()));
    let why = match &probed {
        Some(Probed {
            diffusers_name: Some(k),
            ..
        }) => format!("they are diffusers names (`{k}`), and it loads the reference ones"),
        Some(Probed {
            foreign_prefix: Some(p),
            ..
        }) => format!(
            "they start with `{p}`, which its loader does not strip (`--rename '^{}='` strips it)",
            p.replace('.', "\\.")
        ),
        // ComfyUI-GGUF detects no architecture from qwen_image names
        Some(p) if p.arch == arch || arch == "qwen_image" => return None,
        None if arch == "qwen_image" => return None,
        Some(p) => format!("its probes take them for a `{}` model", p.arch),
        None => "its probes recognise no model in them".to_string(),
    };
    Some(format!(
        "general.architecture is `{arch}`, but the tensor names will likely not load in \
         ComfyUI-GGUF or stable-diffusion.cpp: {why}"
    ))
}

/// The ggml type of an unquantized dtype, if GGUF has one.
fn ggml_of(d: crate::Dtype) -> Option<GgmlType> {
    crate::format::gguf::types::TYPES
        .iter()
        .copied()
        .find(|t| t.readable && !t.is_blocked() && t.plain_dtype() == Some(d))
}

/// The shape a tensor is written in when its row-major `logical` shape
/// cannot be: more than 4 dimensions (ggml's limit), or block rows that are
/// not its last dimension. `stored` is the shape it is written as; the
/// orig-shape entry (ComfyUI-GGUF's, which its loader reads) records
/// `logical`. Refused when a dimension does not fit that entry's i32.
fn reshaped(
    name: &str,
    logical: &[u64],
    stored: Vec<u64>,
    orig: &mut Vec<(String, Value)>,
) -> Result<Vec<u64>> {
    if stored.as_slice() == logical {
        return Ok(stored);
    }
    let v = crate::format::gguf::orig_shape_value(logical).ok_or_else(|| {
        Error::usage(format!(
            "tensor `{name}` of shape {logical:?} is written reshaped to {stored:?}, and a \
             dimension does not fit the i32 of ComfyUI-GGUF's `{}` entry",
            crate::format::gguf::ORIG_SHAPE_PREFIX
        ))
        .with_tensor(name.to_string())
    })?;
    orig.push((
        format!("{}{name}", crate::format::gguf::ORIG_SHAPE_PREFIX),
        v,
    ));
    Ok(stored)
}

/// `shape` as ggml can hold it: itself, or, past 4 dimensions, its rows
/// `[every dimension but the last multiplied, the last]` (unchanged if that
/// overflows, which the GGUF writer then refuses).
fn at_most_4_dims(shape: &[u64]) -> Vec<u64> {
    match shape.split_last() {
        Some((&last, lead)) if shape.len() > 4 => {
            crate::dtype::numel(lead).map_or_else(|_| shape.to_vec(), |rows| vec![rows, last])
        }
        _ => shape.to_vec(),
    }
}

/// The tensors of a GGUF output of plan `p`, in the plan's output order:
/// unquantized tensors as the ggml type of their dtype, `gguf` layers as
/// their blocks. Any other quantized layer, and a dtype GGUF has no type
/// for, is refused naming the tensor. Also returns the orig-shape entries
/// of the tensors written reshaped (more than 4 dimensions; block rows that
/// are not the last dimension).
pub(crate) fn tensors(p: &Plan) -> Result<(Vec<OutTensor>, Kvs)> {
    let mut out = Vec::new();
    let mut orig = Vec::new();
    for lp in &p.layers {
        let l = &lp.output;
        let block = match &l.quant.weights {
            WeightQuant::Plain => None,
            w if crate::layout::gguf::type_of(w).is_ok() => crate::layout::gguf::type_of(w).ok(),
            _ => {
                return Err(Error::usage(format!(
                    "layer `{}` would be {}, which a GGUF file cannot hold: convert it with \
                     --to plain (or keep it in a GGUF block type)",
                    l.path,
                    crate::layout::registry::layout_name(l)
                ))
                .with_layer(l.path.clone()))
            }
        };
        for t in &l.tensors {
            for part in &t.parts {
                let (ty, shape) = match block {
                    Some(ty) if t.encoding.is_quantized() && part.role == Role::Data => {
                        // rows of whole blocks: the logical last dimension,
                        // or, for blocks stored reshaped, the stored rows'
                        let stored = match (
                            crate::layout::gguf::stored_shape(ty, &t.shape),
                            part.shape.as_slice(),
                        ) {
                            (Some(s), _) if s == part.shape => at_most_4_dims(&t.shape),
                            (_, &[rows, row_bytes]) => {
                                let elems = crate::layout::gguf::row_elems(ty, row_bytes)
                                    .ok_or_else(|| {
                                        Error::layout(format!(
                                            "`{}`: stored rows of {row_bytes} bytes are not \
                                             whole {} blocks",
                                            part.key, ty.name
                                        ))
                                        .with_tensor(part.key.clone())
                                    })?;
                                vec![rows, elems]
                            }
                            _ => {
                                return Err(Error::layout(format!(
                                    "`{}`: raw blocks stored as {:?}, not [rows, row_bytes]",
                                    part.key, part.shape
                                ))
                                .with_tensor(part.key.clone()))
                            }
                        };
                        let shape = reshaped(&part.key, &t.shape, stored, &mut orig)
                            .map_err(|e| e.with_layer(l.path.clone()))?;
                        (ty, shape)
                    }
                    _ => (
                        ggml_of(part.dtype).ok_or_else(|| {
                            Error::usage(format!(
                                "tensor `{}` is {}, which GGUF has no type for (it holds F32, \
                                 F16, BF16, F64, I8, I16, I32, I64 and ggml's block types)",
                                part.key, part.dtype
                            ))
                            .with_layer(l.path.clone())
                            .with_tensor(part.key.clone())
                        })?,
                        part.shape.clone(),
                    ),
                };
                // GGUF has no 0-D tensors: a scalar is written as [1]
                let shape = if shape.is_empty() {
                    vec![1]
                } else if ty.is_blocked() {
                    shape
                } else {
                    reshaped(&part.key, &shape, at_most_4_dims(&shape), &mut orig)
                        .map_err(|e| e.with_layer(l.path.clone()))?
                };
                out.push(OutTensor {
                    name: part.key.clone(),
                    ty,
                    shape,
                });
            }
        }
    }
    Ok((out, orig))
}

/// The key-value metadata of a GGUF output: a GGUF input's own (as its
/// `ckptkit.gguf.kv` entry carries it), `general.architecture` from `arch`
/// when given (else the input's; neither is refused), and, for an input
/// that is not GGUF, `general.quantization_version` 2 when the output holds
/// block types; and ckptkit's `ckptkit.gguf.tensors` entry for the block
/// tensors (`tensors_entry`).
///
/// Returns the pairs and the notes for the summary's warnings (where the
/// architecture came from; names that will not load where it is read).
pub(crate) fn kvs(
    source_md: &BTreeMap<String, String>,
    arch: Option<&str>,
    tensors: &[OutTensor],
    orig_shapes: Vec<(String, Value)>,
    tensors_entry: Option<String>,
) -> Result<(Kvs, Vec<String>)> {
    let mut notes = Vec::new();
    let own = crate::io::gguf_file::kv_from_metadata(source_md)?;
    let from_gguf = own.is_some();
    let mut kvs: Vec<(String, Value)> = own
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| {
            k != crate::format::gguf::read::ALIGNMENT_KEY
                && k != crate::io::gguf_writer::HASHES_KEY
                && k != crate::io::gguf_file::TENSORS_KEY
                // written anew for the tensors this output reshapes
                && !k.starts_with(crate::format::gguf::ORIG_SHAPE_PREFIX)
        })
        .collect();
    match (arch, kvs.iter_mut().find(|(k, _)| k == ARCH_KEY)) {
        (Some(a), Some(kv)) => kv.1 = Value::Str(a.to_string()),
        (Some(a), None) => kvs.insert(0, (ARCH_KEY.to_string(), Value::Str(a.to_string()))),
        (None, Some(_)) => {}
        (None, None) => {
            let (a, note) = arch_from_names(tensors)?;
            notes.push(note);
            kvs.insert(0, (ARCH_KEY.to_string(), Value::Str(a)));
        }
    }
    if let Some((_, Value::Str(a))) = kvs.iter().find(|(k, _)| k == ARCH_KEY) {
        notes.extend(name_warning(a, tensors));
    }
    // a GGUF input's metadata is kept as it is
    if !from_gguf
        && tensors.iter().any(|t| t.ty.is_blocked())
        && !kvs.iter().any(|(k, _)| k == QVERSION_KEY)
    {
        kvs.push((QVERSION_KEY.to_string(), Value::U32(2)));
    }
    kvs.extend(orig_shapes);
    // the logical dtype and shape of each block tensor, so that reading the
    // file back restores them
    if let Some(e) = tensors_entry {
        kvs.push((crate::io::gguf_file::TENSORS_KEY.to_string(), Value::Str(e)));
    }
    Ok((kvs, notes))
}
