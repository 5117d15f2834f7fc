//! GGUF, llama.cpp's file format (v2 and v3, little-endian): pure functions
//! over bytes, no I/O. spec/gguf.md is the normative description of what
//! ckptkit reads and writes.

pub(crate) mod read;
pub(crate) mod types;
pub(crate) mod write;

pub(crate) use types::GgmlType;

#[cfg(test)]
mod tests;
