//! The route from a checkpoint to measured variants: batching without padding, embedding a
//! list of sentences, building a factorized variant by weight SVD or by data-aware fits, and
//! recovering by distillation.

use std::time::{Duration, Instant};

use dfdx::prelude::*;
use factorize_runtime::calibrate::VisitFactorized;
use factorize_runtime::distill::{distill, DistillConfig, DistillLog, Schedule, Trained};
use factorize_runtime::Fit;
use factorize_runtime::{Factorizable, FactorizeConfig, FactorizeReport};

use crate::augment::{self, augmented_targets, AugmentParams};
use crate::bert::{Batch, Bert, BertFactorized, Hidden, Pooled, HIDDEN};
use crate::text;

/// Sentences 0–119 calibrate data-aware fits; 120–159 are held out for every measurement.
pub const CALIBRATION: std::ops::Range<usize> = 0..120;
/// See [`CALIBRATION`].
pub const HELD_OUT: std::ops::Range<usize> = 120..160;

/// The error of this example: a message naming what failed.
pub type Error = Box<dyn std::error::Error>;

/// How a variant is filled from the dense weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitKind {
    /// Truncated SVD of each weight (`factorize`).
    Svd,
    /// Each layer fitted to its outputs on the calibration sentences, in forward order
    /// (`factorize_calibrated` with `Fit::exact()`).
    Data,
    /// As `Data`, each layer fitted to the dense model's outputs of that layer, correcting the
    /// error of the layers before it (`Fit::correcting()`).
    Correcting,
}

impl std::str::FromStr for FitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "svd" => Ok(Self::Svd),
            "data" => Ok(Self::Data),
            "correcting" => Ok(Self::Correcting),
            _ => Err(format!(
                "--fit takes `svd`, `data` or `correcting`, not `{s}`"
            )),
        }
    }
}

/// Sentences grouped into batches of equal length, so that no batch has padding: the
/// calibration then records only real tokens. Each batch comes with the sentences' indices.
pub fn by_length(dev: &Cpu, ids: &[Vec<u32>]) -> Vec<(Vec<usize>, Batch<f32, Cpu>)> {
    by_length_at_most(dev, ids, usize::MAX)
}

/// As [`by_length`], with at most `most` sentences in a batch: a longer group of one length is
/// split, in order.
pub fn by_length_at_most(
    dev: &Cpu,
    ids: &[Vec<u32>],
    most: usize,
) -> Vec<(Vec<usize>, Batch<f32, Cpu>)> {
    let mut lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut batches = Vec::new();
    for len in lengths {
        let members: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].len() == len).collect();
        for chunk in members.chunks(most.max(1)) {
            let group: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            batches.push((chunk.to_vec(), Batch::new(dev, &group)));
        }
    }
    batches
}

/// The embeddings of `ids`, row-major `[n, HIDDEN]` in the order of `ids`, computed by
/// `embed` on batches of equal length.
pub fn embed_all<F>(dev: &Cpu, ids: &[Vec<u32>], mut embed: F) -> Result<Vec<f32>, Error>
where
    F: FnMut(&Batch<f32, Cpu>) -> Result<Pooled<f32, Cpu>, CpuError>,
{
    let mut out = vec![0.0; ids.len() * HIDDEN];
    for (members, batch) in by_length(dev, ids) {
        let e = embed(&batch)?.as_vec();
        for (k, &i) in members.iter().enumerate() {
            out[i * HIDDEN..(i + 1) * HIDDEN].copy_from_slice(&e[k * HIDDEN..(k + 1) * HIDDEN]);
        }
    }
    Ok(out)
}

/// The factorized variant of `dense` at rank `R`, the report, and the time it took.
/// `calibration` batches run the recording passes of the data-aware fit.
pub fn factorize<const R: usize>(
    dense: &Bert<R, f32, Cpu>,
    fit: FitKind,
    calibration: &[(Vec<usize>, Batch<f32, Cpu>)],
) -> Result<(BertFactorized<R, f32, Cpu>, FactorizeReport, Duration), Error> {
    let cfg = FactorizeConfig {
        progress: false,
        ..Default::default()
    };
    let start = Instant::now();
    let (model, report) = match fit {
        FitKind::Svd => dense.factorize_with_report(&cfg)?,
        FitKind::Data | FitKind::Correcting => {
            let kind = match fit {
                FitKind::Correcting => Fit::correcting(),
                _ => Fit::exact(),
            };
            let mut failed = None;
            let done = dense.factorize_calibrated(&cfg, kind, |m| {
                for (_, batch) in calibration {
                    if let Err(e) = m.try_hidden_states(batch) {
                        failed.get_or_insert(e);
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e.into());
            }
            done?
        }
    };
    Ok((model, report, start.elapsed()))
}

/// Adam's learning rate for recovery by distillation (the factors only), unless `--lr` says.
pub const DISTILL_LEARNING_RATE: f64 = 1e-4;

/// What distillation matches of the dense model (`--on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Its last hidden states, every token (`b·s` rows).
    Hidden,
    /// Every encoder layer's hidden states, every token (`LAYERS·b·s` rows, stacked by
    /// `bert::Stack`), as TinyBERT distils: each layer is told what it should give, not only
    /// the last.
    Layers,
    /// Its normalised sentence embeddings (`b` rows): what the measurements compare.
    Embeddings,
}

impl Objective {
    /// What the objective matches, for captions.
    pub fn caption(&self) -> &'static str {
        match self {
            Self::Hidden => "last hidden states",
            Self::Layers => "hidden states of every layer",
            Self::Embeddings => "sentence embeddings",
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hidden" => Ok(Self::Hidden),
            "layers" => Ok(Self::Layers),
            "embeddings" => Ok(Self::Embeddings),
            _ => Err(format!(
                "--on takes `hidden`, `layers` or `embeddings`, not `{s}`"
            )),
        }
    }
}

/// A distillation batch: inputs and the dense model's rows on them (hidden states or
/// embeddings, all `HIDDEN` wide).
pub type Target = (Batch<f32, Cpu>, Hidden<f32, Cpu>);

/// Distillation data: the objective, and each calibration batch with its target.
pub struct Targets {
    pub objective: Objective,
    pub batches: Vec<Target>,
}

/// The dense model's targets for `objective` on each calibration batch (its rank parameter is
/// unused: any loaded `Bert` serves).
pub fn distillation_targets<const R: usize>(
    dense: &Bert<R, f32, Cpu>,
    calibration: &[(Vec<usize>, Batch<f32, Cpu>)],
    objective: Objective,
) -> Result<Targets, Error> {
    let batches = (calibration.iter())
        .map(|(_, batch)| {
            let target = match objective {
                Objective::Hidden => dense.try_hidden_states(batch)?,
                Objective::Layers => {
                    dense.try_encode_layers(dense.embeddings.try_forward(batch)?, batch)?
                }
                Objective::Embeddings => dense.try_embed(batch)?,
            };
            Ok((batch.clone(), target))
        })
        .collect::<Result<_, Error>>()?;
    Ok(Targets { objective, batches })
}

/// What the data-aware fits calibrate on beside sentences 0–119, as the command line asks
/// (`--fit-copies`, `--fit-corpus`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FitData {
    /// Varied copies of each calibration sentence (`augment.rs`); none when 0.
    pub copies: usize,
    /// Lines of [`text::corpus`]; none when 0.
    pub corpus: usize,
}

impl FitData {
    /// What `frontier` calibrates its trained block plans on unless `--fit-copies` says
    /// otherwise: the best measured (docs/performance.md, "fits calibrated on varied copies").
    pub const MEASURED: Self = Self {
        copies: 20,
        corpus: 0,
    };

    /// What the fits calibrate on, for captions.
    pub fn caption(&self) -> String {
        let beside = copies_and_lines(self.copies, self.corpus, "");
        format!("the calibration sentences{beside}")
    }

    /// Whether the fits calibrate on the calibration sentences alone.
    pub fn is_none(&self) -> bool {
        self.copies == 0 && self.corpus == 0
    }

    /// The calibration sentences `ids`, their copies and the corpus lines, tokenized by
    /// `tokenizer` (`dense` finds the copies' words).
    pub fn sentences<const R: usize>(
        &self,
        dense: &Bert<R, f32, Cpu>,
        ids: &[Vec<u32>],
        tokenizer: &text::Tokenizer,
    ) -> Result<Vec<Vec<u32>>, Error> {
        let mut all = augment::with_copies(dense, ids, self.copies);
        let corpus = text::corpus_ids(tokenizer, self.corpus);
        all.extend(corpus.map_err(|e| format!("--fit-corpus: {e}"))?);
        Ok(all)
    }
}

/// ", `copies` varied copies of each`of`, `lines` corpus lines" for captions, without the
/// parts that are zero.
fn copies_and_lines(copies: usize, lines: usize, of: &str) -> String {
    let mut text = String::new();
    if copies > 0 {
        text += &format!(", {copies} varied copies of each{of}");
    }
    if lines > 0 {
        text += &format!(", {lines} corpus lines");
    }
    text
}

/// Distillation after factorizing, as the command line asks (`--distill`, `--augment`,
/// `--corpus`, `--lr`, `--schedule`, `--train`, `--on`).
#[derive(Debug, Clone, Copy)]
pub struct Training {
    /// Adam steps; none when 0.
    pub steps: usize,
    /// The learning rate (its peak under the cosine schedule).
    pub learning_rate: f64,
    /// Varied copies of each calibration sentence beside it (`augment.rs`); none when 0.
    pub copies: usize,
    /// Lines of [`text::corpus`] beside the calibration sentences, unvaried; none when 0.
    pub corpus: usize,
    /// A cosine schedule with a warm-up of [`WARMUP_PER_STEPS`]-th of the steps, else a
    /// constant rate.
    pub cosine: bool,
    /// The factorized pairs alone, or every tensor (Composer's way trains the whole model).
    pub trained: Trained,
    /// What the variant learns to match.
    pub objective: Objective,
}

/// Under `--schedule cosine`, one step in this many warms up.
pub const WARMUP_PER_STEPS: usize = 20;

impl Training {
    /// The recipe `frontier` trains with unless told otherwise: the best measured with the
    /// text this repository ships (docs/performance.md, "training every tensor"): every line
    /// of [`text::CORPUS`] beside 40 varied copies of each calibration sentence.
    pub const MEASURED: Self = Self {
        steps: 4000,
        learning_rate: 3e-4,
        copies: 40,
        corpus: text::CORPUS_LINES,
        cosine: true,
        trained: Trained::All,
        objective: Objective::Hidden,
    };

    /// `distill`'s configuration for this training, with progress.
    pub fn config(&self) -> DistillConfig {
        let schedule = match self.cosine {
            true => Schedule::Cosine {
                warmup: self.steps / WARMUP_PER_STEPS,
            },
            false => Schedule::Constant,
        };
        DistillConfig {
            steps: self.steps,
            learning_rate: self.learning_rate,
            schedule,
            trained: self.trained,
            ..Default::default()
        }
    }

    /// The learning rate, how it moves, what it trains and on what beside the calibration
    /// sentences, for table captions (what it matches: [`Objective::caption`]).
    pub fn caption(&self) -> String {
        let schedule = match self.cosine {
            true => ", cosine schedule",
            false => "",
        };
        let trained = match self.trained {
            Trained::Factors => "the factors only",
            Trained::All => "every tensor",
        };
        let beside = copies_and_lines(self.copies, self.corpus, " calibration sentence");
        format!(
            "learning rate {}{schedule}, {trained}{beside}",
            self.learning_rate
        )
    }
}

/// The dense model's targets for `training.objective` on the calibration sentences `ids`, on
/// `training.copies` varied copies of each, and on the first `training.corpus` lines of
/// [`text::corpus`], tokenized by `tokenizer` (`dense`'s rank parameter is unused).
pub fn training_targets<const R: usize>(
    (dense, tokenizer): (&Bert<R, f32, Cpu>, &text::Tokenizer),
    ids: &[Vec<u32>],
    training: &Training,
) -> Result<Targets, Error> {
    let objective = training.objective;
    if training.copies == 0 && training.corpus == 0 {
        let dev = dense.embeddings.word.weight.device().clone();
        return distillation_targets(dense, &by_length(&dev, ids), objective);
    }
    let corpus = text::corpus_ids(tokenizer, training.corpus);
    let corpus = corpus.map_err(|e| format!("--corpus: {e}"))?;
    let params = AugmentParams {
        copies: training.copies,
        ..Default::default()
    };
    augmented_targets(dense, (ids, &corpus), &params, objective)
}

/// A variant that recovery trains and measures: its inference embedding, and the rows an
/// [`Objective`] compares, traced. Implemented for [`BertFactorized`] here and for the planned
/// variants in `planned.rs`, each by calling its own (mirrored) forwards.
pub trait Trainable: TensorCollection<f32, Cpu> + VisitFactorized + Clone {
    /// `try_embed`.
    fn embed(&self, batch: &Batch<f32, Cpu>) -> Result<Pooled<f32, Cpu>, CpuError>;
    /// What `objective` compares, from the embeddings traced into `grads`: the last layer's
    /// rows (`try_encode`), every layer's (`try_encode_layers`) or the pooled sentence
    /// embeddings.
    fn traced_rows(
        &self,
        batch: &Batch<f32, Cpu>,
        grads: Gradients<f32, Cpu>,
        objective: Objective,
    ) -> Result<Hidden<f32, Cpu, OwnedTape<f32, Cpu>>, CpuError>;
}

/// Implements [`Trainable`] for a variant type through its own (mirrored) `try_embed`,
/// `embeddings`, `try_encode` and `try_encode_layers`: `trainable!([generics] Type)`.
macro_rules! trainable {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> $crate::pipeline::Trainable for $ty {
            fn embed(
                &self,
                batch: &$crate::bert::Batch<f32, ::dfdx::prelude::Cpu>,
            ) -> Result<$crate::bert::Pooled<f32, ::dfdx::prelude::Cpu>, ::dfdx::prelude::CpuError>
            {
                self.try_embed(batch)
            }

            fn traced_rows(
                &self,
                batch: &$crate::bert::Batch<f32, ::dfdx::prelude::Cpu>,
                grads: ::dfdx::prelude::Gradients<f32, ::dfdx::prelude::Cpu>,
                objective: $crate::pipeline::Objective,
            ) -> Result<
                $crate::bert::Hidden<
                    f32,
                    ::dfdx::prelude::Cpu,
                    ::dfdx::prelude::OwnedTape<f32, ::dfdx::prelude::Cpu>,
                >,
                ::dfdx::prelude::CpuError,
            > {
                use ::dfdx::prelude::Trace;
                use $crate::pipeline::Objective;
                let x = self.embeddings.try_forward(batch)?.traced(grads);
                match objective {
                    Objective::Hidden => self.try_encode(x, batch),
                    Objective::Layers => self.try_encode_layers(x, batch),
                    Objective::Embeddings => $crate::bert::pool(self.try_encode(x, batch)?, batch),
                }
            }
        }
    };
}
// `planned.rs` names it; `tests/minilm_model.rs` includes this file without it.
#[allow(unused_imports)]
pub(crate) use trainable;

trainable!([const R: usize] BertFactorized<R, f32, Cpu>);

/// Trains the factorized pairs of `small` as `training` says towards the dense model's
/// `targets` (their copies are `targets`' business).
pub fn recover<M: Trainable>(
    small: &mut M,
    targets: &Targets,
    training: &Training,
) -> Result<DistillLog, Error> {
    let cfg = training.config();
    let objective = targets.objective;
    Ok(distill(
        small,
        &targets.batches,
        &cfg,
        |m: &M, b, grads| m.traced_rows(b, grads, objective),
    )?)
}

/// The embeddings of `heldout` by `small` before and after [`recover`], and its log.
pub fn recovered<M: Trainable>(
    small: &mut M,
    heldout: &[Vec<u32>],
    targets: &Targets,
    training: &Training,
) -> Result<(Vec<f32>, Vec<f32>, DistillLog), Error> {
    let dev: Cpu = Default::default();
    let before = embed_all(&dev, heldout, |b| small.embed(b))?;
    let log = recover(small, targets, training)?;
    let after = embed_all(&dev, heldout, |b| small.embed(b))?;
    Ok((before, after, log))
}

/// The seconds one call of `f` takes.
pub fn seconds(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// The median of `values` (the upper one for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
