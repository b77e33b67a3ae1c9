//! The KV block pool: a fixed number of blocks of `block_size` token slots, ref-counted, with a
//! prefix cache keyed by chained block hashes. Plain numbers only: it never touches a device, the
//! runner turns block ids into cache slots.
//!
//! # Invariants
//! - **Only full, computed blocks are shared, so no block is ever written while shared.** A block
//!   enters the prefix cache (gets a hash) only once every one of its `block_size` slots holds a
//!   computed KV entry ([`BlockManager::commit`]); a sequence that reuses cached blocks starts
//!   computing after them. Writes therefore land only in blocks with `ref_count == 1` and no hash
//!   (see [`BlockManager::writable`], checked by the engine in debug builds), and copy-on-write is
//!   never needed: the last, partial block of a sequence is always private.
//! - A prefix match never covers a prompt's last token: at least one token is computed to get the
//!   logits of the next one, so a match stops at `(len - 1) / block_size` full blocks.
//! - Every block is in exactly one place: referenced by sequences (`ref_count > 0`), free and
//!   plain, or free and cached (reusable on a hit until evicted, least recently freed first).
//! - A hash is the hash of (parent block's hash, the block's token ids); a hit also compares the
//!   stored token ids and parent hash, so a hash collision can only cost a miss, never wrong KV.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;

pub type BlockId = u32;

/// Parent hash of a sequence's first block.
const ROOT_HASH: u64 = 0x5231_7365_7276_6531;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("{needed} more KV blocks needed but {free} are free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("allocate needs an empty block table")]
    TableNotEmpty,
}

/// A sequence's blocks in position order, and the chained hashes of its leading full computed
/// blocks (kept only with prefix caching on).
#[derive(Clone, Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    hashes: Vec<u64>,
}

impl BlockTable {
    /// Block ids in position order, as the model's `SeqInput::block_table` wants them.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The longest cached run of full blocks a token sequence starts with.
#[derive(Clone, Debug, Default)]
pub struct PrefixMatch {
    blocks: Vec<BlockId>,
    hashes: Vec<u64>,
}

impl PrefixMatch {
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
}

#[derive(Debug, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    hash: Option<u64>,
    parent: u64,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<BlockMeta>,
    /// Free blocks holding nothing reusable (a stack).
    free_plain: Vec<BlockId>,
    /// Free blocks still registered in the prefix cache, by the tick they were freed (LRU first).
    free_cached: BTreeMap<u64, BlockId>,
    /// Each free cached block's key in `free_cached`.
    freed_at: HashMap<BlockId, u64>,
    cached: HashMap<u64, BlockId>,
    tick: u64,
}

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(block_size: usize, num_blocks: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            block_size,
            prefix_caching,
            blocks: (0..num_blocks).map(|_| BlockMeta::default()).collect(),
            // Reversed so block 0 is handed out first.
            free_plain: (0..num_blocks as BlockId).rev().collect(),
            free_cached: BTreeMap::new(),
            freed_at: HashMap::new(),
            cached: HashMap::new(),
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Free blocks, cached ones included (they are evicted on demand).
    pub fn num_free_blocks(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    /// Fraction of blocks held by sequences, in [0, 1] (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.blocks.len() as f64
    }

    /// Blocks needed to hold `num_tokens` slots.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The cached full blocks `tokens` starts with, never covering its last token.
    pub fn match_prefix(&self, tokens: &[u32]) -> PrefixMatch {
        let mut found = PrefixMatch::default();
        if !self.prefix_caching {
            return found;
        }
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = ROOT_HASH;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = chain_hash(parent, chunk);
            let Some(&block) = self.cached.get(&hash) else { break };
            let meta = &self.blocks[block as usize];
            if meta.parent != parent || meta.tokens != chunk {
                break;
            }
            found.blocks.push(block);
            found.hashes.push(hash);
            parent = hash;
        }
        found
    }

    /// Whether a new sequence reusing `prefix` can get slots for `num_tokens` tokens.
    pub fn can_allocate(&self, prefix: &PrefixMatch, num_tokens: usize) -> bool {
        let revived = prefix
            .blocks
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count();
        let new = self.blocks_for(num_tokens).saturating_sub(prefix.blocks.len());
        revived + new <= self.num_free_blocks()
    }

    /// Whether `table` can grow to hold `num_tokens` slots.
    pub fn can_append(&self, table: &BlockTable, num_tokens: usize) -> bool {
        self.blocks_for(num_tokens).saturating_sub(table.blocks.len()) <= self.num_free_blocks()
    }

    /// Gives an empty `table` the blocks of `prefix` (shared: ref count + 1) and fresh blocks up
    /// to `num_tokens` slots. Returns the number of cached tokens reused. All or nothing.
    pub fn allocate(
        &mut self,
        table: &mut BlockTable,
        prefix: PrefixMatch,
        num_tokens: usize,
    ) -> Result<usize, BlockError> {
        if !table.is_empty() {
            return Err(BlockError::TableNotEmpty);
        }
        if !self.can_allocate(&prefix, num_tokens) {
            let new = self.blocks_for(num_tokens).saturating_sub(prefix.blocks.len());
            return Err(BlockError::OutOfBlocks {
                needed: new,
                free: self.num_free_blocks(),
            });
        }
        for &b in &prefix.blocks {
            let meta = &mut self.blocks[b as usize];
            if meta.ref_count == 0 {
                if let Some(tick) = self.freed_at.remove(&b) {
                    self.free_cached.remove(&tick);
                }
            }
            meta.ref_count += 1;
        }
        let cached_tokens = prefix.blocks.len() * self.block_size;
        table.blocks = prefix.blocks;
        table.hashes = prefix.hashes;
        self.append(table, num_tokens)?;
        Ok(cached_tokens)
    }

    /// Grows `table` with fresh private blocks until it holds `num_tokens` slots. All or nothing.
    pub fn append(&mut self, table: &mut BlockTable, num_tokens: usize) -> Result<(), BlockError> {
        let needed = self.blocks_for(num_tokens).saturating_sub(table.blocks.len());
        if needed > self.num_free_blocks() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.num_free_blocks(),
            });
        }
        for _ in 0..needed {
            let block = self.take_free().ok_or(BlockError::OutOfBlocks { needed, free: 0 })?;
            self.blocks[block as usize].ref_count = 1;
            table.blocks.push(block);
        }
        Ok(())
    }

    /// A free block: a plain one if any, else the least recently freed cached one (evicted).
    fn take_free(&mut self) -> Option<BlockId> {
        if let Some(b) = self.free_plain.pop() {
            return Some(b);
        }
        let (_, b) = self.free_cached.pop_first()?;
        self.freed_at.remove(&b);
        let meta = &mut self.blocks[b as usize];
        if let Some(hash) = meta.hash.take() {
            self.cached.remove(&hash);
        }
        meta.tokens.clear();
        Some(b)
    }

    /// Registers the blocks of `table` that `num_computed` computed tokens of `tokens` fill
    /// completely, so later sequences can reuse them. Call after the forward pass wrote them.
    pub fn commit(&mut self, table: &mut BlockTable, tokens: &[u32], num_computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let full = (num_computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        for i in table.hashes.len()..full {
            let parent = table.hashes.last().copied().unwrap_or(ROOT_HASH);
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = chain_hash(parent, chunk);
            table.hashes.push(hash);
            let block = table.blocks[i];
            let meta = &mut self.blocks[block as usize];
            // A block with the same content may already be cached (two sequences computed the
            // same prefix at once): keep that one, this one stays private.
            if meta.hash.is_none() && !self.cached.contains_key(&hash) {
                meta.hash = Some(hash);
                meta.parent = parent;
                meta.tokens = chunk.to_vec();
                self.cached.insert(hash, block);
            }
        }
    }

    /// Releases every block of `table` (which ends empty). Cached blocks stay reusable until
    /// evicted; the sequence's last blocks are freed first so they are evicted first.
    pub fn free(&mut self, table: &mut BlockTable) {
        for &b in table.blocks.iter().rev() {
            let meta = &mut self.blocks[b as usize];
            debug_assert!(meta.ref_count > 0, "block {b} freed twice");
            meta.ref_count = meta.ref_count.saturating_sub(1);
            if meta.ref_count == 0 {
                if meta.hash.is_some() {
                    self.tick += 1;
                    self.free_cached.insert(self.tick, b);
                    self.freed_at.insert(b, self.tick);
                } else {
                    self.free_plain.push(b);
                }
            }
        }
        table.blocks.clear();
        table.hashes.clear();
    }

    /// Whether positions `positions` of the sequence owning `table` may be written: every block
    /// they touch is held by this table alone and is not in the prefix cache.
    pub fn writable(&self, table: &BlockTable, positions: Range<usize>) -> bool {
        if positions.is_empty() {
            return true;
        }
        let blocks = positions.start / self.block_size..(positions.end - 1) / self.block_size + 1;
        blocks.into_iter().all(|i| {
            table.blocks.get(i).is_some_and(|&b| {
                let meta = &self.blocks[b as usize];
                meta.ref_count == 1 && meta.hash.is_none()
            })
        })
    }

    /// Reference count of one block (for tests and debugging).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks.get(block as usize).map_or(0, |m| m.ref_count)
    }

    /// Checks the bookkeeping: every block is referenced, free-plain, or free-cached, exactly once.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.blocks.len()];
        for &b in self.free_plain.iter().chain(self.free_cached.values()) {
            seen[b as usize] += 1;
        }
        for (b, meta) in self.blocks.iter().enumerate() {
            let free = seen[b];
            match (meta.ref_count, free) {
                (0, 1) | (1.., 0) => {}
                (r, f) => return Err(format!("block {b}: ref count {r} but listed free {f} times")),
            }
            if meta.ref_count == 0 && meta.hash.is_some() != self.freed_at.contains_key(&(b as BlockId)) {
                return Err(format!("block {b}: free, but cached state and LRU disagree"));
            }
            if let Some(h) = meta.hash {
                if self.cached.get(&h) != Some(&(b as BlockId)) {
                    return Err(format!("block {b}: hash not registered to it"));
                }
            }
        }
        if self.cached.len() != self.blocks.iter().filter(|m| m.hash.is_some()).count() {
            return Err("the hash map holds blocks that are not cached".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "block_manager_tests.rs"]
mod tests;
