use super::*;

fn computed(bm: &mut BlockManager, tokens: &[u32]) -> BlockTable {
    let mut table = BlockTable::default();
    let prefix = bm.match_prefix(tokens);
    bm.allocate(&mut table, prefix, tokens.len()).unwrap();
    bm.commit(&mut table, tokens, tokens.len());
    bm.check_consistency().unwrap();
    table
}

#[test]
fn allocate_and_free_plain_blocks() {
    let mut bm = BlockManager::new(4, 8, false);
    let mut table = BlockTable::default();
    assert_eq!(bm.allocate(&mut table, PrefixMatch::default(), 10), Ok(0));
    assert_eq!(table.blocks(), &[0, 1, 2]);
    assert_eq!(bm.usage(), 3.0 / 8.0);
    bm.append(&mut table, 12).unwrap();
    assert_eq!(table.len(), 3, "12 slots still fit in 3 blocks");
    bm.append(&mut table, 13).unwrap();
    assert_eq!(table.len(), 4);
    bm.check_consistency().unwrap();
    bm.free(&mut table);
    assert!(table.is_empty());
    assert_eq!(bm.usage(), 0.0);
    bm.check_consistency().unwrap();
}

#[test]
fn allocation_is_all_or_nothing() {
    let mut bm = BlockManager::new(4, 3, true);
    let mut a = BlockTable::default();
    bm.allocate(&mut a, PrefixMatch::default(), 8).unwrap();
    assert!(bm.can_append(&a, 12));
    assert!(!bm.can_append(&a, 13));
    assert_eq!(
        bm.append(&mut a, 13),
        Err(BlockError::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(a.len(), 2, "nothing taken on failure");
    let mut b = BlockTable::default();
    assert!(!bm.can_allocate(&PrefixMatch::default(), 5));
    assert!(bm.allocate(&mut b, PrefixMatch::default(), 5).is_err());
    assert!(b.is_empty());
    assert_eq!(
        bm.allocate(&mut a, PrefixMatch::default(), 1),
        Err(BlockError::TableNotEmpty)
    );
    bm.check_consistency().unwrap();
}

#[test]
fn shared_prefix_reuses_full_blocks_only() {
    let mut bm = BlockManager::new(4, 16, true);
    let a_tokens: Vec<u32> = (0..10).collect();
    let a = computed(&mut bm, &a_tokens);
    // B shares the first 9 tokens: two full blocks (8 tokens) are reused, the partial one not.
    let b_tokens: Vec<u32> = (0..9).chain([99, 98, 97]).collect();
    let prefix = bm.match_prefix(&b_tokens);
    assert_eq!(prefix.num_blocks(), 2);
    let mut b = BlockTable::default();
    assert_eq!(bm.allocate(&mut b, prefix, b_tokens.len()), Ok(8));
    assert_eq!(&b.blocks()[..2], &a.blocks()[..2]);
    assert_ne!(b.blocks()[2], a.blocks()[2]);
    assert_eq!(bm.ref_count(a.blocks()[0]), 2);
    assert_eq!(bm.ref_count(a.blocks()[2]), 1);
    bm.check_consistency().unwrap();
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let mut bm = BlockManager::new(4, 16, true);
    let tokens: Vec<u32> = (0..8).collect();
    let _a = computed(&mut bm, &tokens);
    // All 8 tokens are cached, but the last must be computed for logits: only block 0 is reused.
    assert_eq!(bm.match_prefix(&tokens).num_blocks(), 1);
    let longer: Vec<u32> = (0..9).collect();
    assert_eq!(bm.match_prefix(&longer).num_blocks(), 2);
}

#[test]
fn hashes_are_chained() {
    let mut bm = BlockManager::new(2, 16, true);
    let _a = computed(&mut bm, &[1, 2, 3, 4, 5]);
    // Same second block after a different first block: no hit at all.
    assert_eq!(bm.match_prefix(&[9, 9, 3, 4, 5]).num_blocks(), 0);
    assert_eq!(bm.match_prefix(&[1, 2, 3, 4, 5]).num_blocks(), 2);
    assert_eq!(bm.match_prefix(&[1, 2, 3, 7, 5]).num_blocks(), 1);
}

#[test]
fn freed_cached_blocks_stay_reusable_until_evicted_lru() {
    let mut bm = BlockManager::new(2, 4, true);
    let mut a = computed(&mut bm, &[1, 2, 3, 4]);
    bm.free(&mut a);
    assert_eq!(bm.usage(), 0.0, "cached free blocks count as free");
    assert_eq!(bm.match_prefix(&[1, 2, 3, 4, 5]).num_blocks(), 2);
    // Reviving cached blocks takes them off the free list.
    let mut b = BlockTable::default();
    let prefix = bm.match_prefix(&[1, 2, 3, 4, 5]);
    assert!(bm.can_allocate(&prefix, 5));
    assert_eq!(bm.allocate(&mut b, prefix, 5), Ok(4));
    assert_eq!(bm.num_free_blocks(), 1);
    bm.check_consistency().unwrap();
    bm.free(&mut b);
    // Two plain blocks are used first, then eviction takes the last-freed-first tail block
    // ([3, 4], freed before [1, 2]), so the head of the chain survives longest.
    let mut c = BlockTable::default();
    bm.allocate(&mut c, PrefixMatch::default(), 6).unwrap();
    assert_eq!(bm.match_prefix(&[1, 2, 3, 4, 5]).num_blocks(), 1);
    bm.check_consistency().unwrap();
    let mut d = BlockTable::default();
    bm.allocate(&mut d, PrefixMatch::default(), 2).unwrap();
    assert_eq!(bm.match_prefix(&[1, 2, 3, 4, 5]).num_blocks(), 0);
    bm.check_consistency().unwrap();
}

#[test]
fn shared_and_cached_blocks_are_never_writable() {
    let mut bm = BlockManager::new(4, 16, true);
    let tokens: Vec<u32> = (0..6).collect();
    let mut a = BlockTable::default();
    bm.allocate(&mut a, PrefixMatch::default(), 6).unwrap();
    assert!(bm.writable(&a, 0..6));
    bm.commit(&mut a, &tokens, 6);
    // Block 0 is full and cached now: immutable. Block 1 (positions 4..8) stays private.
    assert!(!bm.writable(&a, 3..5));
    assert!(bm.writable(&a, 6..8));
    let b_tokens: Vec<u32> = (0..5).chain([50, 51]).collect();
    let mut b = BlockTable::default();
    let prefix = bm.match_prefix(&b_tokens);
    let cached = bm.allocate(&mut b, prefix, b_tokens.len()).unwrap();
    assert_eq!(cached, 4);
    // B computes from its first uncached position: writable; its shared block is not.
    assert!(bm.writable(&b, cached..b_tokens.len()));
    assert!(!bm.writable(&b, 0..cached));
    assert!(!bm.writable(&b, 0..b_tokens.len() + 8), "beyond the table");
}

#[test]
fn same_prefix_computed_twice_registers_once() {
    let mut bm = BlockManager::new(2, 8, true);
    let tokens = [7, 8, 9];
    let mut a = computed(&mut bm, &tokens);
    // Allocated before A committed (same step): computes its own copy of the block.
    let mut b = BlockTable::default();
    bm.allocate(&mut b, PrefixMatch::default(), 3).unwrap();
    bm.commit(&mut b, &tokens, 3);
    bm.check_consistency().unwrap();
    assert!(bm.writable(&b, 0..2), "the duplicate stays private");
    bm.free(&mut a);
    bm.free(&mut b);
    bm.check_consistency().unwrap();
    assert_eq!(bm.usage(), 0.0);
    assert_eq!(bm.match_prefix(&tokens).num_blocks(), 1);
}

#[test]
fn no_prefix_caching_means_no_hits() {
    let mut bm = BlockManager::new(2, 8, false);
    let _a = computed(&mut bm, &[1, 2, 3, 4, 5]);
    assert_eq!(bm.match_prefix(&[1, 2, 3, 4, 5]).num_blocks(), 0);
}
