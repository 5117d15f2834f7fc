//! Decode-time limits of the manifest (spec/container.md §5.1).
//!
//! Every `String`, `Vec` and map field of the manifest types is decoded
//! through a function of this module (`#[serde(deserialize_with = ...)]`
//! in [`manifest`](super::manifest)), so that each declared length is
//! checked before anything is allocated for it:
//!
//! - against its V2 count cap, per collection and, where the cap is on a
//!   total over the whole manifest (stored tensors, logical tensors, parts,
//!   extensions), against the running total;
//! - against the manifest's bytes: each element occupies at least
//!   [`Rule::min_len`] bytes of its own (not counting its children's
//!   elements), so everything declared so far must fit in the manifest. A
//!   declaration that cannot fit is refused at once, which never refuses a
//!   manifest that would decode.
//!
//! Only then is the collection allocated, at exactly the declared capacity
//! (it never grows by doubling). bincode's serde deserializer reports the
//! exact declared length of a sequence or map (`size_hint`) before its
//! first element; strings and byte strings are borrowed from the input
//! (bincode checks that their bytes are present) and copied once. Nothing
//! here changes the encoding: serialization stays the derived one, and
//! `deserialize_str`/`deserialize_bytes` read exactly what a `String` or a
//! `Vec<u8>` is written as.
//!
//! The running totals live in a per-thread state that [`Scope`] installs
//! for one `decode_manifest` call and removes afterwards, so decodes on
//! other threads never share it. Decoding the manifest types with another
//! deserializer (no scope) still enforces the per-collection caps, and
//! preallocates at most [`UNSCOPED_PREALLOC`] elements.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, ErrorKind};
use crate::format::{
    MAX_EXTENSIONS, MAX_EXTENSIONS_TOTAL, MAX_LAYERS, MAX_METADATA_ENTRIES, MAX_PARAMS,
    MAX_PARAMS_TOTAL, MAX_PARTS, MAX_RANK, MAX_SHARDS, MAX_SOURCES, MAX_TENSORS,
};

/// Elements preallocated from a declared length when no [`Scope`] bounds
/// it (decoding with some other deserializer).
const UNSCOPED_PREALLOC: usize = 1024;

/// A cap on a total over the whole manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Total {
    /// Stored tensors of all shards.
    StoredTensors,
    /// Logical tensors of all layers.
    LogicalTensors,
    /// Parts of all logical tensors.
    Parts,
    /// Extensions, top level and of all layers.
    Extensions,
    /// Parameters of all family records (container 2.0).
    Params,
}

impl Total {
    /// The limit's name, as in the spec.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Total::StoredTensors => "stored tensor count",
            Total::LogicalTensors => "logical tensor count",
            Total::Parts => "part count",
            Total::Extensions => "total extension count",
            Total::Params => "total parameter count",
        }
    }

    /// The limit.
    pub(crate) fn limit(self) -> u64 {
        match self {
            Total::StoredTensors | Total::LogicalTensors | Total::Parts => MAX_TENSORS,
            Total::Extensions => MAX_EXTENSIONS_TOTAL,
            Total::Params => MAX_PARAMS_TOTAL,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What an element of a collection sets as the place of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Nothing.
    None,
    /// Element `i` is shard `i`.
    Shard,
    /// Each element is a layer (its path is recorded as it is decoded).
    Layer,
    /// Each element is a stored or logical tensor (its name is recorded).
    Tensor,
}

/// The limits of one kind of collection.
#[derive(Debug)]
pub(crate) struct Rule {
    /// What the elements are, plural, for messages.
    pub(crate) noun: &'static str,
    /// A cap on this one collection: its spec name and the limit.
    pub(crate) cap: Option<(&'static str, u64)>,
    /// A cap on the total over the whole manifest.
    pub(crate) total: Option<Total>,
    /// Fewest bytes one element occupies in the encoding, not counting the
    /// elements of its own collections (each of those is at least its
    /// 1-byte length). `tests::min_len_is_the_smallest_encoding` checks
    /// each against the encoding of the smallest value.
    pub(crate) min_len: u64,
    place: Place,
}

/// `metadata` entries (a key and a value, each at least its length byte).
pub(crate) const METADATA: Rule = Rule {
    noun: "metadata entries",
    cap: Some(("metadata entries", MAX_METADATA_ENTRIES as u64)),
    total: None,
    min_len: 2,
    place: Place::None,
};
/// `provenance.sources`.
pub(crate) const SOURCES: Rule = Rule {
    noun: "provenance sources",
    cap: Some(("provenance sources", MAX_SOURCES as u64)),
    total: None,
    min_len: 3,
    place: Place::None,
};
/// The shard table.
pub(crate) const SHARDS: Rule = Rule {
    noun: "shards",
    cap: Some(("shard count", MAX_SHARDS)),
    total: None,
    min_len: 38,
    place: Place::Shard,
};
/// A shard's tensor table.
pub(crate) const STORED_TENSORS: Rule = Rule {
    noun: "stored tensors",
    cap: None,
    total: Some(Total::StoredTensors),
    min_len: 37,
    place: Place::Tensor,
};
/// A shape (stored tensor, logical tensor or part).
pub(crate) const SHAPE: Rule = Rule {
    noun: "dimensions",
    cap: Some(("tensor rank", MAX_RANK as u64)),
    total: None,
    min_len: 1,
    place: Place::None,
};
/// A stored tensor's chunk lengths: no count cap, each takes a byte.
pub(crate) const CHUNKS: Rule = Rule {
    noun: "chunks",
    cap: None,
    total: None,
    min_len: 1,
    place: Place::None,
};
/// The layer table.
pub(crate) const LAYERS: Rule = Rule {
    noun: "layers",
    cap: Some(("layer count", MAX_LAYERS)),
    total: None,
    min_len: 5,
    place: Place::Layer,
};
/// A layer's logical tensors.
pub(crate) const LOGICAL_TENSORS: Rule = Rule {
    noun: "logical tensors",
    cap: None,
    total: Some(Total::LogicalTensors),
    min_len: 5,
    place: Place::Tensor,
};
/// A logical tensor's parts.
pub(crate) const PARTS: Rule = Rule {
    noun: "parts",
    cap: Some(("parts per logical tensor", MAX_PARTS)),
    total: Some(Total::Parts),
    min_len: 37,
    place: Place::None,
};
/// An extension list (top level or one layer's).
pub(crate) const EXTENSIONS: Rule = Rule {
    noun: "extensions",
    cap: Some(("extension count", MAX_EXTENSIONS as u64)),
    total: Some(Total::Extensions),
    min_len: 3,
    place: Place::None,
};
/// A family record's parameters (a key and a value, each at least its
/// length byte).
pub(crate) const PARAMS: Rule = Rule {
    noun: "parameters",
    cap: Some(("parameters per record", MAX_PARAMS)),
    total: Some(Total::Params),
    min_len: 2,
    place: Place::None,
};
/// The bytes of a string or of extension data.
pub(crate) const BYTES: Rule = Rule {
    noun: "bytes",
    cap: None,
    total: None,
    min_len: 1,
    place: Place::None,
};

/// Why decoding stopped.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// A count cap.
    Limit {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// More declared than the manifest's bytes can hold.
    TooShort {
        noun: &'static str,
        count: u64,
        need: u64,
        left: u64,
        len: u64,
    },
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Stop::Limit { what, value, limit } => {
                write!(f, "{what} is {value}, over the limit of {limit}")
            }
            Stop::TooShort {
                noun,
                count,
                need,
                left,
                len,
            } => write!(
                f,
                "the manifest is too short for what it declares: {count} {noun} need at least \
                 {need} bytes, but at most {left} of its {len} bytes are left for them"
            ),
        }
    }
}

/// A byte range of the input (a recorded name).
type Span = (usize, usize);

/// Where decoding is: the place of an error.
#[derive(Debug, Clone, Copy, Default)]
struct Context {
    shard: Option<u32>,
    layer: Option<Span>,
    tensor: Option<Span>,
}

/// The state of one decode.
#[derive(Debug, Clone, Copy)]
struct State {
    /// Address and length of the input, to locate borrowed names.
    base: usize,
    len: u64,
    /// Least number of bytes everything declared so far occupies.
    reserved: u64,
    totals: [u64; 5],
    at: Context,
    stop: Option<(Stop, Context)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// The decode state of this thread while a scope is alive.
pub(crate) struct Scope {
    prev: Option<State>,
}

impl Scope {
    /// Starts a decode of `input` on this thread.
    pub(crate) fn enter(input: &[u8]) -> Scope {
        let st = State {
            base: input.as_ptr() as usize,
            len: input.len() as u64,
            reserved: 0,
            totals: [0; 5],
            at: Context::default(),
            stop: None,
        };
        Scope {
            prev: STATE.with_borrow_mut(|s| s.replace(st)),
        }
    }

    /// The typed error of the check that stopped decoding, if one did, with
    /// the shard, layer and tensor it was in.
    pub(crate) fn error(&self, input: &[u8]) -> Option<Error> {
        let (stop, at) = STATE.with_borrow(|s| s.as_ref().and_then(|s| s.stop))?;
        let mut e = match stop {
            Stop::Limit { what, value, limit } => {
                Error::new(ErrorKind::LimitExceeded { what, value, limit })
            }
            Stop::TooShort { .. } => Error::new(ErrorKind::ManifestDecode(stop.to_string())),
        };
        let name = |(at, n): Span| {
            input
                .get(at..at.saturating_add(n))
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        if let Some(s) = at.shard {
            e = e.with_shard(s);
        }
        if let Some(l) = at.layer.and_then(name) {
            e = e.with_layer(l);
        }
        if let Some(t) = at.tensor.and_then(name) {
            e = e.with_tensor(t);
        }
        Some(e)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        STATE.with_borrow_mut(|s| *s = prev);
    }
}

/// Admits `n` more elements of a collection that already has `already`:
/// checks the caps and the bytes, and counts them. Returns how many
/// elements may be preallocated.
fn admit(rule: &Rule, already: u64, n: u64) -> Result<usize, Stop> {
    let count = already.saturating_add(n);
    let cap = match rule.cap {
        Some((what, limit)) if count > limit => Err(Stop::Limit {
            what,
            value: count,
            limit,
        }),
        _ => Ok(()),
    };
    STATE.with_borrow_mut(|s| {
        let Some(s) = s else {
            return cap.map(|()| {
                usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(UNSCOPED_PREALLOC)
            });
        };
        let mut check = || {
            cap?;
            if let Some(t) = rule.total {
                let v = s.totals[t.index()].saturating_add(n);
                if v > t.limit() {
                    return Err(Stop::Limit {
                        what: t.name(),
                        value: v,
                        limit: t.limit(),
                    });
                }
                s.totals[t.index()] = v;
            }
            let left = s.len.saturating_sub(s.reserved);
            match n.checked_mul(rule.min_len) {
                Some(need) if need <= left => {
                    s.reserved += need;
                    // need <= len, which is a usize
                    Ok(usize::try_from(n).unwrap_or(usize::MAX))
                }
                need => Err(Stop::TooShort {
                    noun: rule.noun,
                    count: n,
                    need: need.unwrap_or(u64::MAX),
                    left,
                    len: s.len,
                }),
            }
        };
        let r = check();
        if let Err(stop) = r {
            s.stop.get_or_insert((stop, s.at));
        }
        r
    })
}

/// Sets the place of errors as element `i` of a `place` collection starts.
fn enter(place: Place, i: usize) {
    if place == Place::None {
        return;
    }
    STATE.with_borrow_mut(|s| {
        if let Some(s) = s {
            match place {
                Place::Shard => {
                    s.at.shard = u32::try_from(i).ok();
                    s.at.tensor = None;
                }
                Place::Layer => {
                    s.at.layer = None;
                    s.at.tensor = None;
                }
                Place::Tensor => s.at.tensor = None,
                Place::None => {}
            }
        }
    });
}

/// Clears the place of errors when a `place` collection ends.
fn leave(place: Place) {
    if place == Place::None {
        return;
    }
    STATE.with_borrow_mut(|s| {
        if let Some(s) = s {
            match place {
                Place::Shard => {
                    s.at.shard = None;
                    s.at.tensor = None;
                }
                Place::Layer => {
                    s.at.layer = None;
                    s.at.tensor = None;
                }
                Place::Tensor => s.at.tensor = None,
                Place::None => {}
            }
        }
    });
}

/// Which name a string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    /// Any other string.
    Plain,
    /// A layer path.
    Layer,
    /// A stored tensor key or a logical tensor name.
    Tensor,
}

/// Records where a name borrowed from the input is.
fn record(name: Name, s: &[u8]) {
    if name == Name::Plain {
        return;
    }
    STATE.with_borrow_mut(|st| {
        if let Some(st) = st {
            let at = (s.as_ptr() as usize).wrapping_sub(st.base);
            let inside = (at as u64)
                .checked_add(s.len() as u64)
                .is_some_and(|end| end <= st.len);
            if inside {
                match name {
                    Name::Layer => st.at.layer = Some((at, s.len())),
                    Name::Tensor => st.at.tensor = Some((at, s.len())),
                    Name::Plain => {}
                }
            }
        }
    });
}

fn custom<E: de::Error>(stop: Stop) -> E {
    E::custom(stop)
}

/// A sequence decoded under a [`Rule`].
struct SeqVisitor<T> {
    rule: &'static Rule,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of {}", self.rule.noun)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let rule = self.rule;
        let declared = seq.size_hint();
        let mut v = match declared {
            Some(n) => Vec::with_capacity(admit(rule, 0, n as u64).map_err(custom)?),
            None => Vec::new(),
        };
        loop {
            enter(rule.place, v.len());
            let Some(x) = seq.next_element()? else { break };
            if declared.is_none() {
                admit(rule, v.len() as u64, 1).map_err(custom)?;
            }
            v.push(x);
        }
        leave(rule.place);
        Ok(v)
    }
}

fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    rule: &'static Rule,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(SeqVisitor {
        rule,
        item: PhantomData,
    })
}

/// A string, copied once from the input.
#[derive(Clone, Copy)]
struct Str(Name);

impl<'de> Visitor<'de> for Str {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<String, E> {
        admit(&BYTES, 0, s.len() as u64).map_err(custom)?;
        record(self.0, s.as_bytes());
        Ok(s.to_owned())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
        admit(&BYTES, 0, s.len() as u64).map_err(custom)?;
        Ok(s.to_owned())
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<String, E> {
        admit(&BYTES, 0, s.len() as u64).map_err(custom)?;
        Ok(s)
    }
}

impl<'de> DeserializeSeed<'de> for Str {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

/// Extension data, copied once from the input.
struct Bytes;

impl<'de> Visitor<'de> for Bytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
        admit(&BYTES, 0, b.len() as u64).map_err(custom)?;
        Ok(b.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
        admit(&BYTES, 0, b.len() as u64).map_err(custom)?;
        Ok(b)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<u8>, A::Error> {
        SeqVisitor {
            rule: &BYTES,
            item: PhantomData,
        }
        .visit_seq(seq)
    }
}

/// An optional string.
struct OptStr;

impl<'de> Visitor<'de> for OptStr {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an optional string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        Str(Name::Plain).deserialize(d).map(Some)
    }
}

/// The metadata map.
struct Metadata;

impl<'de> Visitor<'de> for Metadata {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let declared = map.size_hint();
        if let Some(n) = declared {
            admit(&METADATA, 0, n as u64).map_err(custom)?;
        }
        let mut out = BTreeMap::new();
        let mut n = 0u64;
        while let Some(k) = map.next_key_seed(Str(Name::Plain))? {
            if declared.is_none() {
                admit(&METADATA, n, 1).map_err(custom)?;
            }
            n += 1;
            let v = map.next_value_seed(Str(Name::Plain))?;
            out.insert(k, v);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// the field functions named by `#[serde(deserialize_with = ...)]`

/// Any string field.
pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Str(Name::Plain).deserialize(d)
}

/// `Layer::path`: also recorded as the place of errors inside the layer.
pub(crate) fn layer_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Str(Name::Layer).deserialize(d)
}

/// `StoredTensor::key`, `LogicalTensor::name`: also recorded as the place
/// of errors inside the tensor.
pub(crate) fn tensor_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Str(Name::Tensor).deserialize(d)
}

/// An optional string field.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptStr)
}

/// `Extension::data`.
pub(crate) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_bytes(Bytes)
}

/// `Manifest::metadata`.
pub(crate) fn metadata<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(Metadata)
}

/// `Provenance::sources`.
pub(crate) fn sources<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &SOURCES)
}

/// `Manifest::shards`.
pub(crate) fn shards<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &SHARDS)
}

/// `Shard::tensors`.
pub(crate) fn stored_tensors<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &STORED_TENSORS)
}

/// Every `shape`.
pub(crate) fn shape<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    seq(d, &SHAPE)
}

/// `StoredTensor::chunks`.
pub(crate) fn chunks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    seq(d, &CHUNKS)
}

/// `Manifest::layers`.
pub(crate) fn layers<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &LAYERS)
}

/// `Layer::tensors`.
pub(crate) fn logical_tensors<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &LOGICAL_TENSORS)
}

/// `LogicalTensor::parts`.
pub(crate) fn parts<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &PARTS)
}

/// `WeightQuant::Family::params`.
pub(crate) fn params<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &PARAMS)
}

/// `Manifest::extensions`, `Layer::extensions`.
pub(crate) fn extensions<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    seq(d, &EXTENSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::*;
    use crate::format::{MAX_DECODE_ALLOC, MAX_MANIFEST_LEN};
    use std::mem::size_of;

    /// bincode `config::standard()` encoding of one value.
    fn enc<T: serde::Serialize>(v: &T) -> usize {
        bincode::serde::encode_to_vec(v, bincode::config::standard())
            .unwrap()
            .len()
    }

    #[test]
    fn min_len_is_the_smallest_encoding() {
        // Each value below is the smallest of its type: empty strings and
        // collections, variant 0 without fields, None, zero integers.
        let source = SourceFile {
            path: String::new(),
            size: 0,
            blake3: None,
        };
        let stored = StoredTensor {
            key: String::new(),
            dtype: crate::Dtype::Bool,
            shape: vec![],
            blake3: [0; 32],
            codec: Codec::Plain,
            chunks: vec![],
        };
        let shard = Shard {
            name: String::new(),
            offset: 0,
            stored_len: 0,
            header_len: 0,
            header_blake3: [0; 32],
            compression: Compression::None,
            tensors: vec![],
        };
        let part = Part {
            role: Role::Data,
            shard: 0,
            key: String::new(),
            dtype: crate::Dtype::Bool,
            shape: vec![],
            blake3: [0; 32],
        };
        let logical = LogicalTensor {
            name: String::new(),
            dtype: crate::Dtype::Bool,
            shape: vec![],
            encoding: Encoding::Plain,
            parts: vec![],
        };
        let layer = Layer {
            path: String::new(),
            quant: Quantization {
                weights: WeightQuant::Plain,
                activations: None,
            },
            tensors: vec![],
            extensions: vec![],
        };
        let ext = Extension {
            name: String::new(),
            critical: false,
            data: vec![],
        };
        let param = Param {
            key: String::new(),
            value: String::new(),
        };
        let cases: [(&Rule, usize); 12] = [
            (&METADATA, enc(&(String::new(), String::new()))),
            (&SOURCES, enc(&source)),
            (&SHARDS, enc(&shard)),
            (&STORED_TENSORS, enc(&stored)),
            (&SHAPE, enc(&0u64)),
            (&CHUNKS, enc(&0u32)),
            (&LAYERS, enc(&layer)),
            (&LOGICAL_TENSORS, enc(&logical)),
            (&PARTS, enc(&part)),
            (&EXTENSIONS, enc(&ext)),
            (&PARAMS, enc(&param)),
            (&BYTES, enc(&0u8)),
        ];
        for (rule, n) in cases {
            assert_eq!(rule.min_len, n as u64, "{}", rule.noun);
        }
        // and every field of those values is at its smallest encoding: one
        // byte, except the hashes
        assert_eq!(enc(&stored), 5 + 32);
        assert_eq!(enc(&shard), 6 + 32);
        assert_eq!(enc(&part), 5 + 32);
    }

    /// One kind of allocation a decode makes: `size` bytes per element,
    /// each taking at least `min_len` manifest bytes, at most `max` of them.
    struct Kind {
        what: &'static str,
        size: u64,
        min_len: u64,
        max: Option<u64>,
    }

    /// Upper bound on one std B-tree node of `String` pairs (capacity 11):
    /// parent pointer, index and length, 11 keys and values, 12 edges (an
    /// internal node; a leaf has no edges). A map of n >= 1 entries has at
    /// most n nodes.
    fn btree_node() -> u64 {
        (16 + 11 * 2 * size_of::<String>() + 12 * size_of::<usize>()) as u64
    }

    fn kinds() -> Vec<Kind> {
        let rank = MAX_RANK as u64;
        vec![
            Kind {
                what: "metadata entry (one B-tree node)",
                size: btree_node(),
                min_len: METADATA.min_len,
                max: Some(MAX_METADATA_ENTRIES as u64),
            },
            Kind {
                what: "SourceFile",
                size: size_of::<SourceFile>() as u64,
                min_len: SOURCES.min_len,
                max: Some(MAX_SOURCES as u64),
            },
            Kind {
                what: "Shard",
                size: size_of::<Shard>() as u64,
                min_len: SHARDS.min_len,
                max: Some(MAX_SHARDS),
            },
            Kind {
                what: "StoredTensor",
                size: size_of::<StoredTensor>() as u64,
                min_len: STORED_TENSORS.min_len,
                max: Some(Total::StoredTensors.limit()),
            },
            Kind {
                what: "Layer",
                size: size_of::<Layer>() as u64,
                min_len: LAYERS.min_len,
                max: Some(MAX_LAYERS),
            },
            Kind {
                what: "LogicalTensor",
                size: size_of::<LogicalTensor>() as u64,
                min_len: LOGICAL_TENSORS.min_len,
                max: Some(Total::LogicalTensors.limit()),
            },
            Kind {
                what: "Part",
                size: size_of::<Part>() as u64,
                min_len: PARTS.min_len,
                max: Some(Total::Parts.limit()),
            },
            Kind {
                what: "Extension",
                size: size_of::<Extension>() as u64,
                min_len: EXTENSIONS.min_len,
                max: Some(Total::Extensions.limit()),
            },
            Kind {
                what: "Param",
                size: size_of::<Param>() as u64,
                min_len: PARAMS.min_len,
                max: Some(Total::Params.limit()),
            },
            Kind {
                what: "shape dimension (u64)",
                size: size_of::<u64>() as u64,
                min_len: SHAPE.min_len,
                // rank <= 8 in each of the three kinds of shape
                max: Some(
                    rank * (Total::StoredTensors.limit()
                        + Total::LogicalTensors.limit()
                        + Total::Parts.limit()),
                ),
            },
            Kind {
                what: "chunk length (u32)",
                size: size_of::<u32>() as u64,
                min_len: CHUNKS.min_len,
                max: None,
            },
            Kind {
                what: "string or data byte",
                size: 1,
                min_len: BYTES.min_len,
                max: None,
            },
        ]
    }

    /// Slack for an error value built while a decoded value is still alive
    /// (trailing bytes, not canonical: a box and a short message).
    const ERROR_SLACK: u64 = 4096;

    /// The bound of spec/container.md §5.1 for a manifest of `len` bytes:
    /// the most that the elements of all kinds can take when their counts
    /// are within the caps and their smallest encodings within `len`. This
    /// is a fractional knapsack: the kinds with the most bytes allocated
    /// per manifest byte are filled first; the fractional optimum (rounded
    /// up) bounds every integer solution.
    fn bound(len: u64, print: bool) -> u64 {
        let mut ks = kinds();
        ks.sort_by(|a, b| (b.size * a.min_len).cmp(&(a.size * b.min_len)));
        let mut left = len;
        let mut total = ERROR_SLACK;
        for k in &ks {
            let take = k.max.map_or(left, |m| left.min(m * k.min_len));
            let bytes = (take * k.size).div_ceil(k.min_len);
            if print {
                println!(
                    "| {} | {} | {} | {} | {} | {} |",
                    k.what,
                    k.size,
                    k.min_len,
                    k.max.map_or("—".to_string(), |m| m.to_string()),
                    take / k.min_len,
                    bytes
                );
            }
            left -= take;
            total += bytes;
        }
        total
    }

    #[test]
    fn the_stated_bound_holds_for_the_types_as_they_are() {
        let b = bound(MAX_MANIFEST_LEN, true);
        println!("bound {b} bytes ({:.1} MiB)", b as f64 / (1 << 20) as f64);
        assert!(
            b <= MAX_DECODE_ALLOC,
            "decoding may allocate {b} bytes, more than MAX_DECODE_ALLOC and spec/container.md \
             §5.1 state ({MAX_DECODE_ALLOC}): update both"
        );
        // the spec states the same number
        let spec = include_str!("../../spec/container.md");
        let stated = MAX_DECODE_ALLOC
            .to_string()
            .as_bytes()
            .rchunks(3)
            .rev()
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            spec.contains(&stated),
            "spec/container.md does not state {stated}"
        );
    }

    #[test]
    fn the_bound_for_a_smaller_manifest_is_as_stated() {
        // spec/container.md §5.1: at most 30.4 bytes per manifest byte
        // (a 5-byte empty layer is 152 bytes) plus 2.6 MiB (metadata)
        let mut len = 1u64;
        while len <= MAX_MANIFEST_LEN {
            for l in [len - 1, len, len + len / 3] {
                let b = bound(l, false);
                assert!(b * 10 <= 304 * l + (26 << 20), "{l}-byte manifest: {b}");
            }
            len *= 2;
        }
    }
}
