//! Parsing a GGUF header (spec/gguf.md §2): magic, version, key-value
//! metadata, tensor infos, alignment and data start, every rule checked
//! before anything is allocated from a count the file declares.
//!
//! The parser works on a prefix of the file. When the header runs past the
//! prefix but not past the file, it answers [`Parsed::NeedMore`] with the
//! length it needs, and the caller reads a longer prefix (up to
//! [`MAX_HEADER_LEN`]).

use crate::error::{Error, ErrorKind, Result};
use crate::format::gguf::GgmlType;

/// `GGUF` as a little-endian u32 at offset 0.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of the data section when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// The key that sets the alignment (a u32, a power of two).
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";
/// Largest header (metadata and tensor infos) ckptkit reads: an LLM's
/// tokenizer (a few hundred thousand strings) takes a few tens of MiB.
pub(crate) const MAX_HEADER_LEN: u64 = 256 << 20;
/// Most metadata values in one file, array elements at every depth
/// included (each costs memory once parsed).
pub(crate) const MAX_VALUES: u64 = 4 << 20;
/// Deepest nesting of arrays in a value (the spec allows nesting; ggml
/// refuses any).
pub(crate) const MAX_DEPTH: u32 = 8;
/// Most tensors in one file.
pub(crate) const MAX_TENSORS: u64 = 1 << 20;
/// Longest key or tensor name (bytes).
pub(crate) const MAX_NAME_LEN: u64 = 4096;
/// Most dimensions of a tensor.
pub(crate) const MAX_DIMS: u32 = 8;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Type 8 (u64 length, UTF-8 bytes).
    Str(String),
    /// Type 9: element type id and the elements.
    Array(u32, Vec<Value>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

/// The name of a value type id (gguf-py's `GGUFValueType`, lower case).
pub(crate) fn value_type_name(id: u32) -> &'static str {
    match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "unknown",
    }
}

impl Value {
    /// The value's type id.
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

/// One key-value pair of the metadata.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kv {
    /// The key.
    pub key: String,
    /// Offset of the pair in the file.
    pub offset: u64,
    /// The value.
    pub value: Value,
}

/// One tensor info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its type.
    pub ty: GgmlType,
    /// Dimensions as stored: `ne[0]` is the contiguous one.
    pub ne: Vec<u64>,
    /// Offset of its data, relative to the data section.
    pub offset: u64,
    /// Its byte length.
    pub n_bytes: u64,
    /// Offset of the tensor info in the file.
    pub info_offset: u64,
}

impl TensorInfo {
    /// The shape in row-major (numpy, torch) order: `ne` reversed.
    pub(crate) fn shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }

    /// Elements per row (`ne[0]`; 1 for a 0-D tensor).
    pub(crate) fn row_len(&self) -> u64 {
        self.ne.first().copied().unwrap_or(1)
    }

    /// Number of rows (every dimension but `ne[0]` multiplied; the product
    /// was checked when the header was parsed).
    pub(crate) fn rows(&self) -> u64 {
        self.ne.iter().skip(1).product()
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The metadata, in file order.
    pub kvs: Vec<Kv>,
    /// The tensor infos, in file order.
    pub tensors: Vec<TensorInfo>,
    /// The alignment of the data section and of every tensor.
    pub alignment: u64,
    /// Where the tensor infos end.
    pub infos_end: u64,
    /// Where the data section starts (`infos_end` rounded up to the
    /// alignment).
    pub data_start: u64,
}

impl Header {
    /// The value of a key, if present.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|k| k.key == key).map(|k| &k.value)
    }
}

/// What parsing a prefix gave.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// The header, complete and checked against the file length.
    Done(Box<Header>),
    /// The header goes on past the prefix: read at least this many bytes
    /// of the file and parse again.
    NeedMore(u64),
}

/// Why the cursor stopped.
enum Stop {
    NeedMore(u64),
    Err(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Err(e)
    }
}

type R<T> = std::result::Result<T, Stop>;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: u64,
    file_len: u64,
    values: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| Error::overflow(what))?;
        if end > self.file_len {
            return Err(Error::new(ErrorKind::Truncated {
                what,
                needed: end,
                available: self.file_len,
            })
            .with_offset(self.pos)
            .into());
        }
        if end > MAX_HEADER_LEN {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "GGUF header length",
                value: end,
                limit: MAX_HEADER_LEN,
            })
            .with_offset(self.pos)
            .into());
        }
        let (s, e) = (self.pos as usize, end as usize);
        match self.buf.get(s..e) {
            Some(b) => {
                self.pos = end;
                Ok(b)
            }
            None => Err(Stop::NeedMore(end)),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> R<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> R<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> R<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Bytes of the file after the cursor.
    fn left(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }

    /// A GGUF string (u64 length, then the bytes), UTF-8, at most `cap`
    /// bytes.
    fn string(&mut self, what: &'static str, cap: u64) -> R<String> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > cap {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what,
                value: n,
                limit: cap,
            })
            .with_offset(at)
            .into());
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            Stop::Err(Error::malformed(format!("{what} at byte {at} is not UTF-8")).with_offset(at))
        })
    }

    fn count_value(&mut self, at: u64) -> R<()> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "GGUF metadata values (array elements included)",
                value: self.values,
                limit: MAX_VALUES,
            })
            .with_offset(at)
            .into());
        }
        Ok(())
    }

    /// One value of type `ty` (`key` for messages).
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> R<Value> {
        let at = self.pos;
        self.count_value(at)?;
        Ok(match ty {
            0 => Value::U8(self.array::<1>("GGUF u8 value")?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array("GGUF i8 value")?)),
            2 => Value::U16(u16::from_le_bytes(self.array("GGUF u16 value")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("GGUF i16 value")?)),
            4 => Value::U32(self.u32("GGUF u32 value")?),
            5 => Value::I32(i32::from_le_bytes(self.array("GGUF i32 value")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("GGUF f32 value")?)),
            7 => match self.array::<1>("GGUF bool value")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::malformed(format!(
                        "key `{key}`: a bool must be the byte 0 or 1, found {b}"
                    ))
                    .with_offset(at)
                    .into())
                }
            },
            8 => Value::Str(self.string("GGUF string value", MAX_HEADER_LEN)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(Error::new(ErrorKind::LimitExceeded {
                        what: "GGUF array nesting depth",
                        value: u64::from(depth) + 1,
                        limit: u64::from(MAX_DEPTH),
                    })
                    .with_offset(at)
                    .into());
                }
                let elem = self.u32("GGUF array element type")?;
                let min = min_value_len(elem).ok_or_else(|| unknown_value_type(key, elem, at))?;
                let n = self.u64("GGUF array length")?;
                // every element takes at least `min` bytes of the file
                if n > self.left() / min {
                    return Err(Error::new(ErrorKind::Truncated {
                        what: "GGUF array elements",
                        needed: n.saturating_mul(min).saturating_add(self.pos),
                        available: self.file_len,
                    })
                    .with_offset(at)
                    .into());
                }
                if n > MAX_VALUES {
                    return Err(Error::new(ErrorKind::LimitExceeded {
                        what: "GGUF array length",
                        value: n,
                        limit: MAX_VALUES,
                    })
                    .with_offset(at)
                    .into());
                }
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
            10 => Value::U64(self.u64("GGUF u64 value")?),
            11 => Value::I64(i64::from_le_bytes(self.array("GGUF i64 value")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("GGUF f64 value")?)),
            _ => return Err(unknown_value_type(key, ty, at).into()),
        })
    }
}

/// The fewest bytes a value of type `ty` takes, or `None` for an unknown
/// type.
fn min_value_len(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn unknown_value_type(key: &str, ty: u32, at: u64) -> Error {
    Error::malformed(format!(
        "key `{key}`: unknown GGUF value type {ty} (0-12 are defined)"
    ))
    .with_offset(at)
}

/// Parses the header of a GGUF file of `file_len` bytes from its first
/// `buf.len()` bytes. Checks every rule of spec/gguf.md §2 that the header
/// alone decides, and that every tensor's data lies inside the file.
pub(crate) fn parse(buf: &[u8], file_len: u64) -> Result<Parsed> {
    match parse_inner(buf, file_len) {
        Ok(h) => Ok(Parsed::Done(Box::new(h))),
        Err(Stop::NeedMore(n)) => Ok(Parsed::NeedMore(n)),
        Err(Stop::Err(e)) => Err(e),
    }
}

fn parse_inner(buf: &[u8], file_len: u64) -> R<Header> {
    let mut c = Cursor {
        buf,
        pos: 0,
        file_len,
        values: 0,
    };
    let magic: [u8; 4] = c.array("GGUF magic")?;
    if magic != MAGIC {
        return Err(Error::malformed(format!(
            "not a GGUF file: it starts with {magic:02x?}, not `GGUF`"
        ))
        .with_offset(0)
        .into());
    }
    let version = c.u32("GGUF version")?;
    match version {
        2 | 3 => {}
        v if v != 0 && v & 0xFFFF == 0 => {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "a big-endian GGUF file (version reads {v:#x}); ckptkit reads little-endian \
                 GGUF v2 and v3"
            )))
            .with_offset(4)
            .into())
        }
        v => {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "GGUF version {v}; ckptkit reads versions 2 and 3 (as gguf-py and ggml do)"
            )))
            .with_offset(4)
            .into())
        }
    }
    let n_tensors = c.u64("GGUF tensor count")?;
    let n_kv = c.u64("GGUF metadata count")?;
    // each pair takes at least 13 bytes, each tensor info 24
    if n_kv > c.left() / 13 {
        return Err(Error::new(ErrorKind::Truncated {
            what: "GGUF metadata (the count declared at byte 16)",
            needed: n_kv.saturating_mul(13).saturating_add(c.pos),
            available: file_len,
        })
        .with_offset(16)
        .into());
    }
    if n_tensors > MAX_TENSORS {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what: "GGUF tensor count",
            value: n_tensors,
            limit: MAX_TENSORS,
        })
        .with_offset(8)
        .into());
    }
    if n_tensors > c.left() / 24 {
        return Err(Error::new(ErrorKind::Truncated {
            what: "GGUF tensor infos (the count declared at byte 8)",
            needed: n_tensors.saturating_mul(24).saturating_add(c.pos),
            available: file_len,
        })
        .with_offset(8)
        .into());
    }
    let mut kvs: Vec<Kv> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let at = c.pos;
        let key = c.string("GGUF key", MAX_NAME_LEN)?;
        if !keys.insert(key.clone()) {
            return Err(Error::malformed(format!("key `{key}` appears twice"))
                .with_offset(at)
                .into());
        }
        let ty = c.u32("GGUF value type")?;
        let value = c.value(ty, &key, 0)?;
        kvs.push(Kv {
            key,
            offset: at,
            value,
        });
    }
    let alignment = match kvs.iter().find(|k| k.key == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(Kv {
            value: Value::U32(a),
            offset,
            ..
        }) => {
            if *a == 0 || !a.is_power_of_two() {
                return Err(Error::malformed(format!(
                    "`{ALIGNMENT_KEY}` is {a}, not a power of two"
                ))
                .with_offset(*offset)
                .into());
            }
            u64::from(*a)
        }
        Some(k) => {
            return Err(Error::malformed(format!(
                "`{ALIGNMENT_KEY}` is a {}, it must be a u32 (as ggml and gguf-py require)",
                value_type_name(k.value.type_id())
            ))
            .with_offset(k.offset)
            .into())
        }
    };
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut next = 0u64;
    for _ in 0..n_tensors {
        let at = c.pos;
        let name = c.string("GGUF tensor name", MAX_NAME_LEN)?;
        let bad = |msg: String| {
            Stop::Err(
                Error::malformed(msg)
                    .with_tensor(name.clone())
                    .with_offset(at),
            )
        };
        if !names.insert(name.clone()) {
            return Err(bad(format!("tensor `{name}` appears twice")));
        }
        let n_dims = c.u32("GGUF tensor rank")?;
        if n_dims > MAX_DIMS {
            return Err(Stop::Err(
                Error::new(ErrorKind::LimitExceeded {
                    what: "GGUF tensor rank",
                    value: u64::from(n_dims),
                    limit: u64::from(MAX_DIMS),
                })
                .with_tensor(name.clone())
                .with_offset(at),
            ));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        let mut count = 1u64;
        // the product of the non-zero dimensions: what any multiplication
        // order meets on the way (safetensors multiplies the reversed
        // shape), so a zero dimension does not hide an overflow
        let mut nonzero = 1u64;
        for _ in 0..n_dims {
            let d = c.u64("GGUF tensor dimension")?;
            if d > i64::MAX as u64 {
                return Err(bad(format!(
                    "tensor `{name}`: dimension {d} is negative as ggml reads it (int64)"
                )));
            }
            nonzero = nonzero.checked_mul(d.max(1)).ok_or_else(|| {
                Stop::Err(
                    Error::overflow("GGUF tensor element count")
                        .with_tensor(name.clone())
                        .with_offset(at),
                )
            })?;
            count *= d; // cannot overflow: count is 0 or nonzero
            ne.push(d);
        }
        let type_at = c.pos;
        let id = c.u32("GGUF tensor type")?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            Stop::Err(
                Error::malformed(format!("tensor `{name}`: unknown ggml type {id}"))
                    .with_tensor(name.clone())
                    .with_offset(type_at),
            )
        })?;
        let offset = c.u64("GGUF tensor offset")?;
        let row = ne.first().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block) {
            return Err(bad(format!(
                "tensor `{name}`: rows of {row} elements are not whole {} blocks of {}",
                ty.name, ty.block
            )));
        }
        let row_bytes = ty.row_bytes(row).ok_or_else(|| {
            Stop::Err(
                Error::overflow("GGUF tensor row length")
                    .with_tensor(name.clone())
                    .with_offset(at),
            )
        })?;
        let rows = count.checked_div(row).unwrap_or(0);
        let n_bytes = rows.checked_mul(row_bytes).ok_or_else(|| {
            Stop::Err(
                Error::overflow("GGUF tensor byte length")
                    .with_tensor(name.clone())
                    .with_offset(at),
            )
        })?;
        if offset != next {
            return Err(bad(format!(
                "tensor `{name}` has offset {offset}, expected {next}: each tensor's data follows \
                 the previous one's, padded to the alignment {alignment} (as ggml's loader requires)"
            )));
        }
        next = crate::format::align_up(
            offset.checked_add(n_bytes).ok_or_else(|| {
                Stop::Err(Error::overflow("GGUF tensor end").with_tensor(name.clone()))
            })?,
            alignment,
        )
        .ok_or_else(|| Stop::Err(Error::overflow("GGUF tensor end").with_tensor(name.clone())))?;
        tensors.push(TensorInfo {
            name,
            ty,
            ne,
            offset,
            n_bytes,
            info_offset: at,
        });
    }
    let infos_end = c.pos;
    let data_start = crate::format::align_up(infos_end, alignment)
        .ok_or_else(|| Stop::Err(Error::overflow("GGUF data start")))?;
    // the data of every tensor lies inside the file
    for t in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes))
            .ok_or_else(|| {
                Stop::Err(Error::overflow("GGUF tensor end").with_tensor(t.name.clone()))
            })?;
        if end > file_len {
            return Err(Stop::Err(
                Error::new(ErrorKind::Truncated {
                    what: "GGUF tensor data",
                    needed: end,
                    available: file_len,
                })
                .with_tensor(t.name.clone())
                .with_offset(data_start + t.offset),
            ));
        }
    }
    Ok(Header {
        version,
        kvs,
        tensors,
        alignment,
        infos_end,
        data_start,
    })
}
