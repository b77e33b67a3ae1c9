//! What the engine counts, for the server's `/metrics` (`vllm:*` names) and for logs.

use crate::generate::FinishReason;

/// A fixed-bucket histogram in the Prometheus shape: `counts[i]` observations fell in
/// `(bounds[i - 1], bounds[i]]`, the last count is the `+Inf` bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Counts at or below each bound, then the total (Prometheus `_bucket{le=...}`).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }
}

/// Seconds from arrival to the first token (`vllm:time_to_first_token_seconds`).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0,
];
/// Seconds between consecutive tokens of a request (`vllm:inter_token_latency_seconds`).
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
];
/// Seconds from arrival to finish (`vllm:e2e_request_latency_seconds`).
pub const E2E_BUCKETS: &[f64] = &[
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0,
];

/// Finished requests by reason (`vllm:request_success_total{finished_reason=...}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishCounts {
    pub stop: u64,
    pub length: u64,
    pub abort: u64,
    pub error: u64,
}

impl FinishCounts {
    pub fn record(&mut self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => self.stop += 1,
            FinishReason::Length => self.length += 1,
            FinishReason::Abort => self.abort += 1,
            FinishReason::Error => self.error += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.stop + self.length + self.abort + self.error
    }
}

/// A snapshot of the engine, refreshed after every step.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    /// `vllm:num_requests_running`.
    pub num_running: usize,
    /// `vllm:num_requests_waiting` (preempted ones included).
    pub num_waiting: usize,
    /// Fraction of KV blocks in use, 0..=1 (`vllm:kv_cache_usage_perc`).
    pub kv_cache_usage: f64,
    pub num_kv_blocks: usize,
    pub block_size: usize,
    /// Prompt tokens of requests that reached their first token (`vllm:prompt_tokens_total`).
    pub prompt_tokens_total: u64,
    /// Tokens emitted, forced ones included (`vllm:generation_tokens_total`).
    pub generation_tokens_total: u64,
    /// Tokens looked up in / served from the prefix cache (`vllm:prefix_cache_queries_total`,
    /// `vllm:prefix_cache_hits_total`).
    pub prefix_cache_queries_total: u64,
    pub prefix_cache_hits_total: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions_total: u64,
    pub requests_finished: FinishCounts,
    /// Engine steps run, and tokens they computed (recomputation included).
    pub steps_total: u64,
    pub computed_tokens_total: u64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
}

impl EngineStats {
    pub fn new(num_kv_blocks: usize, block_size: usize) -> Self {
        Self {
            num_running: 0,
            num_waiting: 0,
            kv_cache_usage: 0.0,
            num_kv_blocks,
            block_size,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
            prefix_cache_queries_total: 0,
            prefix_cache_hits_total: 0,
            preemptions_total: 0,
            requests_finished: FinishCounts::default(),
            steps_total: 0,
            computed_tokens_total: 0,
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, [2, 1, 1]);
        assert_eq!(h.cumulative(), [2, 3, 4]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 3.65).abs() < 1e-12);
    }
}
