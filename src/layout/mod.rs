//! Layouts: how a logical tensor is made of stored tensors, one module per
//! family.

pub mod codes;
pub mod family;
pub mod int8;
pub mod plain;
pub mod quanto;
#[cfg(test)]
mod toy;

pub use family::check_layer;
