//! Steady-state decode allocates no buffers: after a warm-up step, a one-token forward pass on
//! every architecture allocates only the batch's small descriptors, never activations, logits or
//! anything sized by the model.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use r1serve_kernels::{CpuBackend, PagedKvCache};
use r1serve_model::{load_model, Batch, LogitsWanted, SeqInput};

struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Per-step budget: the batch and span vectors of one sequence (80-88 bytes today); any
/// activation or logits buffer of these models is larger.
const MAX_BYTES_PER_STEP: usize = 128;

#[test]
fn decode_steps_allocate_no_buffers() {
    check_all_architectures();
}

/// Starts the compute pool and waits until every helper thread has run a task: a helper's own
/// start-up (thread-locals, its name) allocates, and under load it could otherwise land inside a
/// measured step. (A helper still starting when a job ends joins a later one, hence the retries.)
fn start_pool_helpers() {
    use std::time::{Duration, Instant};
    let threads = r1serve_kernels::cpu::pool::threads();
    for _ in 0..100 {
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        r1serve_kernels::cpu::pool::for_each(threads, |_| {
            seen.lock().unwrap().insert(std::thread::current().id());
            let deadline = Instant::now() + Duration::from_millis(100);
            while seen.lock().unwrap().len() < threads && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        });
        if seen.lock().unwrap().len() == threads {
            return;
        }
    }
    panic!("the compute pool's helpers never joined a job");
}

fn check_all_architectures() {
    start_pool_helpers();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in ["llama-f32", "qwen2-bf16", "dsv3-f32", "dsv3-fp8", "dsv2-f32"] {
        let model = load_model(fixtures.join(name), Arc::new(CpuBackend::default())).unwrap();
        let table: Vec<u32> = (0..4).collect();
        let mut cache = PagedKvCache::new(16, 4, &model.kv_entry_widths());
        let mut logits = Vec::new();
        let prompt = [0u32, 5, 9, 12];
        let prefill = SeqInput {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
            logits: LogitsWanted::Last,
        };
        model.forward(&Batch::single(prefill), &mut cache, &mut logits).unwrap();
        // Warm-up decode step, then measured ones.
        for pos in 4..12 {
            let token = [7u32];
            let batch = Batch::single(SeqInput {
                tokens: &token,
                start_pos: pos,
                block_table: &table,
                logits: LogitsWanted::Last,
            });
            let (bytes_before, calls_before) = (BYTES.load(Ordering::Relaxed), CALLS.load(Ordering::Relaxed));
            model.forward(&batch, &mut cache, &mut logits).unwrap();
            let (bytes, calls) = (
                BYTES.load(Ordering::Relaxed) - bytes_before,
                CALLS.load(Ordering::Relaxed) - calls_before,
            );
            if pos > 4 {
                assert!(
                    bytes <= MAX_BYTES_PER_STEP,
                    "{name}: decode step at {pos} allocated {bytes} bytes in {calls} calls"
                );
            }
        }
    }
}
