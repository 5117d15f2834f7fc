//! The family-neutral code form: integer codes with their scale, through
//! which families exchange integers without touching them (a lossless
//! re-layout between any two families that can hold the same codes), and
//! the arithmetic of converting a scale between value forms and dtypes.

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Which elements share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output row.
    Channel,
    /// One scale per group of N consecutive elements of a row.
    Group(u64),
    /// One scale per tile of rows x columns (block FP8; the edge tiles of
    /// a ragged weight are partial). No int8 descriptor takes it.
    Block([u64; 2]),
}

/// What the stored scale number is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleValue {
    /// The scale itself: `w = q · s`.
    Scale,
    /// An absmax to be divided by a constant: `w = q · A · (1/c)`.
    AbsmaxOver(f64),
}

/// How a layout stores integer codes, as far as a re-layout needs to know
/// (no data): the planner compares two forms to decide whether the codes
/// carry over and whether the data may make it lossy.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeForm {
    /// The layout's name in passes (`quanto qint8`, `int8:ct`).
    pub name: String,
    /// What the stored scale number is.
    pub value: ScaleValue,
    /// Which elements share one scale.
    pub granularity: Granularity,
    /// The integers the layout stores.
    pub range: [i32; 2],
    /// The scale's stored dtype.
    pub scale_dtype: Dtype,
    /// Whether codes are offset by a zero point (never carried over).
    pub zero_point: bool,
    /// What one code is: `I8` for integers, `F8E4M3` / `F8E5M2` for FP8
    /// codes (carried as their bit patterns); codes carry over only to the
    /// same kind.
    pub code: Dtype,
}

impl CodeForm {
    /// Whether codes of this form carry over to `to` unchanged: no zero
    /// point on either side, and the same scale granularity.
    pub fn carries_to(&self, to: &CodeForm) -> bool {
        !self.zero_point
            && !to.zero_point
            && self.granularity == to.granularity
            && self.code == to.code
    }

    /// Whether some data can make the carry-over lossy: integers outside
    /// `to`'s range, or a scale conversion that may round.
    pub fn may_lose_to(&self, to: &CodeForm) -> bool {
        self.range[0] < to.range[0]
            || self.range[1] > to.range[1]
            || scale_may_round((self.value, self.scale_dtype), (to.value, to.scale_dtype))
    }

    /// Whether both forms dequantize to bit-identical floats (`q·s` and
    /// `q·A·(1/c)` can differ by up to 2 ulp).
    pub fn same_floats(&self, to: &CodeForm) -> bool {
        self.value == to.value
    }
}

/// Integer codes `[O, I]` (row-major) with their stored scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Codes {
    /// The integers.
    pub q: Vec<i8>,
    /// The stored scale bytes.
    pub scale: Vec<u8>,
    /// What the scale number is.
    pub value: ScaleValue,
    /// The scale's stored dtype.
    pub dtype: Dtype,
}

/// Whether converting a stored scale between value forms and dtypes may
/// round (some data can make it inexact); `false` only where it is exact
/// for every value: the same form into the same or a wider dtype, or a
/// bf16 / f16 scale times an integer divisor up to 255 into F32.
pub fn scale_may_round(from: (ScaleValue, Dtype), to: (ScaleValue, Dtype)) -> bool {
    let narrow = matches!(from.1, Dtype::BF16 | Dtype::F16);
    let widens = from.1 == to.1 || (narrow && to.1 == Dtype::F32);
    match (from.0, to.0) {
        (ScaleValue::Scale, ScaleValue::Scale) => !widens,
        (ScaleValue::AbsmaxOver(a), ScaleValue::AbsmaxOver(b)) => a != b || !widens,
        (ScaleValue::Scale, ScaleValue::AbsmaxOver(c)) => {
            !(narrow && to.1 == Dtype::F32 && c.fract() == 0.0 && (1.0..=255.0).contains(&c))
        }
        _ => true,
    }
}

/// Converts stored scale numbers between two (value form, dtype) pairs.
/// Returns the new bytes and whether converting back gives the source
/// bytes exactly.
pub fn convert_scale(
    from: (ScaleValue, Dtype),
    to: (ScaleValue, Dtype),
    bytes: &[u8],
) -> Result<(Vec<u8>, bool)> {
    let ff = crate::float::float_dtype_of(from.1).ok_or_else(|| Error::layout("scale dtype"))?;
    let tf = crate::float::float_dtype_of(to.1).ok_or_else(|| Error::layout("scale dtype"))?;
    let v = ff.decode(bytes).map_err(|e| Error::layout(e.to_string()))?;
    let k = |sv: ScaleValue| match sv {
        ScaleValue::Scale => 1.0f64,
        ScaleValue::AbsmaxOver(c) => c,
    };
    let (kf, kt) = (k(from.0), k(to.0));
    let conv = |x: f32, a: f64, b: f64| -> f32 {
        if a == b {
            x
        } else if b > a {
            (x as f64 * (b / a)) as f32
        } else {
            (x as f64 / (a / b)) as f32
        }
    };
    let out: Vec<f32> = v.iter().map(|&x| tf.round(conv(x, kf, kt))).collect();
    let back: Vec<f32> = out.iter().map(|&x| ff.round(conv(x, kt, kf))).collect();
    let exact = ff.encode(&back) == bytes;
    Ok((tf.encode(&out), exact))
}

/// What a lossy re-layout changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Loss {
    /// Module path.
    pub layer: String,
    /// Integers clamped into the target range.
    pub clamped: u64,
    /// Largest absolute change of a dequantized value.
    pub max_abs_error: f64,
    /// Largest change in units of the (target) scale.
    pub max_error_in_scales: f64,
}

/// Carries codes over to the target's scale form and integer range. When
/// that cannot be undone byte for byte (integers clamped, a scale rounded),
/// it is refused unless `allow_lossy`, and the damage is measured on the
/// dequantized values.
pub fn relayout(
    layer: &str,
    v: Codes,
    to: (ScaleValue, Dtype),
    range: [i32; 2],
    allow_lossy: bool,
) -> Result<(Codes, Option<Loss>)> {
    let (scale, exact) = convert_scale((v.value, v.dtype), to, &v.scale)?;
    let clamped =
        v.q.iter()
            .filter(|&&x| (x as i32) < range[0] || (x as i32) > range[1])
            .count() as u64;
    let out = |q: Vec<i8>, scale: Vec<u8>| Codes {
        q,
        scale,
        value: to.0,
        dtype: to.1,
    };
    if exact && clamped == 0 {
        return Ok((out(v.q, scale), None));
    }
    // measure the damage on the dequantized values
    let q2: Vec<i8> =
        v.q.iter()
            .map(|&x| (x as i32).clamp(range[0], range[1]) as i8)
            .collect();
    let f = |sv: ScaleValue, d: Dtype, b: &[u8]| -> Result<Vec<f64>> {
        let fd = crate::float::float_dtype_of(d).ok_or_else(|| Error::layout("scale dtype"))?;
        let k = match sv {
            ScaleValue::Scale => 1.0,
            ScaleValue::AbsmaxOver(c) => 1.0 / c,
        };
        Ok(fd
            .decode(b)
            .map_err(|e| Error::layout(e.to_string()))?
            .iter()
            .map(|&x| x as f64 * k)
            .collect())
    };
    let s0 = f(v.value, v.dtype, &v.scale)?;
    let s1 = f(to.0, to.1, &scale)?;
    let per = (v.q.len() / s0.len().max(1)).max(1);
    let (mut mae, mut mes) = (0f64, 0f64);
    for (k, (a, b)) in v.q.iter().zip(&q2).enumerate() {
        let g = (k / per).min(s0.len().saturating_sub(1));
        let e = (*a as f64 * s0[g] - *b as f64 * s1[g]).abs();
        mae = mae.max(e);
        if s1[g] > 0.0 {
            mes = mes.max(e / s1[g]);
        }
    }
    let loss = Loss {
        layer: layer.to_string(),
        clamped,
        max_abs_error: mae,
        max_error_in_scales: mes,
    };
    if !allow_lossy {
        return Err(Error::new(crate::error::ErrorKind::LossyRelayout {
            clamped,
            range: [range[0] as i64, range[1] as i64],
            scale_exact: exact,
            max_abs_error: mae,
            max_error_in_scales: mes,
        })
        .with_layer(layer.to_string()));
    }
    Ok((out(q2, scale), Some(loss)))
}
