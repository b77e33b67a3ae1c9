use super::*;
use crate::generate::FinishReason;
use crate::sequence::Request;

/// A sequence whose prompt tokens are unique to `id` unless `shared` leading tokens are given.
fn seq(id: SeqId, shared: &[u32], prompt_len: usize, max_tokens: usize) -> Sequence {
    let mut prompt = shared.to_vec();
    prompt.extend((prompt.len()..prompt_len).map(|i| (id * 1000 + i as u64) as u32));
    Sequence::new(id, Request::new(prompt, max_tokens), &[]).unwrap()
}

fn scheduler(block_size: usize, num_blocks: usize, max_num_seqs: usize, max_tokens: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: max_tokens,
        },
        BlockManager::new(block_size, num_blocks, true),
    )
}

/// One engine step with a model that always answers token 7: checks the invariants, completes
/// the scheduled chunks, appends a token where a chunk reached the end, retires finished ones.
fn step(s: &mut Scheduler, finished: &mut Vec<Sequence>) -> Vec<(SeqId, usize, usize)> {
    let out = s.schedule();
    assert!(out.num_tokens() <= s.config().max_num_batched_tokens);
    assert!(s.num_running() <= s.config().max_num_seqs);
    for sc in &out.scheduled {
        assert!(s.writes_are_private(sc), "{sc:?} writes into a shared or cached block");
        s.complete(sc);
        let seq = &mut s.running_mut()[sc.index];
        if seq.num_uncomputed() == 0 {
            seq.push_token(7);
            if let Some(reason) = seq.stop_reason() {
                seq.status = SeqStatus::Finished(reason);
            }
        }
    }
    s.block_manager().check_consistency().unwrap();
    finished.extend(s.take_finished());
    out.scheduled.iter().map(|x| (x.id, x.start, x.len)).collect()
}

#[test]
fn admits_fifo_within_max_num_seqs() {
    let mut s = scheduler(4, 64, 2, 100);
    for id in 1..=3 {
        s.add(seq(id, &[], 5, 3));
    }
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 5), (2, 0, 5)]);
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(step(&mut s, &mut done), [(1, 5, 1), (2, 5, 1)]);
    assert_eq!(step(&mut s, &mut done), [(1, 6, 1), (2, 6, 1)]);
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|d| d.status == SeqStatus::Finished(FinishReason::Length)));
    assert_eq!(done[0].output(), &[7, 7, 7]);
    assert_eq!(step(&mut s, &mut done), [(3, 0, 5)]);
}

#[test]
fn chunked_prefill_splits_a_long_prompt() {
    let mut s = scheduler(4, 64, 8, 4);
    s.add(seq(1, &[], 10, 2));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 4)]);
    assert_eq!(s.running()[0].num_generated(), 0, "no token before the prompt is done");
    assert_eq!(step(&mut s, &mut done), [(1, 4, 4)]);
    assert_eq!(step(&mut s, &mut done), [(1, 8, 2)]);
    assert_eq!(s.running()[0].num_generated(), 1);
    assert_eq!(step(&mut s, &mut done), [(1, 10, 1)]);
    assert_eq!(done.len(), 1);
}

#[test]
fn decodes_go_before_prefill_chunks() {
    let mut s = scheduler(4, 64, 8, 4);
    s.add(seq(1, &[], 2, 10));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 2)]);
    s.add(seq(2, &[], 10, 10));
    s.add(seq(3, &[], 10, 10));
    // The decode takes 1 token; the new prompt gets the rest of the budget; 3 waits.
    assert_eq!(step(&mut s, &mut done), [(1, 2, 1), (2, 0, 3)]);
    assert_eq!(step(&mut s, &mut done), [(1, 3, 1), (2, 3, 3)]);
    assert_eq!(step(&mut s, &mut done), [(1, 4, 1), (2, 6, 3)]);
    // 2 finishes its prompt (1 token) and 3 starts with what is left.
    assert_eq!(step(&mut s, &mut done), [(1, 5, 1), (2, 9, 1), (3, 0, 2)]);
    // Now 1 and 2 both decode; they go first.
    assert_eq!(step(&mut s, &mut done), [(1, 6, 1), (2, 10, 1), (3, 2, 2)]);
}

#[test]
fn preemption_recomputes_the_newest_and_keeps_its_output() {
    // 4 blocks of 2 slots; each sequence needs 3 + 4 - 1 = 6 slots = 3 blocks at the end.
    let mut s = scheduler(2, 4, 8, 64);
    s.add(seq(1, &[], 3, 4));
    s.add(seq(2, &[], 3, 4));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 3), (2, 0, 3)]);
    assert_eq!(step(&mut s, &mut done), [(1, 3, 1), (2, 3, 1)]);
    // 1 needs a third block: 2 (the newest) is preempted with its two tokens kept.
    let out = s.schedule();
    assert_eq!(out.preempted, [2]);
    assert_eq!(out.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(), [1]);
    let waiting: Vec<_> = s.waiting().collect();
    assert_eq!(waiting[0].id, 2);
    assert_eq!(waiting[0].num_generated(), 2);
    assert_eq!(waiting[0].num_computed(), 0);
    assert_eq!(waiting[0].status(), SeqStatus::Waiting);
    for sc in &out.scheduled {
        s.complete(sc);
        s.running_mut()[sc.index].push_token(7);
    }
    for _ in 0..20 {
        if !s.has_work() {
            break;
        }
        step(&mut s, &mut done);
    }
    assert!(!s.has_work());
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|d| d.output() == [7, 7, 7, 7]), "{done:?}");
    assert!(s.counters().preemptions >= 1);
    assert_eq!(s.block_manager().usage(), 0.0);
}

#[test]
fn a_sequence_with_no_victim_left_preempts_itself() {
    // 3 blocks of 2 slots; each sequence needs 2 + 3 - 1 = 4 slots = 2 blocks at the end.
    let mut s = scheduler(2, 3, 8, 64);
    s.add(seq(1, &[], 2, 3));
    s.add(seq(2, &[], 2, 3));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 2), (2, 0, 2)]);
    // 1 takes the last block; 2 needs one too and the only other sequence is already scheduled.
    let out = s.schedule();
    assert_eq!(out.preempted, [2]);
    assert_eq!(out.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(), [1]);
    for sc in &out.scheduled {
        s.complete(sc);
        s.running_mut()[sc.index].push_token(7);
    }
    while s.has_work() {
        step(&mut s, &mut done);
    }
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|d| d.output() == [7, 7, 7]));
}

#[test]
fn remove_frees_blocks_of_running_and_waiting_sequences() {
    let mut s = scheduler(4, 16, 1, 64);
    s.add(seq(1, &[], 9, 5));
    s.add(seq(2, &[], 9, 5));
    let mut done = Vec::new();
    step(&mut s, &mut done);
    assert!(s.block_manager().usage() > 0.0);
    assert_eq!(s.remove(2).map(|q| q.id), Some(2));
    assert_eq!(s.remove(1).map(|q| q.id), Some(1));
    assert!(s.remove(1).is_none());
    assert_eq!(s.block_manager().usage(), 0.0);
    assert!(!s.has_work());
    s.block_manager().check_consistency().unwrap();
}

#[test]
fn shared_prefix_is_reused_and_reported() {
    let mut s = scheduler(4, 32, 8, 64);
    let shared: Vec<u32> = (500..509).collect(); // 9 tokens: two full blocks
    s.add(seq(1, &shared, 12, 2));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, 12)]);
    s.add(seq(2, &shared, 10, 2));
    // The two full shared blocks are reused: computing starts at position 8.
    assert_eq!(step(&mut s, &mut done), [(1, 12, 1), (2, 8, 2)]);
    let two = s.running().iter().find(|q| q.id == 2).unwrap();
    assert_eq!(two.num_cached_tokens(), 8);
    assert_eq!(
        &two.block_table().blocks()[..2],
        &s.running()[0].block_table().blocks()[..2]
    );
    assert_eq!(s.counters().prefix_cache_hits, 8);
    assert_eq!(s.counters().prefix_cache_queries, 22);
    while s.has_work() {
        step(&mut s, &mut done);
    }
    assert_eq!(done.iter().find(|q| q.id == 2).unwrap().usage().cached_tokens, 8);
    assert_eq!(s.block_manager().usage(), 0.0);
}

#[test]
fn prompt_logprobs_requests_skip_the_prefix_cache() {
    let mut s = scheduler(4, 32, 8, 64);
    let shared: Vec<u32> = (500..509).collect();
    s.add(seq(1, &shared, 12, 1));
    let mut done = Vec::new();
    step(&mut s, &mut done);
    let mut scored = seq(2, &shared, 12, 1);
    scored.prompt_logprobs = Some(0);
    s.add(scored);
    assert_eq!(step(&mut s, &mut done), [(2, 0, 12)]);
}

#[test]
fn prompt_scoring_chunks_are_capped() {
    let mut s = scheduler(16, 256, 8, 2048);
    let mut scored = seq(1, &[], 600, 1);
    scored.prompt_logprobs = Some(0);
    s.add(scored);
    s.add(seq(2, &[], 600, 1));
    let mut done = Vec::new();
    assert_eq!(step(&mut s, &mut done), [(1, 0, SCORING_CHUNK), (2, 0, 600)]);
}

#[test]
fn random_traffic_keeps_every_invariant() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    let shared: Vec<u32> = (900..940).collect();
    let mut s = scheduler(4, 40, 6, 24);
    let mut done = Vec::new();
    let mut added = 0u64;
    for _ in 0..2000 {
        if added < 60 && next(3) == 0 {
            added += 1;
            let share = next(shared.len() as u64) as usize;
            let len = share + 1 + next(30) as usize;
            s.add(seq(added, &shared[..share], len, 1 + next(40) as usize));
        }
        if next(25) == 0 {
            let ids = s.ids();
            if !ids.is_empty() {
                let victim = ids[next(ids.len() as u64) as usize];
                s.remove(victim);
                s.block_manager().check_consistency().unwrap();
            }
        }
        step(&mut s, &mut done);
        if added == 60 && !s.has_work() {
            break;
        }
    }
    assert!(!s.has_work(), "every request finished");
    assert!(done.len() > 40);
    for d in &done {
        assert_eq!(d.num_generated(), d.max_tokens, "{d:?}");
    }
    assert!(
        s.counters().preemptions > 0 && s.counters().prefix_cache_hits > 0,
        "{:?}",
        s.counters()
    );
    assert_eq!(s.block_manager().usage(), 0.0);
}
