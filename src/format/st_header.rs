//! safetensors headers: building one from a plan (byte-identical to what the
//! `safetensors` crate writes) and parsing an untrusted one.
//!
//! Parsing runs our own checks first (duplicate keys, checked arithmetic,
//! limits) and then hands the JSON to the `safetensors` crate's own
//! `Metadata` parser; both views must agree.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::{byte_len, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{MAX_NAME_LEN, MAX_RANK, MAX_ST_HEADER_LEN, MAX_TENSORS};

/// A tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// The key.
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Start of the data, relative to the data section.
    pub start: u64,
    /// One past the end of the data, relative to the data section.
    pub end: u64,
}

impl HeaderTensor {
    /// Byte length of the data.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StHeader {
    /// `8 + N`: where the data section starts.
    pub header_len: u64,
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in data order (ascending offsets).
    pub tensors: Vec<HeaderTensor>,
}

impl StHeader {
    /// Total length of the data section.
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }

    /// Total file length: header plus data.
    pub fn file_len(&self) -> u64 {
        // header_len and data_len were checked to add up without overflow
        self.header_len.saturating_add(self.data_len())
    }

    /// Finds a tensor by key (a scan: [`crate::SafetensorsFile`] keeps an
    /// index for its per-tensor lookups).
    pub fn get(&self, key: &str) -> Option<&HeaderTensor> {
        crate::format::lookups::find(&self.tensors, |t| t.key == key)
    }
}

/// The alignment class of a tensor of `len` bytes: the largest power of two
/// dividing its length, at most [`DATA_ALIGN`] (an empty tensor is of the
/// largest class).
pub fn align_class(len: u64) -> u64 {
    if len == 0 {
        DATA_ALIGN
    } else {
        (1u64 << len.trailing_zeros()).min(DATA_ALIGN)
    }
}

/// The writer's data order (spec/container.md §3): empty tensors first (by
/// the safetensors crate's dtype order, then key: how readers order tensors
/// that share an offset), then by descending `align_class` of the byte
/// length, then by key. Laid out back to back from an aligned start, every
/// tensor then starts at a multiple of its class (so at a multiple of 16
/// whenever its length is one), with no holes, and a layer's tensors of one
/// class sit together (`l.weight._data` beside `l.weight._scale`), so a
/// writer that must emit tensors in this order (a compressed shard)
/// finishes a layer's large outputs together rather than holding them;
/// tensors whose byte length cannot be computed sort last (the header
/// builder refuses them).
pub fn data_order(tensors: &mut [(String, Dtype, Vec<u64>)]) {
    use std::cmp::Reverse;
    tensors.sort_by_cached_key(|(k, d, s)| {
        // (group, class, the empties' dtype order, key)
        let (group, class, dtype) = match byte_len(*d, s) {
            Ok(0) => (0u8, 0, Some(Reverse(d.to_st()))),
            Ok(n) => (1, align_class(n), None),
            Err(_) => (2, 0, None),
        };
        (group, Reverse(class), dtype, k.clone())
    });
}

/// Where tensor data starts in every safetensors file ckptkit writes: the
/// header is padded with spaces so that `8 + N` is a multiple of this.
pub const DATA_ALIGN: u64 = 64;

/// Builds a safetensors header for the given tensors.
///
/// Tensors are laid out in the writer's [`data_order`]; the JSON is
/// `__metadata__` first (keys in ascending byte order, omitted when empty),
/// then each tensor as `{"dtype":..,"shape":[..],"data_offsets":[s,e]}`,
/// space-padded so that the data section starts at a multiple of
/// [`DATA_ALIGN`]. Returns the `8 + N` header bytes and the parsed form.
pub fn build(
    tensors: &[(String, Dtype, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, StHeader)> {
    let mut sorted = tensors.to_vec();
    data_order(&mut sorted);
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).map_err(json_err)?);
        first = false;
    }
    let mut out = Vec::with_capacity(sorted.len());
    let mut off = 0u64;
    for (key, dtype, shape) in sorted {
        check_key(&key)?;
        if shape.len() > MAX_RANK {
            return Err(limit("tensor rank", shape.len() as u64, MAX_RANK as u64).with_tensor(key));
        }
        let len = byte_len(dtype, &shape).map_err(|e| e.with_tensor(key.clone()))?;
        let end = off
            .checked_add(len)
            .ok_or_else(|| Error::overflow("data offsets"))?;
        let shape_usize: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| Error::overflow("shape")))
            .collect::<Result<_>>()?;
        let info = safetensors::tensor::TensorInfo {
            dtype: dtype.to_st(),
            shape: shape_usize,
            data_offsets: (
                usize::try_from(off).map_err(|_| Error::overflow("offset"))?,
                usize::try_from(end).map_err(|_| Error::overflow("offset"))?,
            ),
        };
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(&key).map_err(json_err)?);
        json.push(':');
        json.push_str(&serde_json::to_string(&info).map_err(json_err)?);
        out.push(HeaderTensor {
            key,
            dtype,
            shape,
            start: off,
            end,
        });
        off = end;
    }
    json.push('}');
    let mut bytes = json.into_bytes();
    // 8 + N a multiple of DATA_ALIGN: the data section starts aligned
    let padded = (bytes.len() + 8).next_multiple_of(DATA_ALIGN as usize) - 8;
    bytes.resize(padded, b' ');
    let n = bytes.len() as u64;
    if n > MAX_ST_HEADER_LEN {
        return Err(limit("safetensors header length", n, MAX_ST_HEADER_LEN));
    }
    let mut full = Vec::with_capacity(bytes.len() + 8);
    full.extend_from_slice(&n.to_le_bytes());
    full.extend_from_slice(&bytes);
    Ok((
        full,
        StHeader {
            header_len: n + 8,
            metadata: metadata.clone(),
            tensors: out,
        },
    ))
}

fn json_err(e: serde_json::Error) -> Error {
    Error::new(ErrorKind::Safetensors(format!("JSON: {e}")))
}

fn st_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Safetensors(msg.into()))
}

fn limit(what: &'static str, value: u64, limit: u64) -> Error {
    Error::new(ErrorKind::LimitExceeded { what, value, limit })
}

fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_NAME_LEN {
        return Err(limit(
            "tensor key length",
            key.len() as u64,
            MAX_NAME_LEN as u64,
        ));
    }
    if key == "__metadata__" {
        return Err(st_err("`__metadata__` cannot be a tensor key"));
    }
    Ok(())
}

/// Reads `N` from the first 8 bytes and checks it against the limit and the
/// bytes available (`available` = file or shard length). Returns `8 + N`.
pub fn header_len(first8: &[u8], available: u64) -> Result<u64> {
    let b: [u8; 8] = first8
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            Error::new(ErrorKind::Truncated {
                what: "safetensors header length",
                needed: 8,
                available: first8.len() as u64,
            })
        })?;
    let n = u64::from_le_bytes(b);
    if n > MAX_ST_HEADER_LEN {
        return Err(limit("safetensors header length", n, MAX_ST_HEADER_LEN));
    }
    let total = n + 8;
    if total > available {
        return Err(Error::new(ErrorKind::Truncated {
            what: "safetensors header",
            needed: total,
            available,
        }));
    }
    Ok(total)
}

/// Raw entry as our own first pass sees it.
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

struct Entries {
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<(String, RawInfo)>,
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut metadata = None;
        let mut tensors = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            if key == "__metadata__" {
                let m: Option<BTreeMap<String, String>> = map.next_value()?;
                metadata = m;
            } else {
                if tensors.len() as u64 >= MAX_TENSORS {
                    let _: IgnoredAny = map.next_value()?;
                    return Err(de::Error::custom(format!(
                        "more than {MAX_TENSORS} tensors in one header"
                    )));
                }
                let info: RawInfo = map.next_value()?;
                tensors.push((key, info));
            }
        }
        Ok(Entries { metadata, tensors })
    }
}

/// Parses and validates an untrusted safetensors header.
///
/// `bytes` must hold at least the `8 + N` header bytes; `total_len`, when
/// known, is the length of the whole file (or extracted shard), which must
/// equal header plus data exactly.
///
/// Rules (spec/container.md §3.2): S1 `N` within the limit and the bytes;
/// S2 UTF-8 JSON object; S3 no duplicate keys; S4 `__metadata__` is a
/// string→string map or null; S5 known whole-byte dtypes; S6 rank and key
/// length limits; S7 sizes computed with checked arithmetic equal
/// `end - start`; S8 offsets contiguous from 0; S9 header + data = total
/// length; S10 the `safetensors` crate's own parser accepts the header and
/// agrees.
pub fn parse(bytes: &[u8], total_len: Option<u64>) -> Result<StHeader> {
    let hl = header_len(bytes, bytes.len() as u64)?;
    let json = bytes
        .get(8..hl as usize)
        .ok_or_else(|| st_err("header out of range"))?;
    let text =
        std::str::from_utf8(json).map_err(|e| st_err(format!("header is not UTF-8: {e}")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = (&mut de)
        .deserialize_map(EntriesVisitor)
        .map_err(|e| st_err(format!("header JSON: {e}")))?;
    de.end()
        .map_err(|e| st_err(format!("header JSON: trailing data: {e}")))?;
    let mut tensors = Vec::with_capacity(entries.tensors.len());
    for (key, info) in entries.tensors {
        check_key(&key).map_err(|e| e.with_tensor(key.clone()))?;
        let dtype = Dtype::from_name(&info.dtype).ok_or_else(|| {
            Error::new(ErrorKind::UnsupportedDtype(info.dtype.clone())).with_tensor(key.clone())
        })?;
        if info.shape.len() > MAX_RANK {
            return Err(
                limit("tensor rank", info.shape.len() as u64, MAX_RANK as u64).with_tensor(key),
            );
        }
        let (start, end) = info.data_offsets;
        if end < start {
            return Err(
                st_err(format!("data_offsets [{start}, {end}] end before start")).with_tensor(key),
            );
        }
        let len = byte_len(dtype, &info.shape).map_err(|e| e.with_tensor(key.clone()))?;
        if end - start != len {
            return Err(st_err(format!(
                "data_offsets [{start}, {end}] span {} bytes but {dtype} {:?} needs {len}",
                end - start,
                info.shape
            ))
            .with_tensor(key));
        }
        tensors.push(HeaderTensor {
            key,
            dtype,
            shape: info.shape,
            start,
            end,
        });
    }
    // Data order; empty tensors sharing an offset are ordered as the crate's
    // writer orders them (dtype descending, then key).
    tensors.sort_by(|a, b| {
        (a.start, a.end)
            .cmp(&(b.start, b.end))
            .then(b.dtype.to_st().cmp(&a.dtype.to_st()))
            .then(a.key.cmp(&b.key))
    });
    let mut pos = 0u64;
    for t in &tensors {
        if t.start != pos {
            return Err(st_err(format!(
                "data_offsets must be contiguous: expected a tensor at {pos}, found one at {}",
                t.start
            ))
            .with_tensor(t.key.clone()));
        }
        pos = t.end;
    }
    let file_len = hl
        .checked_add(pos)
        .ok_or_else(|| Error::overflow("safetensors data length"))?;
    if let Some(total) = total_len {
        if file_len > total {
            return Err(Error::new(ErrorKind::Truncated {
                what: "safetensors data",
                needed: file_len,
                available: total,
            }));
        }
        if file_len != total {
            return Err(st_err(format!(
                "{} bytes after the last tensor (header + data = {file_len}, file = {total})",
                total - file_len
            )));
        }
    }
    // Cross-check with the safetensors crate's own parser.
    let theirs: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|e| st_err(format!("safetensors crate: {e}")))?;
    let agree = theirs.tensors().len() == tensors.len()
        && tensors.iter().all(|t| {
            theirs.info(&t.key).is_some_and(|i| {
                i.dtype == t.dtype.to_st()
                    && i.shape
                        .iter()
                        .map(|&d| d as u64)
                        .eq(t.shape.iter().copied())
                    && (i.data_offsets.0 as u64, i.data_offsets.1 as u64) == (t.start, t.end)
            })
        });
    if !agree {
        return Err(st_err(
            "the safetensors crate reads this header differently",
        ));
    }
    Ok(StHeader {
        header_len: hl,
        metadata: entries.metadata.unwrap_or_default(),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct V(safetensors::Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &V {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    #[test]
    fn build_matches_crate_and_parses_back() {
        let specs = vec![
            ("b.w".to_string(), Dtype::I8, vec![3u64, 2]),
            ("a".to_string(), Dtype::BF16, vec![2]),
            ("z".to_string(), Dtype::F8E8M0, vec![1]),
            ("y".to_string(), Dtype::F8E4M3Fnuz, vec![]),
            ("x".to_string(), Dtype::F64, vec![0, 4]),
        ];
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let (hdr, parsed) = build(&specs, &md).unwrap();
        let views: Vec<(String, V)> = specs
            .iter()
            .map(|(k, d, s)| {
                let n = byte_len(*d, s).unwrap() as usize;
                (
                    k.clone(),
                    V(
                        d.to_st(),
                        s.iter().map(|&x| x as usize).collect(),
                        vec![7; n],
                    ),
                )
            })
            .collect();
        let theirs = safetensors::serialize(
            views.iter().map(|(k, v)| (k.as_str(), v)),
            Some(md.clone().into_iter().collect::<HashMap<_, _>>()),
        )
        .unwrap();
        // the crate's own file parses; ours has the same tensors, laid out
        // by the writer's convention
        let back = parse(&theirs, Some(theirs.len() as u64)).unwrap();
        let mut a: Vec<_> = back
            .tensors
            .iter()
            .map(|t| (&t.key, t.dtype, &t.shape))
            .collect();
        let mut b: Vec<_> = parsed
            .tensors
            .iter()
            .map(|t| (&t.key, t.dtype, &t.shape))
            .collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(hdr.len() % 64, 0);
        let total: u64 = parsed.tensors.iter().map(|t| t.end - t.start).sum();
        let mut file = hdr.clone();
        file.resize(hdr.len() + total as usize, 7);
        let ours = parse(&file, Some(file.len() as u64)).unwrap();
        assert_eq!(ours, parsed);
        for t in &parsed.tensors {
            assert_eq!(t.start % align_class(t.end - t.start), 0, "{}", t.key);
        }
        safetensors::SafeTensors::deserialize(&file).unwrap();
    }

    /// The writer's order: a layer's tensors of one alignment class sit
    /// together whatever their dtypes (so a compressed shard, written in
    /// this order, finishes a layer's big outputs together), smaller
    /// classes follow, and empty tensors come first in the order readers
    /// give tensors sharing an offset, so `parse` of what `build` wrote
    /// lists the tensors exactly in `data_order`.
    #[test]
    fn data_order_keeps_a_layers_class_together_and_parses_back_in_it() {
        let specs = vec![
            ("b.weight._scale".to_string(), Dtype::BF16, vec![32u64, 1]),
            ("a.weight._data".to_string(), Dtype::I8, vec![32, 64]),
            ("b.weight._data".to_string(), Dtype::I8, vec![32, 64]),
            ("a.weight._scale".to_string(), Dtype::BF16, vec![32, 1]),
            ("a.input_scale".to_string(), Dtype::BF16, vec![]),
            ("e2".to_string(), Dtype::I8, vec![0]),
            ("e1".to_string(), Dtype::F32, vec![0, 3]),
            ("e0".to_string(), Dtype::I8, vec![4, 0]),
            ("a.bias".to_string(), Dtype::F32, vec![3]),
        ];
        let mut order = specs.clone();
        data_order(&mut order);
        let keys: Vec<&str> = order.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "e1",
                "e0",
                "e2",
                "a.weight._data",
                "a.weight._scale",
                "b.weight._data",
                "b.weight._scale",
                "a.bias",
                "a.input_scale",
            ]
        );
        let (_, parsed) = build(&specs, &BTreeMap::new()).unwrap();
        let back: Vec<&str> = parsed.tensors.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(back, keys);
        for t in &parsed.tensors {
            assert_eq!(t.start % align_class(t.end - t.start), 0, "{}", t.key);
        }
    }

    #[test]
    fn duplicate_keys_rejected() {
        let json = br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json);
        b.push(0);
        let e = parse(&b, Some(b.len() as u64)).unwrap_err();
        assert!(e.to_string().contains("duplicate key `a`"), "{e}");
    }

    #[test]
    fn overflowing_shape_rejected_without_panic() {
        let json = br#"{"a":{"dtype":"U8","shape":[4611686018427387904,8],"data_offsets":[0,0]}}"#;
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json);
        let e = parse(&b, None).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Overflow { .. }), "{e}");
    }
}
