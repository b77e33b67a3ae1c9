//! In-situ conversion at load: weights read in their stored format are re-encoded into the
//! format the user asked for (`--quant q4_k`, `--quant bf16`, ...), row by row across the pool.

use std::sync::Mutex;

use half::{bf16, f16};
use r1serve_kernels::cpu::pool;
use r1serve_kernels::quant::quantize;
use r1serve_kernels::{ByteView, WeightError, WeightFormat, WeightMatrix};

/// Formats `--quant` accepts, by the names llama.cpp and the CLI use.
pub fn parse_format(name: &str) -> Option<WeightFormat> {
    Some(match name.to_ascii_lowercase().as_str() {
        "f32" => WeightFormat::F32,
        "bf16" => WeightFormat::Bf16,
        "f16" => WeightFormat::F16,
        "q8_0" => WeightFormat::Q8_0,
        "q4_0" => WeightFormat::Q4_0,
        "q4_k" => WeightFormat::Q4K,
        "q6_k" => WeightFormat::Q6K,
        _ => return None,
    })
}

pub const FORMAT_NAMES: &str = "f32, bf16, f16, q8_0, q4_0, q4_k, q6_k";

/// Tensors kept as stored: the embedding table (one row read per token, and quantising it costs
/// accuracy for no speed), the MoE router (its logits decide routing) and MLA's `kv_b_proj`
/// (decoded to f32 at load for the absorbed form anyway).
fn keep_as_stored(name: &str) -> bool {
    name.ends_with("embed_tokens.weight") || name.ends_with("mlp.gate.weight") || name.ends_with("kv_b_proj.weight")
}

/// Rows per parallel task of [`convert`].
const CHUNK_ROWS: usize = 16;

/// Re-encodes `matrix` into `target`, or returns it unchanged when it is already in that format,
/// is exempt, or its width is not a whole number of the target's blocks.
pub fn convert(name: &str, matrix: WeightMatrix, target: WeightFormat) -> Result<WeightMatrix, WeightError> {
    let (rows, cols) = (matrix.rows(), matrix.cols());
    if matrix.format() == target || keep_as_stored(name) {
        return Ok(matrix);
    }
    if target.is_block_quantized() && !cols.is_multiple_of(target.block_size()) {
        tracing::warn!(
            tensor = name,
            cols,
            format = target.name(),
            "width is not a whole number of blocks: kept as stored"
        );
        return Ok(matrix);
    }
    let row_bytes = target.row_bytes(cols).ok_or(WeightError::Overflow { rows, cols })?;
    let mut bytes = vec![0u8; rows * row_bytes];
    let first_error = Mutex::new(None);
    let convert_row = |row: usize, row_values: &mut [f32], out: &mut [u8]| -> Result<(), WeightError> {
        matrix.dequantize_row(row, row_values);
        match target {
            WeightFormat::F32 => out
                .iter_mut()
                .zip(row_values.iter().flat_map(|v| v.to_le_bytes()))
                .for_each(|(o, b)| *o = b),
            WeightFormat::Bf16 => out
                .iter_mut()
                .zip(row_values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()))
                .for_each(|(o, b)| *o = b),
            WeightFormat::F16 => out
                .iter_mut()
                .zip(row_values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()))
                .for_each(|(o, b)| *o = b),
            _ => out.copy_from_slice(&quantize(target, row_values)?),
        }
        Ok(())
    };
    pool::for_each_chunk_mut(&mut bytes, CHUNK_ROWS * row_bytes.max(1), |chunk, out| {
        let mut row_values = vec![0.0f32; cols];
        for (i, out) in out.chunks_mut(row_bytes.max(1)).enumerate() {
            if let Err(e) = convert_row(chunk * CHUNK_ROWS + i, &mut row_values, out) {
                first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                return;
            }
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    WeightMatrix::new(rows, cols, target, ByteView::from_vec(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize) -> (Vec<f32>, WeightMatrix) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        let m = WeightMatrix::from_f32(rows, cols, &values).unwrap();
        (values, m)
    }

    #[test]
    fn converts_and_stays_close() {
        let (values, m) = sample(5, 64);
        for (format, tolerance) in [
            (WeightFormat::Bf16, 1e-2),
            (WeightFormat::F16, 1e-3),
            (WeightFormat::Q8_0, 1e-2),
            (WeightFormat::Q6K, 0.0), // 64 is not a multiple of 256: kept as F32
        ] {
            let c = convert("model.layers.0.mlp.up_proj.weight", m.clone(), format).unwrap();
            let expected_format = if format == WeightFormat::Q6K {
                WeightFormat::F32
            } else {
                format
            };
            assert_eq!(c.format(), expected_format);
            for (a, b) in c.to_f32().iter().zip(&values) {
                assert!((a - b).abs() <= tolerance, "{format:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn exempt_tensors_are_kept() {
        let (_, m) = sample(2, 256);
        let c = convert("model.embed_tokens.weight", m, WeightFormat::Q4K).unwrap();
        assert_eq!(c.format(), WeightFormat::F32);
    }

    #[test]
    fn format_names() {
        assert_eq!(parse_format("Q4_K"), Some(WeightFormat::Q4K));
        assert_eq!(parse_format("q5_k"), None);
    }
}
