//! Layouts: how a logical tensor is made of stored tensors, one module per
//! family.

pub mod int8;
pub mod quanto;
