//! Counters and latency histograms the engine keeps for `/metrics` and for benchmarks.

/// A latency histogram with fixed bucket bounds, in seconds (Prometheus-style).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending; a final `+Inf` bucket is implied.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more entry than `bounds` for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram { bounds: bounds.to_vec(), counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    /// Records one observation.
    pub fn observe(&mut self, secs: f64) {
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    /// The value below which a fraction `q` of observations fall, to bucket resolution.
    pub fn quantile(&self, q: f64) -> f64 {
        let target = (q * self.count as f64).ceil() as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target && c > 0 {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        0.0
    }
}

const LATENCY_BOUNDS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A snapshot of the engine's state and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Sequences admitted and generating.
    pub running: usize,
    /// Sequences queued, not yet admitted.
    pub waiting: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queried_tokens: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests finished (any reason).
    pub requests_finished: u64,
    /// Requests that ended with an error (of their own, or the engine's).
    pub requests_failed: u64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: u64,
    /// Drafts verified (speculative decoding: one per speculating sequence and step).
    pub spec_verified_drafts: u64,
    /// Draft tokens proposed in them.
    pub spec_draft_tokens: u64,
    /// Draft tokens accepted.
    pub spec_accepted_tokens: u64,
    /// Time from submission to first token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
}

impl Metrics {
    /// The fraction of draft tokens accepted (speculative decoding), if any were proposed.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.spec_draft_tokens > 0).then(|| self.spec_accepted_tokens as f64 / self.spec_draft_tokens as f64)
    }

    /// Draft tokens accepted per verified draft, if any.
    pub fn mean_accepted_length(&self) -> Option<f64> {
        (self.spec_verified_drafts > 0).then(|| self.spec_accepted_tokens as f64 / self.spec_verified_drafts as f64)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            running: 0,
            waiting: 0,
            kv_blocks_used: 0,
            kv_blocks_total: 0,
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
            requests_finished: 0,
            requests_failed: 0,
            preemptions: 0,
            spec_verified_drafts: 0,
            spec_draft_tokens: 0,
            spec_accepted_tokens: 0,
            time_to_first_token: Histogram::new(&LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(&LATENCY_BOUNDS),
        }
    }
}
