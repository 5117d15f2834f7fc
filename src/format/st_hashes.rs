//! Per-tensor blake3 hashes carried in a safetensors file's `__metadata__`
//! (spec/container.md §9, "ckptkit metadata in safetensors files").
//!
//! A safetensors file has no place for checksums, so ckptkit's writer records
//! them as one metadata entry, [`HASHES_KEY`], whose value is a JSON object
//! mapping every tensor key to the lowercase hex blake3 of its raw bytes:
//! `{"a.weight":"9f…","a.bias":"03…"}` (keys sorted, no spaces).
//!
//! The header is written before the data, when the hashes are not yet known.
//! Every hash is exactly 64 hex digits, so the writer first renders the entry
//! with 64 zeros per tensor ([`render`] with `None`), streams the data, then
//! renders it again with the real hashes: the header has the same length, and
//! it is overwritten in place before the file is committed.

use std::collections::BTreeMap;

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Hash;

/// The `__metadata__` key that holds the hashes.
pub const HASHES_KEY: &str = "ckptkit.blake3";

/// Renders the entry for `keys`, with their hashes or, for `None`, the
/// same-length placeholder.
pub fn render<'a>(keys: impl IntoIterator<Item = (&'a str, Option<&'a Hash>)>) -> String {
    let sorted: BTreeMap<&str, Option<&Hash>> = keys.into_iter().collect();
    let mut obj = serde_json::Map::new();
    for (k, h) in sorted {
        let hex = match h {
            Some(h) => to_hex(h),
            None => "0".repeat(64),
        };
        obj.insert(k.to_string(), serde_json::Value::String(hex));
    }
    serde_json::Value::Object(obj).to_string()
}

/// Parses the entry. Every value must be 64 lowercase hex digits, and every
/// key must be one of `tensors` (the file's own keys). Tensors the entry
/// does not name are simply not checked by [`crate::SafetensorsFile::verify`]
/// (it reports how many were).
pub fn parse<'a>(
    value: &str,
    tensors: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, Hash>> {
    let bad = |msg: String| Error::new(ErrorKind::Json(format!("`{HASHES_KEY}`: {msg}")));
    let obj: BTreeMap<String, String> =
        serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
    let known: std::collections::HashSet<&str> = tensors.into_iter().collect();
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        crate::format::lookups::add(1);
        if !known.contains(k.as_str()) {
            return Err(bad(format!(
                "names tensor `{k}`, which the file does not have"
            )));
        }
        let h = from_hex(&v).ok_or_else(|| {
            bad(format!(
                "the hash of `{k}` is not 64 lowercase hex digits: {v:?}"
            ))
        })?;
        out.insert(k, h);
    }
    Ok(out)
}

/// Lowercase hex of a hash.
pub fn to_hex(h: &Hash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in h {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Hash> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut h = [0u8; 32];
    for (i, out) in h.iter_mut().enumerate() {
        *out = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_and_final_entry_have_the_same_length() {
        let h = [0xabu8; 32];
        let a = render([("x.weight", None), ("x.bias", None)]);
        let b = render([("x.weight", Some(&h)), ("x.bias", Some(&h))]);
        assert_eq!(a.len(), b.len());
        assert!(b.starts_with("{\"x.bias\":\"abab"));
    }

    #[test]
    fn round_trip() {
        let h1 = *blake3::hash(b"one").as_bytes();
        let h2 = *blake3::hash(b"two").as_bytes();
        let s = render([("a", Some(&h1)), ("b", Some(&h2))]);
        let m = parse(&s, ["a", "b", "c"]).unwrap();
        assert_eq!(m["a"], h1);
        assert_eq!(m["b"], h2);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn rejects_unknown_key_bad_hex_and_wrong_length() {
        let h = to_hex(&[1; 32]);
        let e = parse(&format!("{{\"zz\":\"{h}\"}}"), ["a"]).unwrap_err();
        assert!(e.to_string().contains("`zz`"), "{e}");
        let upper = h.to_uppercase().replace('0', "A");
        assert!(parse(&format!("{{\"a\":\"{upper}\"}}"), ["a"]).is_err());
        assert!(parse(&format!("{{\"a\":\"{}\"}}", &h[..62]), ["a"]).is_err());
        assert!(parse("[1,2]", ["a"]).is_err());
    }
}
