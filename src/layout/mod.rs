//! Layouts: how a logical tensor is made of stored tensors, one module per
//! family.

pub mod int8;
pub mod quanto;

use crate::error::{Error, Result};
use crate::format::manifest::{Layer, Role, WeightQuant};

/// Checks that a layer record is one the conversions accept: its layout
/// is known and its parameters valid (a quanto qtype with the group size
/// quanto's rule gives, a readable int8 descriptor), and the stored parts
/// have the shapes and dtypes that layout implies. `verify` runs it on
/// every layer of a container, so that a container `verify` accepts is one
/// every conversion can read.
pub fn check_layer(l: &Layer) -> Result<()> {
    let at = |e: Error| e.with_layer(l.path.clone());
    match &l.quant.weights {
        WeightQuant::Plain => Ok(()),
        WeightQuant::Quanto { qtype, group_size } => {
            let q = quanto::QType::from_name(qtype)
                .ok_or_else(|| at(Error::layout(format!("unknown quanto qtype `{qtype}`"))))?;
            let w = quantized_weight(l).map_err(at)?;
            let s = quanto::math::quanto_shapes(q, &w.shape, *group_size)
                .map_err(|e| at(Error::layout(format!("{qtype} weight {:?}: {e}", w.shape))))?;
            if q.is_packed()
                && *group_size
                    != quanto::math::group_size(w.shape[0], crate::dtype::numel(&w.shape)?)
            {
                let show =
                    |g: Option<u64>| g.map_or("none (per row)".to_string(), |g| g.to_string());
                return Err(at(Error::layout(format!(
                    "{qtype} weight {:?} records group size {}; quanto uses {} for this shape",
                    w.shape,
                    show(*group_size),
                    show(quanto::math::group_size(
                        w.shape[0],
                        crate::dtype::numel(&w.shape)?
                    ))
                ))));
            }
            expect_part(l, w, Role::Data, &s.data)?;
            expect_part(l, w, Role::Scale, &s.scale)?;
            if let Some(sh) = &s.shift {
                expect_part(l, w, Role::Shift, sh)?;
            }
            Ok(())
        }
        WeightQuant::Int8 { layout, descriptor } => {
            let d = int8::descriptor_of(layout, descriptor).map_err(at)?;
            let w = quantized_weight(l).map_err(at)?;
            if w.shape.len() != 2 {
                return Err(at(Error::layout(format!(
                    "int8 layouts describe 2-D weights; this one is {:?}",
                    w.shape
                ))));
            }
            let (p, sc, z) = d.shapes(w.shape[0], w.shape[1]).map_err(at)?;
            expect_part(l, w, Role::Data, &p)?;
            expect_part(l, w, Role::Scale, &sc)?;
            if d.zero_point.is_some() {
                expect_part(l, w, Role::ZeroPoint, &z)?;
            }
            Ok(())
        }
    }
}

fn quantized_weight(l: &Layer) -> Result<&crate::format::manifest::LogicalTensor> {
    l.tensors
        .iter()
        .find(|t| t.encoding == crate::format::manifest::Encoding::Quantized)
        .ok_or_else(|| Error::layout("a quantized layer record without a quantized tensor"))
}

fn expect_part(
    l: &Layer,
    w: &crate::format::manifest::LogicalTensor,
    role: Role,
    shape: &[u64],
) -> Result<()> {
    let p = w.parts.iter().find(|p| p.role == role).ok_or_else(|| {
        Error::layout(format!("`{}` has no {role:?} part", w.name)).with_layer(l.path.clone())
    })?;
    if p.shape != shape {
        return Err(Error::layout(format!(
            "part `{}` ({role:?}) has shape {:?}; the layout implies {:?}",
            p.key, p.shape, shape
        ))
        .with_layer(l.path.clone())
        .with_tensor(p.key.clone()));
    }
    Ok(())
}
