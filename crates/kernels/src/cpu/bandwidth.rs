//! The machine's memory read bandwidth, measured the way decode reads weights: every thread
//! streams its share of a buffer much larger than the caches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::pool;

/// Reads a `bytes`-sized buffer `repetitions` times on the compute pool; returns the
/// median read bandwidth in GB/s (10^9 bytes per second).
pub fn measure_read_bandwidth(bytes: usize, repetitions: usize) -> f64 {
    let words = (bytes / 8).max(1024);
    // Distinct values so no page is shared or compressed away.
    let buffer: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let chunk = words.div_ceil(pool::threads() * 4).max(1024);
    let mut rates: Vec<f64> = (0..repetitions.max(1) + 1)
        .map(|_| {
            let start = Instant::now();
            let checksum = AtomicU64::new(0);
            pool::for_each(words.div_ceil(chunk), |i| {
                let part = &buffer[i * chunk..((i + 1) * chunk).min(words)];
                checksum.fetch_xor(part.iter().fold(0u64, |acc, &v| acc ^ v), Ordering::Relaxed);
            });
            let seconds = start.elapsed().as_secs_f64();
            std::hint::black_box(checksum);
            (words * 8) as f64 / seconds / 1e9
        })
        .collect();
    // The first pass warms the page tables; drop it.
    rates.remove(0);
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_a_positive_finite_rate() {
        let rate = super::measure_read_bandwidth(1 << 20, 2);
        assert!(rate.is_finite() && rate > 0.0);
    }
}
