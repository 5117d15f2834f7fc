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

    /// Whether codes of this form carry over to `to` once each row's scale
    /// is repeated over the row's groups ([`regroup_rows`]): one scale per
    /// row of a 2-D `shape` into groups that divide the row, otherwise as
    /// [`CodeForm::carries_to`] (no zero point, the same code kind).
    pub fn regroups_to(&self, to: &CodeForm, shape: &[u64]) -> bool {
        let rows_into_groups = match (self.granularity, to.granularity, shape) {
            (Granularity::Channel, Granularity::Group(g), &[_, cols]) => {
                g > 0 && cols > 0 && cols.is_multiple_of(g)
            }
            _ => false,
        };
        rows_into_groups && !self.zero_point && !to.zero_point && self.code == to.code
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

/// `v`'s codes `[rows, cols]` with one scale per row, as the same codes with
/// one scale per group of `group` elements of a row: each row's scale bytes
/// repeated `cols / group` times (row-major `[rows, cols / group]`). Exact:
/// every code keeps the scale it had. An error if the counts do not say so.
pub fn regroup_rows(v: Codes, rows: u64, cols: u64, group: u64) -> Result<Codes> {
    let size = v.dtype.size();
    let per_row = (group > 0 && cols.is_multiple_of(group))
        .then(|| cols / group)
        .and_then(|n| usize::try_from(n).ok());
    let counts = usize::try_from(rows)
        .ok()
        .zip(usize::try_from(cols).ok())
        .and_then(|(r, c)| Some((r.checked_mul(c)?, r.checked_mul(size)?, r)));
    let (Some(per_row), Some((n, scale_bytes, r))) = (per_row, counts) else {
        return Err(Error::layout(format!(
            "rows of {cols} codes do not split into groups of {group}"
        )));
    };
    if v.q.len() != n || v.scale.len() != scale_bytes {
        return Err(Error::layout(format!(
            "{} codes and {} scale bytes are not {rows} rows of {cols} codes with one \
             {}-byte scale each",
            v.q.len(),
            v.scale.len(),
            size
        )));
    }
    let mut scale = Vec::new();
    scale
        .try_reserve_exact(r.saturating_mul(per_row).saturating_mul(size))
        .map_err(|_| Error::overflow("regrouped scales"))?;
    for s in v.scale.chunks_exact(size) {
        for _ in 0..per_row {
            scale.extend_from_slice(s);
        }
    }
    Ok(Codes { scale, ..v })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn form(granularity: Granularity, zero_point: bool) -> CodeForm {
        CodeForm {
            name: "t".into(),
            value: ScaleValue::Scale,
            granularity,
            range: [-128, 127],
            scale_dtype: Dtype::F16,
            zero_point,
            code: Dtype::I8,
        }
    }

    /// Rows regroup into groups that divide them, 2-D only, never with a
    /// zero point or another code kind, and nothing else regroups.
    #[test]
    fn only_rows_regroup_into_groups_that_divide_them() {
        let row = form(Granularity::Channel, false);
        let g32 = form(Granularity::Group(32), false);
        assert!(row.regroups_to(&g32, &[4, 64]));
        assert!(row.regroups_to(&g32, &[1, 32]));
        assert!(!row.regroups_to(&g32, &[4, 48]), "48 is not whole groups");
        assert!(!row.regroups_to(&g32, &[4, 0]));
        assert!(!row.regroups_to(&g32, &[2, 4, 64]), "2-D only");
        assert!(!row.regroups_to(&form(Granularity::Group(0), false), &[4, 64]));
        assert!(!row.regroups_to(&form(Granularity::Group(32), true), &[4, 64]));
        assert!(!form(Granularity::Channel, true).regroups_to(&g32, &[4, 64]));
        let mut fp8 = g32.clone();
        fp8.code = Dtype::F8E4M3;
        assert!(!row.regroups_to(&fp8, &[4, 64]));
        assert!(!form(Granularity::Tensor, false).regroups_to(&g32, &[4, 64]));
        assert!(
            !g32.regroups_to(&row, &[4, 64]),
            "groups do not merge into rows"
        );
        assert!(!row.regroups_to(&row, &[4, 64]));
    }

    /// Each row's scale bytes are repeated over its groups, codes untouched;
    /// counts that do not fit are errors, not panics.
    #[test]
    fn regroup_rows_repeats_each_row_scale() {
        let q: Vec<i8> = (0..2 * 64).map(|i| (i as i8).wrapping_mul(3)).collect();
        let v = Codes {
            q: q.clone(),
            scale: vec![1, 2, 3, 4],
            value: ScaleValue::Scale,
            dtype: Dtype::F16,
        };
        let r = regroup_rows(v.clone(), 2, 64, 32).unwrap();
        assert_eq!(r.q, q);
        assert_eq!(r.scale, vec![1, 2, 1, 2, 3, 4, 3, 4]);
        assert_eq!((r.value, r.dtype), (ScaleValue::Scale, Dtype::F16));
        assert!(regroup_rows(v.clone(), 2, 64, 48).is_err());
        assert!(regroup_rows(v.clone(), 2, 64, 0).is_err());
        assert!(
            regroup_rows(v.clone(), 3, 64, 32).is_err(),
            "3 rows, 2 scales"
        );
        assert!(
            regroup_rows(v.clone(), 4, 32, 32).is_err(),
            "4 rows, 2 scales"
        );
        assert!(regroup_rows(v, u64::MAX, u64::MAX, 1).is_err());
    }
}
