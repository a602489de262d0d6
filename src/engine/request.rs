//! What a request asks for and what it gets back.

use crate::grammar::Constraint;
use crate::runtime::sampler::SamplingParams;
use crate::tokenizer::ChatMessage;

/// What to generate from.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized as `tokenizer(text)` does.
    Text(String),
    /// A conversation rendered with the model's chat template, ending in an assistant turn.
    Chat(Vec<ChatMessage>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// A deterministic benchmark prompt of `len` ordinary token ids for a vocabulary of `vocab`, a
/// different one for every `salt`: ids skip the first and last 100 when the vocabulary is large
/// enough to (special tokens tend to sit there), and stay below `vocab` whatever its size.
pub fn synthetic_prompt(len: usize, vocab: usize, salt: u32) -> Vec<u32> {
    let vocab = u32::try_from(vocab).unwrap_or(u32::MAX).max(1);
    let margin = if vocab > 400 { 100 } else { 0 };
    let span = vocab - 2 * margin;
    (0..len as u32).map(|i| margin + i.wrapping_mul(7919).wrapping_add(salt.wrapping_mul(104_729)) % span).collect()
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling; `None` uses the model's `generation_config.json` defaults (greedy if none).
    pub sampling: Option<SamplingParams>,
    /// Cap on generated tokens; `None`: until EOS or the end of the context.
    pub max_tokens: Option<usize>,
    /// Strings that end the generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past EOS tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many alternatives (0: just the
    /// token's own); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// What the generated text must match (structured outputs), enforced token by token.
    pub constraint: Option<Constraint>,
    /// The request parameter an invalid `constraint` is reported under (the server's own field
    /// names); `None`: the constraint's own ([`Constraint::param`]).
    pub constraint_param: Option<String>,
    /// Whether this request may speculate when the engine has speculative decoding on (the
    /// default); `false` opts it out. Its output is the same either way.
    pub speculative: bool,
}

impl GenerateRequest {
    /// A plain-text prompt.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self::new(Prompt::Text(prompt.into()))
    }

    /// A chat prompt.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    /// A prompt of token ids as they are.
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Tokens(ids))
    }

    fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            sampling: None,
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            constraint_param: None,
            speculative: true,
        }
    }

    /// Sets the sampling parameters.
    pub fn sampling(mut self, params: SamplingParams) -> Self {
        self.sampling = Some(params);
        self
    }

    /// Sets the cap on generated tokens.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Constrains the generated text (structured outputs).
    pub fn constrain(mut self, constraint: Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// Lets this request speculate (the default) or opts it out.
    pub fn speculative(mut self, on: bool) -> Self {
        self.speculative = on;
        self
    }

    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }
}

/// Why a generation ended.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    /// The OpenAI name: `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a finished generation reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Generated token ids (an ending EOS included).
    pub tokens: Vec<u32>,
    /// Seconds from the request's first scheduled step to its first token.
    pub prefill_secs: f64,
    /// Seconds from the first token to the last.
    pub decode_secs: f64,
    /// Seconds from submission to the first token (queueing included).
    pub time_to_first_token: f64,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Draft tokens proposed for it (speculative decoding; 0 without).
    pub draft_tokens: usize,
    /// Draft tokens accepted.
    pub accepted_draft_tokens: usize,
}

impl Summary {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tok_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// The fraction of its draft tokens accepted, if any were proposed.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_tokens > 0).then(|| self.accepted_draft_tokens as f64 / self.draft_tokens as f64)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tok_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// A generated token's log-probability under the model, with the likeliest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// Its text (special tokens included as written).
    pub text: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The likeliest tokens at this step: (id, text, logprob), most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// One item of a generation's stream.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated text (never splits a UTF-8 character).
    Text(String),
    /// Log-probabilities of tokens generated since the last such event (only when requested);
    /// sent before the text those tokens complete.
    Logprobs(Vec<TokenLogprob>),
    /// The end: always the last item.
    Done(Summary),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vocabulary size gets a prompt of in-range ids, the large ones away from the edges.
    #[test]
    fn synthetic_prompts_fit_any_vocabulary() {
        for vocab in [0usize, 1, 2, 7, 200, 201, 400, 401, 49_152, 128_264, 1 << 40] {
            for salt in [0, 1, u32::MAX] {
                let p = synthetic_prompt(300, vocab, salt);
                assert_eq!(p.len(), 300);
                let top = vocab.clamp(1, u32::MAX as usize) as u32;
                assert!(p.iter().all(|&t| t < top), "vocab {vocab}: {p:?}");
                if vocab > 400 {
                    assert!(p.iter().all(|&t| (100..top - 100).contains(&t)), "vocab {vocab}");
                }
            }
        }
        assert_ne!(synthetic_prompt(16, 49_152, 1), synthetic_prompt(16, 49_152, 2));
    }
}
