//! Portable dot products; the reference the SIMD paths are tested against, and the path on
//! targets without them.

use crate::dtype::{bf16_to_f32, f16_to_f32, FP8_E4M3_TABLE};

pub fn dot_f32(bytes: &[u8], x: &[f32]) -> f32 {
    bytes
        .chunks_exact(4)
        .zip(x)
        .map(|(b, &xv)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * xv)
        .sum()
}

pub fn dot_bf16(bytes: &[u8], x: &[f32]) -> f32 {
    bytes
        .chunks_exact(2)
        .zip(x)
        .map(|(b, &xv)| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * xv)
        .sum()
}

pub fn dot_f16(bytes: &[u8], x: &[f32]) -> f32 {
    bytes
        .chunks_exact(2)
        .zip(x)
        .map(|(b, &xv)| f16_to_f32(u16::from_le_bytes([b[0], b[1]])) * xv)
        .sum()
}

pub fn dot_fp8(q: &[u8], x: &[f32]) -> f32 {
    q.iter().zip(x).map(|(&b, &xv)| FP8_E4M3_TABLE[b as usize] * xv).sum()
}
