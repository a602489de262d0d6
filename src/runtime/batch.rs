//! The per-step struct: everything the forward pass needs to know about one step's sequences.

use std::ops::Range;

use crate::error::{Error, Result};

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqInput {
    /// This sequence's rows in the step's activations.
    pub rows: Range<usize>,
    /// Tokens in the sequence's cache once this step has run (its last position + 1).
    pub context_len: usize,
    /// Physical KV blocks holding positions `[i·block_size, (i+1)·block_size)`.
    pub block_table: Vec<u32>,
}

/// One step of the forward pass: a batch of sequences, each with new tokens at its own positions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// Token ids of every new token, sequences concatenated.
    pub token_ids: Vec<u32>,
    /// Position of each new token within its sequence.
    pub positions: Vec<u32>,
    /// KV cache slot (`block · block_size + offset`) of each new token.
    pub slots: Vec<u32>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqInput>,
    /// Token slots per KV block.
    pub block_size: usize,
}

impl Batch {
    /// An empty batch over a cache with `block_size`-token blocks.
    pub fn new(block_size: usize) -> Self {
        Batch { block_size, ..Default::default() }
    }

    /// Adds a sequence whose cache already holds `cached` tokens and which now feeds `tokens`;
    /// `block_table` must cover `cached + tokens.len()` positions.
    pub fn push(&mut self, tokens: &[u32], cached: usize, block_table: &[u32]) -> Result<()> {
        let context_len = cached + tokens.len();
        if tokens.is_empty() {
            return Err(Error::Backend("a sequence in a step must feed at least one token".into()));
        }
        if block_table.len() * self.block_size < context_len {
            return Err(Error::Backend(format!(
                "block table of {} blocks cannot hold {context_len} tokens",
                block_table.len()
            )));
        }
        // Positions and slots are u32 on the device: checked before anything is pushed (a
        // batch decoded from another rank's message must not overflow them).
        let slot_fits = |pos: usize| {
            let slot =
                block_table[pos / self.block_size] as u64 * self.block_size as u64 + (pos % self.block_size) as u64;
            u32::try_from(pos).is_ok() && u32::try_from(slot).is_ok()
        };
        if let Some(pos) = (cached..context_len).find(|&pos| !slot_fits(pos)) {
            return Err(Error::Backend(format!("position {pos} or its KV slot does not fit 32 bits")));
        }
        let start = self.token_ids.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = cached + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            let block = block_table[pos / self.block_size];
            self.slots.push(block * self.block_size as u32 + (pos % self.block_size) as u32);
        }
        self.seqs.push(SeqInput { rows: start..self.token_ids.len(), context_len, block_table: block_table.to_vec() });
        Ok(())
    }

    /// Rows whose logits the step returns: the last new token of each sequence.
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.rows.end - 1).collect()
    }

    /// Number of new tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// The cache slot of position `pos` of sequence `seq`.
    pub fn slot(&self, seq: &SeqInput, pos: usize) -> usize {
        seq.block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}
