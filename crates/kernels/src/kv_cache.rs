//! The paged KV cache: fixed-size blocks of token entries per layer, addressed by block tables.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::backend::SeqSpan;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvCacheError {
    #[error("sequence needs {needed} KV slots (positions up to {last_pos}) but its block table holds {available}")]
    BlockTableTooShort {
        needed: usize,
        last_pos: usize,
        available: usize,
    },
    #[error("block id {block} is outside the cache's {num_blocks} blocks")]
    BlockOutOfRange { block: u32, num_blocks: usize },
}

/// How the cache stores its entries (vLLM's `--kv-cache-dtype`, llama.cpp's `-ctk`/`-ctv`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// Exactly the values the model computed.
    #[default]
    F32,
    /// Half the memory and half the bytes each decoded token's attention reads (llama.cpp's
    /// default); keys and values round to 11 significant bits.
    F16,
}

impl KvCacheDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvCacheDtype::F32 => 4,
            KvCacheDtype::F16 => 2,
        }
    }

    /// Bytes one token occupies in a cache of entries `widths` wide (one per layer).
    pub fn token_bytes(self, widths: &[usize]) -> usize {
        widths.iter().sum::<usize>() * self.bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::F32 => "float32",
            KvCacheDtype::F16 => "float16",
        }
    }
}

/// One layer's entries, as stored.
#[derive(Clone, Copy, Debug)]
pub enum KvLayer<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

#[derive(Debug)]
enum Storage {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
}

/// Per-layer storage of `num_blocks × block_size` entries of `width[layer]` values.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    widths: Vec<usize>,
    layers: Storage,
}

impl PagedKvCache {
    /// An f32 cache.
    pub fn new(block_size: usize, num_blocks: usize, widths: &[usize]) -> Self {
        Self::with_dtype(block_size, num_blocks, widths, KvCacheDtype::F32)
    }

    pub fn with_dtype(block_size: usize, num_blocks: usize, widths: &[usize], dtype: KvCacheDtype) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let sizes = widths.iter().map(|w| block_size * num_blocks * w);
        let layers = match dtype {
            KvCacheDtype::F32 => Storage::F32(sizes.map(|n| vec![0.0; n]).collect()),
            KvCacheDtype::F16 => Storage::F16(sizes.map(|n| vec![f16::ZERO; n]).collect()),
        };
        Self {
            block_size,
            num_blocks,
            widths: widths.to_vec(),
            layers,
        }
    }

    pub fn dtype(&self) -> KvCacheDtype {
        match self.layers {
            Storage::F32(_) => KvCacheDtype::F32,
            Storage::F16(_) => KvCacheDtype::F16,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_layers(&self) -> usize {
        self.widths.len()
    }

    pub fn width(&self, layer: usize) -> usize {
        self.widths[layer]
    }

    /// Bytes of cache one token occupies over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.dtype().token_bytes(&self.widths)
    }

    /// Checks that every span's positions have a slot in an existing block.
    pub fn validate(&self, spans: &[SeqSpan]) -> Result<(), KvCacheError> {
        for span in spans {
            let end = span.start_pos.saturating_add(span.len);
            let available = span.block_table.len() * self.block_size;
            if end > available {
                return Err(KvCacheError::BlockTableTooShort {
                    needed: end,
                    last_pos: end.saturating_sub(1),
                    available,
                });
            }
            let used_blocks = end.div_ceil(self.block_size);
            if let Some(&block) = span.block_table[..used_blocks]
                .iter()
                .find(|&&b| b as usize >= self.num_blocks)
            {
                return Err(KvCacheError::BlockOutOfRange {
                    block,
                    num_blocks: self.num_blocks,
                });
            }
        }
        Ok(())
    }

    /// Flat slot of position `pos` of a sequence.
    #[inline]
    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Layer `layer`'s entries: slot `s` holds values `s·width..(s + 1)·width`.
    #[inline]
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.layers {
            Storage::F32(layers) => KvLayer::F32(&layers[layer]),
            Storage::F16(layers) => KvLayer::F16(&layers[layer]),
        }
    }

    /// Stores `values` (one entry, `width(layer)` of them) in `slot`, rounded to the cache's
    /// dtype.
    #[inline]
    pub fn write_entry(&mut self, layer: usize, slot: usize, values: &[f32]) {
        let range = self.entry_range(layer, slot);
        assert_eq!(values.len(), range.len(), "a KV entry is {} values", range.len());
        match &mut self.layers {
            Storage::F32(layers) => layers[layer][range].copy_from_slice(values),
            Storage::F16(layers) => layers[layer][range].convert_from_f32_slice(values),
        }
    }

    /// The entry in `slot` as f32 (for checks; attention reads [`Self::layer`]).
    pub fn read_entry(&self, layer: usize, slot: usize) -> Vec<f32> {
        let range = self.entry_range(layer, slot);
        match self.layer(layer) {
            KvLayer::F32(values) => values[range].to_vec(),
            KvLayer::F16(values) => values[range].iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// Where `slot`'s entry lies in layer `layer`'s values.
    fn entry_range(&self, layer: usize, slot: usize) -> std::ops::Range<usize> {
        let w = self.widths[layer];
        slot * w..(slot + 1) * w
    }

    /// Copies one whole block to another in every layer (for
    /// copy-on-write of a shared prefix block).
    pub fn copy_block(&mut self, from: u32, to: u32) {
        fn copy<T: Copy>(layers: &mut [Vec<T>], widths: &[usize], span: usize, from: usize, to: usize) {
            for (data, w) in layers.iter_mut().zip(widths) {
                data.copy_within(from * span * w..(from + 1) * span * w, to * span * w);
            }
        }
        let (bs, from, to) = (self.block_size, from as usize, to as usize);
        match &mut self.layers {
            Storage::F32(layers) => copy(layers, &self.widths, bs, from, to),
            Storage::F16(layers) => copy(layers, &self.widths, bs, from, to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_problem() {
        let cache = PagedKvCache::new(4, 2, &[8]);
        let short = [SeqSpan {
            start_pos: 3,
            len: 3,
            block_table: &[0],
        }];
        assert_eq!(
            cache.validate(&short),
            Err(KvCacheError::BlockTableTooShort {
                needed: 6,
                last_pos: 5,
                available: 4
            })
        );
        let bad_block = [SeqSpan {
            start_pos: 0,
            len: 5,
            block_table: &[1, 7],
        }];
        assert_eq!(
            cache.validate(&bad_block),
            Err(KvCacheError::BlockOutOfRange {
                block: 7,
                num_blocks: 2
            })
        );
    }

    /// F16 entries round to the nearest half (read back exactly as `half` rounds), take half the
    /// bytes, and whole blocks copy between slots as F32 ones do.
    #[test]
    fn f16_entries_round_take_half_the_bytes_and_copy_by_block() {
        let values = [1.0f32, 0.1, -65504.0, 2.71, 1e-6, 0.0];
        let mut cache = PagedKvCache::with_dtype(2, 3, &[6, 6], KvCacheDtype::F16);
        assert_eq!(cache.dtype(), KvCacheDtype::F16);
        assert_eq!(cache.bytes_per_token(), 12 * 2);
        assert_eq!(PagedKvCache::new(2, 3, &[6, 6]).bytes_per_token(), 12 * 4);
        cache.write_entry(1, 3, &values);
        let rounded: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(cache.read_entry(1, 3), rounded);
        assert_ne!(rounded, values, "0.1 and 2.71 are not halves");
        cache.copy_block(1, 2);
        assert_eq!(cache.read_entry(1, 5), rounded);
        assert_eq!(cache.read_entry(0, 5), vec![0.0; 6]);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let cache = PagedKvCache::new(4, 3, &[1]);
        assert_eq!(cache.slot(&[2, 0], 1), 9);
        assert_eq!(cache.slot(&[2, 0], 5), 1);
    }
}
