//! # ckptkit
//!
//! A spec-defined container for machine-learning checkpoints and exact
//! migrations between plain float, optimum-quanto and int8 layouts.
//!
//! * The `.ckpk` **container** (spec/container.md) wraps safetensors shards
//!   with a manifest that records, per layer, how it is quantized and which
//!   stored tensors make it up, with blake3 hashes of every byte and
//!   optional zstd compression with a float filter.
//! * **Sources** read safetensors files, Hugging Face sharded directories
//!   and containers through one [`TensorSource`] abstraction, validating
//!   every header before anything is read.
//! * **Writers** stream tensors to disk with memory bounded by the largest
//!   tensor and commit atomically.
//!
//! ## Example: pack tensors into a container, read them back, verify
//!
//! ```
//! # fn main() -> ckptkit::Result<()> {
//! use ckptkit::{Container, ContainerOptions, ContainerWriter, Dtype};
//!
//! let dir = std::env::temp_dir().join(format!("ckptkit-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("model.ckpk");
//! # let _ = std::fs::remove_file(&path);
//!
//! let mut w = ContainerWriter::create(&path, ContainerOptions::default())?;
//! let plan = [
//!     ("proj.weight".to_string(), Dtype::BF16, vec![2, 3]),
//!     ("proj.bias".to_string(), Dtype::BF16, vec![2]),
//! ];
//! w.begin_shard("model.safetensors", &plan, &Default::default())?;
//! w.write_tensor("proj.weight", &[0x80, 0x3f].repeat(6))?; // six 1.0s
//! w.write_tensor("proj.bias", &[0u8; 4])?;
//! w.finish_shard()?;
//! w.finish(None, Default::default(), Vec::new())?;
//!
//! let c = Container::open(&path)?;
//! assert_eq!(c.layers()[0].path, "proj");
//! let wt = c.read_tensor(0, "proj.weight")?; // zero-copy window
//! assert_eq!(&wt[..2], &[0x80, 0x3f]);
//! c.verify()?; // every blake3 checked
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

/// Builder methods of the option types (`#[non_exhaustive]`, so callers
/// set options through these): `name: T` takes a `T`, `into name: T` an
/// `impl Into<T>`; each method sets the field of its name and returns the
/// options.
macro_rules! setters {
    ($ty:ty { $( $(#[$doc:meta])* $(@$into:ident)? $name:ident : $t:ty ),* $(,)? }) => {
        impl $ty {
            $( setters!(@one $(#[$doc])* $($into)? $name : $t); )*
        }
    };
    (@one $(#[$doc:meta])* into $name:ident : $t:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, v: impl Into<$t>) -> Self {
            self.$name = v.into();
            self
        }
    };
    (@one $(#[$doc:meta])* $name:ident : $t:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = v;
            self
        }
    };
}

#[cfg(feature = "cli")]
pub mod cli;
mod control;
mod dtype;
mod error;
mod float;
pub mod format;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod io;
mod layout;
pub mod migrate;

pub use crate::control::{Cancel, Control, Progress, ProgressFn};
pub use crate::dtype::{byte_len, numel, Dtype};
pub use crate::error::{Error, ErrorKind, Location, Result};
pub use crate::format::manifest::{
    Codec, Compression, Encoding, Extension, Hash, Layer, LogicalTensor, Manifest, Param, Part,
    Provenance, Quantization, Role, Shard, SourceFile, StoredTensor, Version, WeightQuant,
};
pub use crate::io::atomic::{recover, Recovered};
pub use crate::io::container::{Container, VerifyReport};
pub use crate::io::open::{open_source, InputKind};
#[cfg(feature = "remote")]
pub use crate::io::remote::{Mount, Upload, UploadReport};
pub use crate::io::safetensors_file::SafetensorsFile;
pub use crate::io::sharded::ShardedDir;
pub use crate::io::source::{SourceTensor, TensorSource};
pub use crate::io::writer::{ContainerOptions, ContainerWriter, SafetensorsWriter, ZstdOptions};
pub use crate::io::TensorBytes;
