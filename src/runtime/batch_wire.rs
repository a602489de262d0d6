//! A step's [`Batch`] as rank 0 sends it to the other ranks every step: little-endian `u32`
//! words holding only what the batch cannot derive — per sequence its cached length, new
//! tokens and block table — plus the rows to sample. Positions and KV slots are rebuilt by
//! [`Batch::push`], which also checks every table covers its context, so a receiver never
//! holds a batch the scheduler could not have made.
//!
//! ```text
//! block_size | rows: n, r… | seqs: n, then per sequence: cached, tokens: n, t…, blocks: n, b…
//! ```

use super::batch::Batch;
use crate::error::{Error, Result};

/// The words of `batch` and the `rows` it samples.
pub fn encode(batch: &Batch, rows: &[usize]) -> Vec<u8> {
    let tables: usize = batch.seqs.iter().map(|s| s.block_table.len()).sum();
    let mut w = Vec::with_capacity(3 + rows.len() + 3 * batch.seqs.len() + batch.num_tokens() + tables);
    w.push(batch.block_size as u32);
    w.push(rows.len() as u32);
    w.extend(rows.iter().map(|&r| r as u32));
    w.push(batch.seqs.len() as u32);
    for s in &batch.seqs {
        w.push((s.context_len - s.rows.len()) as u32);
        w.push(s.rows.len() as u32);
        w.extend_from_slice(&batch.token_ids[s.rows.clone()]);
        w.push(s.block_table.len() as u32);
        w.extend_from_slice(&s.block_table);
    }
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The batch and rows `bytes` encode; a malformed message is an error naming what is wrong.
pub fn decode(bytes: &[u8]) -> Result<(Batch, Vec<usize>)> {
    if !bytes.len().is_multiple_of(4) {
        return Err(bad(format!("{} bytes are not whole words", bytes.len())));
    }
    let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut r = Reader { words: &words, at: 0 };
    let block_size = r.word("block_size")? as usize;
    if block_size == 0 {
        return Err(bad("block_size is 0".into()));
    }
    let mut batch = Batch::new(block_size);
    let rows: Vec<usize> = r.list("rows")?.iter().map(|&x| x as usize).collect();
    let seqs = r.word("sequence count")?;
    for i in 0..seqs {
        let cached = r.word("cached length")? as usize;
        let tokens = r.list("tokens")?;
        let table = r.list("block table")?;
        batch.push(tokens, cached, table).map_err(|e| bad(format!("sequence {i}: {e}")))?;
    }
    if r.at != words.len() {
        return Err(bad(format!("{} words past the last sequence", words.len() - r.at)));
    }
    if let Some(&row) = rows.iter().find(|&&row| row >= batch.num_tokens()) {
        return Err(bad(format!("row {row} is past the batch's {} rows", batch.num_tokens())));
    }
    Ok((batch, rows))
}

fn bad(what: String) -> Error {
    Error::Backend(format!("bad step from rank 0: {what}"))
}

/// Reads words in order, every read bounds-checked.
struct Reader<'a> {
    words: &'a [u32],
    at: usize,
}

impl<'a> Reader<'a> {
    fn word(&mut self, what: &str) -> Result<u32> {
        let w = *self.words.get(self.at).ok_or_else(|| bad(format!("ends before its {what}")))?;
        self.at += 1;
        Ok(w)
    }

    /// A length word, then that many words.
    fn list(&mut self, what: &str) -> Result<&'a [u32]> {
        let n = self.word(what)? as usize;
        let end = self.at.checked_add(n).filter(|&e| e <= self.words.len());
        let end = end.ok_or_else(|| bad(format!("its {what} of {n} words runs past the message")))?;
        let list = &self.words[self.at..end];
        self.at = end;
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        let mut b = Batch::new(4);
        b.push(&[5, 6, 7], 0, &[3]).unwrap();
        b.push(&[9], 10, &[0, 2, 1]).unwrap();
        b
    }

    #[test]
    fn round_trips_exactly() {
        let b = batch();
        let (back, rows) = decode(&encode(&b, &[2, 3])).unwrap();
        assert_eq!(back, b);
        assert_eq!(rows, vec![2, 3]);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let good = encode(&batch(), &[3]);
        // Every truncation, and one extra word.
        for len in 0..good.len() {
            assert!(decode(&good[..len]).is_err(), "{len} bytes decoded");
        }
        let mut long = good.clone();
        long.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode(&long).unwrap_err().to_string().contains("past the last sequence"));
        // A row past the batch, a table too short for its context, a huge length.
        let mut words: Vec<u32> = good.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        words[2] = 4;
        let as_bytes = |w: &[u32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert!(decode(&as_bytes(&words)).unwrap_err().to_string().contains("row 4"));
        words[2] = 3;
        let last_table_len = words.len() - 4;
        words[last_table_len] = 2;
        words.pop();
        assert!(decode(&as_bytes(&words)).unwrap_err().to_string().contains("sequence 1"));
        assert!(decode(&as_bytes(&[4, u32::MAX])).is_err());
        // A block whose slots overflow 32 bits (found by the fuzzer: it panicked in Batch::push).
        let huge_block = as_bytes(&[16, 0, 1, 0, 1, 7, 1, u32::MAX]);
        assert!(decode(&huge_block).unwrap_err().to_string().contains("32 bits"));
    }
}
