//! Which logits rows a step's sampled rows may take (structured outputs): one bitmask per row,
//! as wide as the logits, computed on the host while the device runs the forward pass and
//! handed to rank 0's `sample` op just before it samples. Only the bitmask crosses to the
//! device; a step without constrained rows carries none and pays nothing.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

/// Bitmasks of a step's sampled rows: `words` 32-bit words per row, rows in sampling order;
/// bit `t % 32` of word `t / 32` set means token `t` may be sampled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMasks {
    /// Words per row: `⌈logits width / 32⌉`.
    pub words: usize,
    /// `rows × words`, row-major.
    pub bits: Vec<u32>,
}

impl TokenMasks {
    /// Masks of `rows` rows over `width` columns, every column allowed.
    pub fn allow_all(rows: usize, width: usize) -> Self {
        let words = width.div_ceil(32);
        TokenMasks { words, bits: vec![u32::MAX; rows * words] }
    }

    /// Row `r`'s mask.
    pub fn row(&self, r: usize) -> Option<&[u32]> {
        self.bits.get(r * self.words..(r + 1) * self.words)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.bits.len().checked_div(self.words).unwrap_or(0)
    }
}

/// Whether `mask` allows column `c` (columns past the mask are not allowed).
pub fn allows(mask: &[u32], c: usize) -> bool {
    mask.get(c / 32).is_some_and(|w| w >> (c % 32) & 1 == 1)
}

type Slot = (Mutex<Option<std::result::Result<TokenMasks, String>>>, Condvar);

/// A step's masks, delivered late: the scheduler emits the step with this handle, a host
/// thread fills it ([`MaskFill`]) while the ranks run the forward pass, and rank 0 waits for it
/// only when it samples. Empty (the default) for steps without constrained rows.
#[derive(Clone, Default)]
pub struct LateMasks(Option<Arc<Slot>>);

impl LateMasks {
    /// A handle and the one fill that completes it.
    pub fn pending() -> (LateMasks, MaskFill) {
        let slot = Arc::new((Mutex::new(None), Condvar::new()));
        (LateMasks(Some(slot.clone())), MaskFill(Some(slot)))
    }

    /// Whether the step has constrained rows.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// The masks, once computed (`None` when the step has no constrained rows).
    pub fn wait(&self) -> Result<Option<TokenMasks>> {
        let Some(slot) = &self.0 else { return Ok(None) };
        let (lock, ready) = &**slot;
        let mut filled = lock.lock().map_err(|_| Error::Backend("token masks: a thread panicked".into()))?;
        while filled.is_none() {
            filled = ready.wait(filled).map_err(|_| Error::Backend("token masks: a thread panicked".into()))?;
        }
        match filled.as_ref() {
            Some(Ok(m)) => Ok(Some(m.clone())),
            Some(Err(e)) => Err(Error::Backend(format!("token masks: {e}"))),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for LateMasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "LateMasks(pending)" } else { "LateMasks(none)" })
    }
}

/// Two steps' handles are equal when both are empty or both are the same slot.
impl PartialEq for LateMasks {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The producer's end of [`LateMasks`]; dropped unfilled (its thread panicked), it fills the
/// slot with an error so that rank 0 never waits forever.
pub struct MaskFill(Option<Arc<Slot>>);

impl MaskFill {
    /// Delivers the masks.
    pub fn fill(mut self, masks: TokenMasks) {
        self.put(Ok(masks));
    }

    fn put(&mut self, value: std::result::Result<TokenMasks, String>) {
        if let Some(slot) = self.0.take() {
            let (lock, ready) = &*slot;
            if let Ok(mut filled) = lock.lock() {
                *filled = Some(value);
            }
            ready.notify_all();
        }
    }
}

impl Drop for MaskFill {
    fn drop(&mut self) {
        self.put(Err("the host thread computing them ended without them".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_arrive_from_another_thread_and_a_lost_producer_is_an_error() {
        let (late, fill) = LateMasks::pending();
        let t = std::thread::spawn(move || fill.fill(TokenMasks::allow_all(2, 40)));
        let m = late.wait().expect("masks").expect("some");
        t.join().expect("joined");
        assert_eq!((m.words, m.rows()), (2, 2));
        assert!(allows(m.row(1).expect("row"), 39) && !allows(m.row(1).expect("row"), 64));
        let (late, fill) = LateMasks::pending();
        drop(fill);
        assert!(late.wait().is_err());
        assert_eq!(LateMasks::default().wait().expect("none"), None);
    }
}
