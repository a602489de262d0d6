//! `/metrics`: the engine's gauges, counters and latency histograms in the Prometheus text
//! format (version 0.0.4), named like vLLM's so existing dashboards map over.

use std::fmt::Write;

use crate::engine::{Histogram, Metrics};

/// Renders `m` for the model served as `model`.
pub fn render(m: &Metrics, model: &str) -> String {
    let label = format!("model_name=\"{}\"", escape(model));
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{label}}} {value}");
    };
    one("tulu_num_requests_running", "gauge", "Sequences admitted and generating.", m.running as f64);
    one("tulu_num_requests_waiting", "gauge", "Sequences queued, not yet admitted.", m.waiting as f64);
    one("tulu_kv_cache_blocks_used", "gauge", "KV cache blocks held by sequences.", m.kv_blocks_used as f64);
    one("tulu_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.", m.kv_blocks_total as f64);
    let usage = if m.kv_blocks_total == 0 { 0.0 } else { m.kv_blocks_used as f64 / m.kv_blocks_total as f64 };
    one("tulu_kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).", usage);
    one(
        "tulu_prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        m.prefix_queried_tokens as f64,
    );
    one(
        "tulu_prefix_cache_hits_total",
        "counter",
        "Prompt tokens found in the prefix cache.",
        m.prefix_hit_tokens as f64,
    );
    let rate =
        if m.prefix_queried_tokens == 0 { 0.0 } else { m.prefix_hit_tokens as f64 / m.prefix_queried_tokens as f64 };
    one("tulu_prefix_cache_hit_rate", "gauge", "Prefix-cache hits over queries, in tokens, since start.", rate);
    one("tulu_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", m.prompt_tokens as f64);
    one("tulu_generation_tokens_total", "counter", "Tokens generated.", m.generated_tokens as f64);
    one("tulu_request_finished_total", "counter", "Requests finished, for any reason.", m.requests_finished as f64);
    one("tulu_request_failed_total", "counter", "Requests that ended with an error.", m.requests_failed as f64);
    one("tulu_num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", m.preemptions as f64);
    one(
        "tulu_spec_decode_num_drafts_total",
        "counter",
        "Drafts verified (speculative decoding: one per speculating sequence and step).",
        m.spec_verified_drafts as f64,
    );
    one("tulu_spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed.", m.spec_draft_tokens as f64);
    one(
        "tulu_spec_decode_num_accepted_tokens_total",
        "counter",
        "Draft tokens accepted.",
        m.spec_accepted_tokens as f64,
    );
    one(
        "tulu_spec_decode_acceptance_rate",
        "gauge",
        "Draft tokens accepted over proposed since start (0 before any draft).",
        m.acceptance_rate().unwrap_or(0.0),
    );
    one(
        "tulu_spec_decode_mean_accepted_length",
        "gauge",
        "Draft tokens accepted per verified draft since start (0 before any draft).",
        m.mean_accepted_length().unwrap_or(0.0),
    );
    histogram(
        &mut out,
        "tulu_time_to_first_token_seconds",
        "Time from submission to first token.",
        &label,
        &m.time_to_first_token,
    );
    histogram(
        &mut out,
        "tulu_inter_token_latency_seconds",
        "Time between consecutive tokens of a sequence.",
        &label,
        &m.inter_token_latency,
    );
    out
}

/// A histogram with cumulative `le` buckets, `_sum` and `_count`, as Prometheus expects.
fn histogram(out: &mut String, name: &str, help: &str, label: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, count) in h.counts.iter().enumerate() {
        cumulative += count;
        let le = h.bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{label}}} {}\n{name}_count{{{label}}} {}", h.sum, h.count);
}

/// Escapes a label value (backslash, quote, newline), as the text format requires.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut m = Metrics::default();
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(100.0);
        let text = render(&m, "a\"b");
        assert!(
            text.contains("tulu_time_to_first_token_seconds_bucket{model_name=\"a\\\"b\",le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(text.contains("tulu_time_to_first_token_seconds_bucket{model_name=\"a\\\"b\",le=\"+Inf\"} 3"));
        assert!(text.contains("tulu_time_to_first_token_seconds_count{model_name=\"a\\\"b\"} 3"));
    }
}
