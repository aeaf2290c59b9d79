//! More distillation inputs from the calibration sentences alone.
//!
//! Distillation on 120 sentences learns those sentences and little else: the training loss
//! falls five-fold while held-out fidelity barely moves, and more text out of domain (a novel)
//! did not help (docs/performance.md). TinyBERT's answer (Jiao et al., 2020) is to vary each
//! sentence by replacing some of its words with words near them. Here "near" is the cosine of
//! the model's own word embeddings, so nothing beyond the checkpoint is needed, and the held-out
//! sentences are never read. The dense model labels every variant, as it does the originals.

use dfdx::prelude::*;

use crate::bert::{Bert, HIDDEN, VOCAB};
use crate::pipeline::{by_length_at_most, distillation_targets, Error, Objective, Targets};

/// How the calibration sentences are varied.
#[derive(Debug, Clone, Copy)]
pub struct AugmentParams {
    /// Varied copies of each sentence, beside the sentence itself.
    pub copies: usize,
    /// The chance that a word piece is replaced (TinyBERT's 0.4).
    pub replace: f64,
    /// Candidates for a replacement: the word piece's nearest neighbours (TinyBERT's 15).
    pub neighbours: usize,
    /// Seed of the choices, so that a run can be repeated.
    pub seed: u64,
    /// The most sentences in one distillation batch (sentences of one length only, so that no
    /// batch has padding).
    pub batch: usize,
}

impl Default for AugmentParams {
    fn default() -> Self {
        Self {
            copies: 20,
            replace: 0.4,
            neighbours: 15,
            seed: 0,
            batch: 16,
        }
    }
}

/// Ids below this are `[PAD]`, `[unusedN]`, `[UNK]`, `[CLS]`, `[SEP]` and `[MASK]`: never
/// replaced, never a replacement.
const FIRST_WORD: usize = 999;

/// `sentences` followed by `params.copies` varied copies of each, in which every word piece
/// (not `[CLS]`/`[SEP]`) is replaced with chance `params.replace` by one of its
/// `params.neighbours` nearest word pieces; `words` is the word-embedding matrix, row-major
/// `[VOCAB, HIDDEN]`.
pub fn augmented(sentences: &[Vec<u32>], words: &[f32], params: &AugmentParams) -> Vec<Vec<u32>> {
    let near = neighbours(sentences, words, params.neighbours);
    let mut rng = SplitMix(params.seed);
    let mut out = sentences.to_vec();
    for _ in 0..params.copies {
        for s in sentences {
            let last = s.len().saturating_sub(1);
            let varied = s.iter().enumerate().map(|(i, &t)| {
                let inner = i > 0 && i < last && (t as usize) >= FIRST_WORD;
                match near.get(&t) {
                    Some(list) if inner && !list.is_empty() && rng.unit() < params.replace => {
                        list[rng.below(list.len())]
                    }
                    _ => t,
                }
            });
            out.push(varied.collect());
        }
    }
    out
}

/// The `k` nearest word pieces (by cosine) of every word piece in `sentences`, nearest last.
fn neighbours(
    sentences: &[Vec<u32>],
    words: &[f32],
    k: usize,
) -> std::collections::HashMap<u32, Vec<u32>> {
    let dev: Cpu = Default::default();
    let mut unit = words.to_vec();
    for row in unit.chunks_mut(HIDDEN) {
        let norm = row
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut tokens: Vec<u32> = sentences.iter().flatten().copied().collect();
    tokens.sort_unstable();
    tokens.dedup();
    tokens.retain(|&t| (t as usize) >= FIRST_WORD && (t as usize) < VOCAB);
    let queries: Vec<f32> = (tokens.iter())
        .flat_map(|&t| {
            unit[t as usize * HIDDEN..(t as usize + 1) * HIDDEN]
                .iter()
                .copied()
        })
        .collect();
    let n = tokens.len();
    let vocabulary = dev.tensor_from_vec(unit, (Const::<VOCAB>, Const::<HIDDEN>));
    let queries = dev.tensor_from_vec(queries, (n, Const::<HIDDEN>));
    let cosines = queries.matmul(vocabulary.permute()).as_vec();
    (tokens.iter().zip(cosines.chunks(VOCAB)))
        .map(|(&t, row)| {
            // The best k seen so far, worst first.
            let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
            for (c, &cos) in row.iter().enumerate().skip(FIRST_WORD) {
                let full = best.len() == k;
                if c == t as usize || (full && best.first().is_none_or(|&(worst, _)| cos <= worst))
                {
                    continue;
                }
                let at = best.partition_point(|&(v, _)| v < cos);
                best.insert(at, (cos, c as u32));
                if best.len() > k {
                    best.remove(0);
                }
            }
            (t, best.into_iter().map(|(_, c)| c).collect())
        })
        .collect()
}

/// `sentences` and `copies` varied copies of each (the other parameters as
/// [`AugmentParams::default`]), neighbours from `dense`'s word embeddings; `sentences` alone
/// when `copies` is 0.
pub fn with_copies<const R: usize>(
    dense: &Bert<R, f32, Cpu>,
    sentences: &[Vec<u32>],
    copies: usize,
) -> Vec<Vec<u32>> {
    if copies == 0 {
        return sentences.to_vec();
    }
    let params = AugmentParams {
        copies,
        ..Default::default()
    };
    augmented(sentences, &dense.embeddings.word.weight.as_vec(), &params)
}

/// Distillation data from `sentences`, their varied copies and the unvaried `more`: batches
/// of one length, at most `params.batch` sentences each, labelled by `dense` for `objective`.
pub fn augmented_targets<const R: usize>(
    dense: &Bert<R, f32, Cpu>,
    (sentences, more): (&[Vec<u32>], &[Vec<u32>]),
    params: &AugmentParams,
    objective: Objective,
) -> Result<Targets, Error> {
    let dev: Cpu = Default::default();
    let words = dense.embeddings.word.weight.as_vec();
    let mut all = augmented(sentences, &words, params);
    all.extend_from_slice(more);
    let batches = by_length_at_most(&dev, &all, params.batch);
    let mut targets = distillation_targets(dense, &batches, objective)?;
    // Distillation takes the batches in turn: interleave lengths, so that a run of steps is
    // not all short or all long sentences.
    let mut rng = SplitMix(params.seed ^ 0x5eed);
    for i in (1..targets.batches.len()).rev() {
        targets.batches.swap(i, rng.below(i + 1));
    }
    Ok(targets)
}

/// SplitMix64: a small seeded generator, enough for these choices.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
