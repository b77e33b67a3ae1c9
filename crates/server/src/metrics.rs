//! `GET /metrics`: the engine's counters in the Prometheus text format under vLLM's names, each
//! sample labelled `model_name`, so dashboards built for vLLM work unchanged.

use std::fmt::Write;

use r1serve_engine::{EngineStats, Histogram};

/// Label value escaping (backslash, quote, newline).
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Writer {
    out: String,
    label: String,
}

impl Writer {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name}{{{}}} {value}", self.label);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name}{{{}}} {value}", self.label);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let cumulative = h.cumulative();
        for (bound, count) in h.bounds.iter().zip(&cumulative) {
            let _ = writeln!(self.out, "{name}_bucket{{{},le=\"{bound}\"}} {count}", self.label);
        }
        let total = cumulative.last().copied().unwrap_or(0);
        let _ = writeln!(self.out, "{name}_bucket{{{},le=\"+Inf\"}} {total}", self.label);
        let _ = writeln!(self.out, "{name}_sum{{{}}} {}", self.label, h.sum);
        let _ = writeln!(self.out, "{name}_count{{{}}} {}", self.label, h.count);
    }
}

/// The exposition text for one snapshot.
pub fn render(stats: &EngineStats, model_name: &str) -> String {
    let mut w = Writer {
        out: String::with_capacity(8 << 10),
        label: format!("model_name=\"{}\"", escape(model_name)),
    };
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        stats.num_running as f64,
    );
    w.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        stats.num_waiting as f64,
    );
    w.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        stats.kv_cache_usage,
    );
    w.counter(
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        stats.prompt_tokens_total,
    );
    w.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        stats.generation_tokens_total,
    );
    w.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        stats.prefix_cache_queries_total,
    );
    w.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        stats.prefix_cache_hits_total,
    );
    w.counter(
        "vllm:num_preemptions_total",
        "Cumulative number of preemptions from the engine.",
        stats.preemptions_total,
    );
    let finished = &stats.requests_finished;
    w.header(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, count) in [
        ("stop", finished.stop),
        ("length", finished.length),
        ("abort", finished.abort),
        ("error", finished.error),
    ] {
        let _ = writeln!(
            w.out,
            "vllm:request_success_total{{{},finished_reason=\"{reason}\"}} {count}",
            w.label
        );
    }
    w.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &stats.time_to_first_token,
    );
    w.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &stats.inter_token_latency,
    );
    // vLLM's older name for the same per-token latency.
    w.histogram(
        "vllm:time_per_output_token_seconds",
        "Histogram of time per output token in seconds (same samples as vllm:inter_token_latency_seconds).",
        &stats.inter_token_latency,
    );
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of end-to-end request latency in seconds.",
        &stats.e2e_request_latency,
    );
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_samples() {
        let mut stats = EngineStats::new(10, 16);
        stats.num_running = 2;
        stats.time_to_first_token.observe(0.003);
        let text = render(&stats, "m\"x");
        assert!(
            text.contains("vllm:num_requests_running{model_name=\"m\\\"x\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.005\"} 1"));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"m\\\"x\"} 1"));
        assert!(text.contains("vllm:request_success_total{model_name=\"m\\\"x\",finished_reason=\"stop\"} 0"));
    }
}
