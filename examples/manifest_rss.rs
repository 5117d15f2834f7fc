//! Peak-memory probe for manifest decoding (spec/container.md §5).
//!
//! `manifest_rss write CASE OUT.ckpk` writes a container without shards
//! whose manifest is one of the CASEs below; `manifest_rss open FILE` opens
//! it and prints the outcome. Measure the second step:
//!
//! ```text
//! cargo build --release --example manifest_rss
//! target/release/examples/manifest_rss write empty-layers /tmp/empty.ckpk
//! /usr/bin/time -v target/release/examples/manifest_rss open /tmp/empty.ckpk
//! ```
//!
//! CASEs (every layer is the 5-byte empty layer `00 00 00 00 00`):
//! - `empty-layers`: 13,000,000 layers, a 65 MB manifest;
//! - `layers-over-cap`: 1,048,577 layers (one over the cap), 5 MB;
//! - `layers-at-cap`: 1,048,576 layers, 5 MB (decodes; validation then
//!   refuses the duplicate layer paths);
//! - `prefix-only`: the length prefix of 1,048,576 layers and no layers.
//!
//! Opening reads the whole manifest into memory first, so the peak includes
//! the manifest bytes themselves. Peak RSS measured (release build): before
//! the decode-time limits, `empty-layers` 1,367 MB and `layers-over-cap`
//! 160 MB; with them 66 MB (the manifest bytes) and 7 MB.

use std::io::Write;

use ckptkit::format::FixedHeader;
use ckptkit::format::HEADER_LEN;
use ckptkit::Container;
use ckptkit::Version;

fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v <= u16::MAX as u64 {
        out.push(251);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(252);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A manifest declaring `declared` layers and holding `present` empty ones.
fn manifest(declared: u64, present: u64) -> Vec<u8> {
    // version 1.0, no metadata, empty provenance, no shards
    let mut m = vec![1, 0, 0, 0, 0, 0, 0];
    varint(&mut m, declared);
    m.resize(m.len() + 5 * present as usize, 0);
    if present == declared {
        m.push(0); // no extensions
    }
    m
}

fn write(case: &str, out: &str) -> Result<(), Box<dyn std::error::Error>> {
    let m = match case {
        "empty-layers" => manifest(13_000_000, 13_000_000),
        "layers-over-cap" => manifest(1_048_577, 1_048_577),
        "layers-at-cap" => manifest(1_048_576, 1_048_576),
        "prefix-only" => manifest(1_048_576, 0),
        _ => return Err(format!("unknown case `{case}`").into()),
    };
    let mut h = FixedHeader {
        version: Version { major: 1, minor: 0 },
        manifest_offset: HEADER_LEN,
        manifest_len: m.len() as u64,
        digest: [0; 32],
    };
    h.digest = FixedHeader::compute_digest(&h.prefix(), &m);
    let mut f = std::fs::File::create(out)?;
    f.write_all(&h.encode())?;
    f.write_all(&m)?;
    println!("{out}: manifest of {} bytes", m.len());
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["write", case, out] => write(case, out),
        ["open", path] => {
            match Container::open(std::path::Path::new(path)) {
                Ok(c) => println!("opened: {} layers", c.manifest().layers.len()),
                Err(e) => println!("refused: {e}"),
            }
            Ok(())
        }
        _ => Err("usage: manifest_rss write CASE OUT.ckpk | manifest_rss open FILE".into()),
    }
}
