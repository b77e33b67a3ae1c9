//! The compute pool: the calling thread plus `threads - 1` helpers that spin (yielding to any
//! other runnable thread) for a while between jobs before they sleep.
//!
//! A decode step is a few hundred short parallel loops (one per matmul, norm-sized gaps between
//! them). Through a work-stealing pool each loop wakes a sleeping worker and puts the caller to
//! sleep until the last chunk is done: futex round trips and scheduler work were ~14% of a Q4_K_M
//! decode's samples on 2 cores (docs/performance.md). Here the caller works on its own job and the helpers are usually still spinning
//! when the next one comes, so neither side sleeps inside a step.
//!
//! One job runs at a time: a job submitted while another runs (another engine's thread, or a
//! task submitting from inside a job) runs on its caller alone, so callers never wait for each
//! other and nothing can deadlock.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps: longer than the gaps inside a decode step,
/// short enough that an idle server or a test binary gets its cores back at once.
const SPIN: Duration = Duration::from_micros(500);

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();
static HELPERS: Once = Once::new();

/// Sets how many threads (the caller included) run each job. It takes effect only before the
/// pool's first job; later calls return false.
pub fn set_threads(threads: usize) -> bool {
    if POOL.get().is_some() {
        return false;
    }
    THREADS.store(threads.max(1), SeqCst);
    true
}

/// The threads that run each job: [`set_threads`], else one per core.
pub fn threads() -> usize {
    // Asked once: `available_parallelism` reads the cgroup's CPU quota from files (system calls
    // and allocations), and the kernels ask on every call.
    static CORES: OnceLock<usize> = OnceLock::new();
    match THREADS.load(SeqCst) {
        0 => *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    }
}

/// The pool, started (helpers spawned) on first use.
fn pool() -> &'static Pool {
    let pool = POOL.get_or_init(|| Pool::new(threads()));
    HELPERS.call_once(|| pool.spawn_helpers());
    pool
}

/// Runs `task(i)` for every `i < tasks` on the pool's threads, the caller's included, and
/// returns when all are done. Tasks are claimed one at a time, so uneven ones balance out.
pub fn for_each(tasks: usize, task: impl Fn(usize) + Sync) {
    if tasks <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let pool = pool();
    if pool.helpers == 0 || pool.busy.swap(true, SeqCst) {
        (0..tasks).for_each(task);
        return;
    }
    pool.run(tasks, &task);
}

/// Runs `f` with every job it submits run on this thread alone (for one-thread measurements):
/// it holds the pool, so jobs submitted meanwhile from other threads run on their callers too.
pub fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    let pool = pool();
    while pool.busy.swap(true, SeqCst) {
        std::thread::yield_now();
    }
    struct Release(&'static Pool);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.busy.store(false, SeqCst);
        }
    }
    let _release = Release(pool);
    f()
}

/// Runs `task(i, chunk)` over the `chunk`-sized pieces of `data` (the last may be shorter), in
/// parallel as [`for_each`] does.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    let chunks = DisjointChunks::new(data, chunk);
    for_each(chunks.len(), |i| {
        // SAFETY: `for_each` runs each index once.
        task(i, unsafe { chunks.get(i) })
    });
}

/// A mutable slice cut into `chunk`-sized pieces that parallel tasks take one each.
pub(crate) struct DisjointChunks<'a, T> {
    base: *mut T,
    len: usize,
    chunk: usize,
    _data: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the pieces handed out are disjoint (see `get`), so sharing the cutter between threads
// shares no element.
unsafe impl<T: Send> Sync for DisjointChunks<'_, T> {}

impl<'a, T> DisjointChunks<'a, T> {
    pub(crate) fn new(data: &'a mut [T], chunk: usize) -> Self {
        Self {
            base: data.as_mut_ptr(),
            len: data.len(),
            chunk: chunk.max(1),
            _data: std::marker::PhantomData,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Piece `i` (empty past the end).
    ///
    /// # Safety
    /// No two live results may come from the same `i`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self, i: usize) -> &'a mut [T] {
        let start = (i * self.chunk).min(self.len);
        let end = (start + self.chunk).min(self.len);
        // SAFETY: `start..end` lies inside the slice borrowed for 'a, and the caller takes each
        // piece once.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), end - start) }
    }
}

/// The running job, as the helpers see it. `task` borrows the caller's closure: it is valid
/// while the job is open and until every helper that joined it has left (`active == 0`).
struct Job {
    task: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Pool {
    helpers: usize,
    /// Held by the caller whose job runs.
    busy: AtomicBool,
    /// `epoch << 1 | open`: a new value for each job opened and closed.
    state: AtomicUsize,
    job: Mutex<Option<JobRef>>,
    next: AtomicUsize,
    /// Helpers inside the current job.
    active: AtomicUsize,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    wake: Condvar,
    sleep_lock: Mutex<()>,
}

#[derive(Clone, Copy)]
struct JobRef(*const Job);
// SAFETY: the job it points to is only read, and only while it is alive (see `Job`).
unsafe impl Send for JobRef {}

impl Pool {
    fn new(threads: usize) -> Self {
        Pool {
            helpers: threads.saturating_sub(1),
            busy: AtomicBool::new(false),
            state: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            wake: Condvar::new(),
            sleep_lock: Mutex::new(()),
        }
    }

    /// The helpers live as long as the process: the pool is a static.
    fn spawn_helpers(&'static self) {
        for index in 0..self.helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("r1serve-compute-{index}"))
                .spawn(move || helper(self));
            if spawned.is_err() {
                // Fewer helpers only means less parallelism: jobs still finish on their callers.
                break;
            }
        }
    }

    /// Opens the job, works on it, closes it, waits for the helpers to leave it and frees the
    /// pool for the next caller (`busy` is held on entry).
    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; `Job` documents how long the pointer is used,
        // and this function does not return (or unwind) before that.
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        let job = Job { task, tasks };
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobRef(&job));
        self.next.store(0, SeqCst);
        let epoch = (self.state.load(SeqCst) >> 1) + 1;
        self.state.store(epoch << 1 | 1, SeqCst);
        if self.sleeping.load(SeqCst) > 0 {
            let _guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        // Closing, waiting and freeing also happen if `task` panics on this thread: the helpers
        // must be out of `job` before it goes out of scope.
        struct Close<'a>(&'a Pool, usize);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                let (pool, epoch) = (self.0, self.1);
                pool.state.store(epoch << 1, SeqCst);
                while pool.active.load(SeqCst) != 0 {
                    std::hint::spin_loop();
                }
                *pool.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
                pool.busy.store(false, SeqCst);
            }
        }
        let close = Close(self, epoch);
        work(&self.next, &job);
        drop(close);
        if self.panicked.swap(false, SeqCst) {
            panic!("a compute-pool task panicked on a helper thread");
        }
    }

    /// Waits until `state` differs from `seen`: spinning for [`SPIN`], then asleep.
    fn wait_for_change(&self, seen: usize) -> usize {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let state = self.state.load(SeqCst);
            if state != seen {
                return state;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(64) {
                if start.elapsed() > SPIN {
                    break;
                }
                // Let any other runnable thread (the server's I/O, a client on the same cores)
                // have the core; with none, this returns at once.
                std::thread::yield_now();
            }
        }
        let mut guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.fetch_add(1, SeqCst);
        let state = loop {
            let state = self.state.load(SeqCst);
            if state != seen {
                break state;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        self.sleeping.fetch_sub(1, SeqCst);
        state
    }
}

/// Claims and runs tasks until none are left.
fn work(next: &AtomicUsize, job: &Job) {
    loop {
        let i = next.fetch_add(1, SeqCst);
        if i >= job.tasks {
            return;
        }
        // SAFETY: `job.task` is alive while the job is open or this thread is counted in
        // `active` (see `Job`); the caller's own thread holds it for the whole call.
        unsafe { (*job.task)(i) };
    }
}

fn helper(pool: &Pool) {
    // Start from the current epoch's closed state, so that a job already open when this helper
    // starts (the one whose submission spawned it) counts as a change and is joined.
    let mut seen = pool.state.load(SeqCst) & !1;
    loop {
        let state = pool.wait_for_change(seen);
        seen = state;
        if state & 1 == 0 {
            continue;
        }
        // Joining: count in first, then check the job is still the open one. The caller closes
        // first and then waits for `active` to drop, so either it sees this helper counted in or
        // this helper sees the job closed (both sides use SeqCst).
        pool.active.fetch_add(1, SeqCst);
        if pool.state.load(SeqCst) == state {
            let job = *pool.job.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(JobRef(job)) = job {
                // SAFETY: the job is open and this helper is counted in `active`, so the caller
                // keeps `job` alive until this helper leaves.
                let job = unsafe { &*job };
                if catch_unwind(AssertUnwindSafe(|| work(&pool.next, job))).is_err() {
                    pool.panicked.store(true, SeqCst);
                }
            }
        }
        pool.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_exactly_once() {
        for tasks in [0usize, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
            for_each(tasks, |i| {
                counts[i].fetch_add(1, SeqCst);
            });
            assert!(counts.iter().all(|c| c.load(SeqCst) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let mut data = vec![0u32; 1001];
        for_each_chunk_mut(&mut data, 64, |i, piece| {
            for (j, v) in piece.iter_mut().enumerate() {
                *v += (i * 64 + j) as u32 + 1;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
    }

    #[test]
    fn nested_and_concurrent_jobs_finish() {
        // A job submitted from inside a job, and jobs from several threads at once, run on their
        // callers instead of waiting for the pool.
        let total = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        for_each(8, |_| {
                            for_each(4, |k| {
                                total.fetch_add(k as u64 + 1, SeqCst);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 50 * 8 * 10);
    }

    #[test]
    fn single_threaded_runs_every_task_on_the_caller() {
        let caller = std::thread::current().id();
        let elsewhere = AtomicU64::new(0);
        single_threaded(|| {
            for_each(64, |_| {
                if std::thread::current().id() != caller {
                    elsewhere.fetch_add(1, SeqCst);
                }
            })
        });
        assert_eq!(elsewhere.load(SeqCst), 0);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_still_works() {
        let result = catch_unwind(|| {
            for_each(64, |i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(result.is_err());
        let sum = AtomicU64::new(0);
        for_each(100, |i| {
            sum.fetch_add(i as u64, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 4950);
    }
}
