//! Planar packing of quanto's 4-bit and 2-bit weight data (`weight._data._data`).
//!
//! quanto stores qint4 / qint2 codes as `uint8` and packs several of them into one byte along
//! **dim 0**, plane by plane rather than neighbour by neighbour. With `N` rows (dim 0 of the
//! unpacked data), `vpi = 8 / bits` values per byte and `row_dim = ceil(N / vpi)`, the packed
//! tensor has `row_dim` rows of the same length, and
//!
//! ```text
//! packed[r] = OR over i in 0..vpi of ( data[i*row_dim + r] << (bits * i) ),
//!             for the i where i*row_dim + r < N; missing slots are zero.
//! ```
//!
//! So for 4-bit the low nibble of packed row `r` is row `r` of the first half and the high nibble
//! is row `r + row_dim`; for 2-bit, bits `2i..2i+2` hold row `r + i*row_dim`. Unpacking needs
//! `N`, which is not stored in the file (it comes from the logical shape).
//!
//! All functions take flat row-major byte slices plus the row count and row length (the product
//! of the remaining dims), and check every length before touching the data.

use crate::layout::quanto::error::MathError;

/// Values per packed byte for a bit width: 2 for 4-bit, 4 for 2-bit, `None` otherwise.
pub const fn values_per_byte(bits: u32) -> Option<usize> {
    match bits {
        4 => Some(2),
        2 => Some(4),
        _ => None,
    }
}

/// Number of packed rows for `rows` unpacked rows: `ceil(rows / vpi)`.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
pub fn packed_rows(bits: u32, rows: usize) -> Result<usize, MathError> {
    let vpi = values_per_byte(bits).ok_or(MathError::UnsupportedBits { bits })?;
    Ok(rows.div_ceil(vpi))
}

/// Checks the sizes shared by packing and unpacking; returns `(vpi, plane_len, total)` where
/// `plane_len = row_dim * row_len` bytes is the packed size and `total = rows * row_len`.
fn geometry(bits: u32, rows: usize, row_len: usize) -> Result<(usize, usize, usize), MathError> {
    let vpi = values_per_byte(bits).ok_or(MathError::UnsupportedBits { bits })?;
    let row_dim = rows.div_ceil(vpi);
    let plane_len = row_dim.checked_mul(row_len).ok_or(MathError::Overflow)?;
    let total = rows.checked_mul(row_len).ok_or(MathError::Overflow)?;
    Ok((vpi, plane_len, total))
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), MathError> {
    if expected == actual {
        Ok(())
    } else {
        Err(MathError::ByteLength {
            what,
            expected: expected as u64,
            actual: actual as u64,
        })
    }
}

/// Packs `rows * row_len` unpacked codes (one per byte, each `< 2^bits`) into `out`, which must
/// be `ceil(rows / vpi) * row_len` bytes long.
///
/// Fails on an unsupported bit width, a wrong slice length, or a code that does not fit in
/// `bits` bits.
pub fn pack_into(
    bits: u32,
    data: &[u8],
    rows: usize,
    row_len: usize,
    out: &mut [u8],
) -> Result<(), MathError> {
    let (vpi, plane_len, total) = geometry(bits, rows, row_len)?;
    check_len("unpacked data", total, data.len())?;
    check_len("packed output", plane_len, out.len())?;
    let max = (1u8 << bits) - 1;
    // One cheap pass over the input: OR of all codes, then a precise search only on failure.
    if data.iter().fold(0u8, |acc, &v| acc | v) > max {
        let value = data.iter().copied().find(|&v| v > max).unwrap_or(u8::MAX);
        return Err(MathError::CodeOutOfRange { value, max });
    }
    if plane_len == 0 {
        return Ok(());
    }
    // Plane 0 is always complete (row_dim <= rows), the others may be cut short at the end.
    let mut planes = data.chunks(plane_len);
    if let Some(first) = planes.next() {
        out.copy_from_slice(first);
    }
    for (i, plane) in planes.enumerate().take(vpi - 1) {
        let shift = bits * (i as u32 + 1);
        for (o, &v) in out.iter_mut().zip(plane) {
            *o |= v << shift;
        }
    }
    Ok(())
}

/// Packs unpacked codes; see [`pack_into`]. Returns `ceil(rows / vpi) * row_len` bytes.
pub fn pack(bits: u32, data: &[u8], rows: usize, row_len: usize) -> Result<Vec<u8>, MathError> {
    let (_, plane_len, _) = geometry(bits, rows, row_len)?;
    let mut out = vec![0u8; plane_len];
    pack_into(bits, data, rows, row_len, &mut out)?;
    Ok(out)
}

/// Unpacks `packed` (`ceil(rows / vpi) * row_len` bytes) into `out` (`rows * row_len` codes).
///
/// Padding slots of the last plane are ignored, as quanto ignores them.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
pub fn unpack_into(
    bits: u32,
    packed: &[u8],
    rows: usize,
    row_len: usize,
    out: &mut [u8],
) -> Result<(), MathError> {
    let (_, plane_len, total) = geometry(bits, rows, row_len)?;
    check_len("packed data", plane_len, packed.len())?;
    check_len("unpacked output", total, out.len())?;
    if plane_len == 0 {
        return Ok(());
    }
    let mask = (1u8 << bits) - 1;
    for (i, plane) in out.chunks_mut(plane_len).enumerate() {
        let shift = bits * i as u32;
        for (o, &p) in plane.iter_mut().zip(packed) {
            *o = (p >> shift) & mask;
        }
    }
    Ok(())
}

/// Unpacks planar-packed codes; see [`unpack_into`]. Returns `rows * row_len` bytes.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
pub fn unpack(bits: u32, packed: &[u8], rows: usize, row_len: usize) -> Result<Vec<u8>, MathError> {
    let (_, _, total) = geometry(bits, rows, row_len)?;
    let mut out = vec![0u8; total];
    unpack_into(bits, packed, rows, row_len, &mut out)?;
    Ok(out)
}

/// Reads one code straight from packed data without unpacking: the element at unpacked row
/// `row`, column `col`. `None` when out of range.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
pub fn packed_code(
    bits: u32,
    packed: &[u8],
    rows: usize,
    row_len: usize,
    row: usize,
    col: usize,
) -> Option<u8> {
    let vpi = values_per_byte(bits)?;
    if row >= rows || col >= row_len {
        return None;
    }
    let row_dim = rows.div_ceil(vpi);
    let plane = row / row_dim;
    let idx = (row % row_dim).checked_mul(row_len)?.checked_add(col)?;
    let byte = *packed.get(idx)?;
    Some((byte >> (bits * plane as u32)) & ((1u8 << bits) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worked_example_4bit() {
        let data = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let packed = pack(4, &data, 5, 2).unwrap();
        assert_eq!(packed, [0x60, 0x71, 0x82, 0x93, 0x04, 0x05]);
        assert_eq!(unpack(4, &packed, 5, 2).unwrap(), data);
    }

    #[test]
    fn worked_example_2bit() {
        let data = [0u8, 1, 2, 3, 0, 1, 2, 3, 0, 1];
        let packed = pack(2, &data, 5, 2).unwrap();
        assert_eq!(packed, [0x00, 0x15, 0x0A, 0x0F]);
        assert_eq!(unpack(2, &packed, 5, 2).unwrap(), data);
    }

    #[test]
    fn errors() {
        assert_eq!(
            pack(3, &[0], 1, 1),
            Err(MathError::UnsupportedBits { bits: 3 })
        );
        assert_eq!(
            pack(4, &[16], 1, 1),
            Err(MathError::CodeOutOfRange { value: 16, max: 15 })
        );
        assert_eq!(
            pack(2, &[1, 4], 2, 1),
            Err(MathError::CodeOutOfRange { value: 4, max: 3 })
        );
        assert!(matches!(
            pack(4, &[0; 5], 2, 3),
            Err(MathError::ByteLength { .. })
        ));
        assert!(matches!(
            unpack(4, &[0; 4], 5, 2),
            Err(MathError::ByteLength { .. })
        ));
        assert!(matches!(
            pack(4, &[], usize::MAX, 2),
            Err(MathError::Overflow)
        ));
        let mut out = [0u8; 2];
        assert!(pack_into(4, &[0; 4], 4, 1, &mut out).is_ok());
        assert!(pack_into(4, &[0; 4], 4, 1, &mut [0u8; 3]).is_err());
        assert!(unpack_into(2, &[0; 1], 4, 1, &mut [0u8; 3]).is_err());
        assert_eq!(pack(4, &[], 0, 7).unwrap(), Vec::<u8>::new());
        assert_eq!(pack(4, &[], 3, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(unpack(2, &[], 0, 3).unwrap(), Vec::<u8>::new());
        assert_eq!(packed_rows(2, 5), Ok(2));
        assert_eq!(packed_rows(4, 5), Ok(3));
        assert!(packed_rows(8, 5).is_err());
    }

    #[test]
    fn padding_is_ignored_on_unpack() {
        // 3 rows of 4-bit: row_dim 2, the high nibble of packed row 1 is padding.
        let packed = [0x21u8, 0xF3];
        assert_eq!(unpack(4, &packed, 3, 1).unwrap(), [1, 3, 2]);
    }

    proptest! {
        #[test]
        fn pack_unpack_identity(
            bits in prop_oneof![Just(2u32), Just(4u32)],
            rows in 0usize..23,
            row_len in 0usize..9,
            seed in any::<u64>(),
        ) {
            let max = (1u64 << bits) - 1;
            let mut s = seed | 1;
            let data: Vec<u8> = (0..rows * row_len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % (max + 1)) as u8
                })
                .collect();
            let packed = pack(bits, &data, rows, row_len).unwrap();
            let vpi = values_per_byte(bits).unwrap();
            prop_assert_eq!(packed.len(), rows.div_ceil(vpi) * row_len);
            prop_assert_eq!(unpack(bits, &packed, rows, row_len).unwrap(), data.clone());
            // Definition check, element by element, and padding slots are zero.
            let row_dim = rows.div_ceil(vpi);
            for r in 0..row_dim {
                for c in 0..row_len {
                    let mut want = 0u8;
                    for i in 0..vpi {
                        let src = i * row_dim + r;
                        if src < rows {
                            want |= data[src * row_len + c] << (bits as usize * i);
                        }
                    }
                    prop_assert_eq!(packed[r * row_len + c], want);
                }
            }
            for r in 0..rows {
                for c in 0..row_len {
                    prop_assert_eq!(
                        packed_code(bits, &packed, rows, row_len, r, c),
                        Some(data[r * row_len + c])
                    );
                }
            }
            prop_assert_eq!(packed_code(bits, &packed, rows, row_len, rows, 0), None);
        }
    }
}
