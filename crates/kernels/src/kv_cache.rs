//! The paged KV cache: fixed-size blocks of token entries per layer, addressed by block tables.

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

/// Per-layer storage of `num_blocks × block_size` entries of `width[layer]` floats.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    widths: Vec<usize>,
    layers: Vec<Vec<f32>>,
}

impl PagedKvCache {
    pub fn new(block_size: usize, num_blocks: usize, widths: &[usize]) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let layers = widths.iter().map(|w| vec![0.0; block_size * num_blocks * w]).collect();
        Self {
            block_size,
            num_blocks,
            widths: widths.to_vec(),
            layers,
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
        self.widths.iter().sum::<usize>() * std::mem::size_of::<f32>()
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

    #[inline]
    pub fn entry(&self, layer: usize, slot: usize) -> &[f32] {
        let w = self.widths[layer];
        &self.layers[layer][slot * w..(slot + 1) * w]
    }

    #[inline]
    pub fn entry_mut(&mut self, layer: usize, slot: usize) -> &mut [f32] {
        let w = self.widths[layer];
        &mut self.layers[layer][slot * w..(slot + 1) * w]
    }

    /// Copies one whole block to another in every layer (for
    /// copy-on-write of a shared prefix block).
    pub fn copy_block(&mut self, from: u32, to: u32) {
        let bs = self.block_size;
        for (layer, data) in self.layers.iter_mut().enumerate() {
            let w = self.widths[layer];
            let (src, dst) = (from as usize * bs * w, to as usize * bs * w);
            data.copy_within(src..src + bs * w, dst);
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

    #[test]
    fn slots_follow_the_block_table() {
        let cache = PagedKvCache::new(4, 3, &[1]);
        assert_eq!(cache.slot(&[2, 0], 1), 9);
        assert_eq!(cache.slot(&[2, 0], 5), 1);
    }
}
