//! Layouts: how a logical tensor is made of stored tensors, one module per
//! family.

pub(crate) mod blocks;
pub mod codes;
pub mod comfy;
pub mod ctfp8;
pub mod family;
pub mod fp8block;
pub(crate) mod gguf;
pub mod int8;
pub mod plain;
pub mod quanto;
pub mod registry;
#[cfg(test)]
mod toy;

pub use registry::check_layer;
