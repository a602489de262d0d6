//! A small seeded mutator for the fuzz targets: byte-level edits (bit flips, interesting
//! integers, inserted, deleted, duplicated and spliced ranges, truncation) and, for JSON inputs,
//! structure-aware edits (a value replaced by an extreme one, a key removed, an array emptied or
//! deeply nested), so that parsers are driven past their syntax checks into their validation.

use serde_json::{json, Value};

/// xorshift64*: fast, seeded, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Integers that break size arithmetic, little-endian, in every width parsers read.
const INTERESTING: [u64; 12] =
    [0, 1, 2, 7, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, 1 << 62, i64::MAX as u64, u64::MAX];

/// Applies one to four byte-level mutations to `input`, splicing from `others` sometimes.
pub fn bytes(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'9'][rng.below(8)];
            }
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len + 1);
                let end = (i + width).min(len);
                out.splice(i..end, v[..width].iter().copied());
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, fill);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                out.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = out[i..i + n].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, copy);
            }
            6 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                let (i, j) = (rng.below(len + 1), rng.below(other.len() + 1));
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
            }
            _ => out.truncate(rng.below(len + 1)),
        }
    }
    out
}

/// Values that break validation: extremes of every JSON type.
fn extreme(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(0.5),
        9 => json!(""),
        10 => json!("x".repeat(1 + rng.below(5000))),
        11 => json!([]),
        12 => json!({}),
        _ => (0..1 + rng.below(200)).fold(json!(1), |v, _| json!([v])),
    }
}

/// Mutates one node of `v` (picked uniformly by a walk) structurally.
fn mutate_value(rng: &mut Rng, v: &mut Value, depth: usize) {
    let children = match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if children == 0 || depth > 32 || rng.below(3) == 0 {
        match (v, rng.below(4)) {
            (Value::Object(o), 0) if !o.is_empty() => {
                let key = o.keys().nth(rng.below(o.len())).cloned().unwrap_or_default();
                o.remove(&key);
            }
            (Value::Array(a), 0) => a.clear(),
            (Value::Array(a), 1) if !a.is_empty() => {
                let dup = a[rng.below(a.len())].clone();
                a.push(dup);
            }
            (v, _) => *v = extreme(rng),
        }
        return;
    }
    let i = rng.below(children);
    match v {
        Value::Array(a) => mutate_value(rng, &mut a[i], depth + 1),
        Value::Object(o) => {
            if let Some((_, child)) = o.iter_mut().nth(i) {
                mutate_value(rng, child, depth + 1);
            }
        }
        _ => {}
    }
}

/// A structure-aware mutation when `input` is JSON (else a byte-level one).
pub fn json(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    match serde_json::from_slice::<Value>(input) {
        Ok(mut v) if rng.below(4) != 0 => {
            for _ in 0..1 + rng.below(3) {
                mutate_value(rng, &mut v, 0);
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        _ => bytes(rng, input, others),
    }
}
