//! The machine's memory read bandwidth, measured the way decode reads weights: every thread
//! streams its share of a buffer much larger than the caches.
//!
//! On a shared machine the bandwidth left to this process moves from minute to minute (on the
//! 2-core cloud machine of docs/performance.md the same probe read 31 GB/s and 57 GB/s within a
//! quarter of an hour), so a benchmark samples it next to each timed run ([`ReadProbe`]) rather
//! than once before them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::pool;

/// A buffer kept for repeated bandwidth samples: allocated and paged in once, so that a sample
/// costs only its reads.
pub struct ReadProbe {
    buffer: Vec<u64>,
}

impl ReadProbe {
    /// A probe over `bytes` (at least 8 KiB), its pages touched (written with distinct values, so
    /// that no page is shared or compressed away) and read once to warm the page tables.
    pub fn new(bytes: usize) -> Self {
        let words = (bytes / 8).max(1024);
        let buffer = (0..words as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let probe = Self { buffer };
        probe.read_once();
        probe
    }

    /// Reads the buffer `passes` times (at least once) on the compute pool; returns the median
    /// read bandwidth in GB/s (10^9 bytes per second).
    pub fn sample(&self, passes: usize) -> f64 {
        let mut rates: Vec<f64> = (0..passes.max(1)).map(|_| self.read_once()).collect();
        median(&mut rates)
    }

    /// One pass over the buffer, in GB/s.
    fn read_once(&self) -> f64 {
        let words = self.buffer.len();
        let chunk = words.div_ceil(pool::threads() * 4).max(1024);
        let start = Instant::now();
        let checksum = AtomicU64::new(0);
        pool::for_each(words.div_ceil(chunk), |i| {
            let part = &self.buffer[i * chunk..((i + 1) * chunk).min(words)];
            checksum.fetch_xor(part.iter().fold(0u64, |acc, &v| acc ^ v), Ordering::Relaxed);
        });
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(checksum);
        (words * 8) as f64 / seconds / 1e9
    }
}

/// The median of `values` (the upper one of an even count); NaN for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_positive_finite_rate() {
        let probe = ReadProbe::new(1 << 20);
        assert!((0..3).map(|_| probe.sample(1)).all(|r| r.is_finite() && r > 0.0));
    }

    #[test]
    fn median_takes_the_middle_value() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&mut []).is_nan());
    }
}
