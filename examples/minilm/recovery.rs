//! Recovery by training, measured: Composer's way (weight SVD, then train) against this crate's
//! (a correcting fit, uniform or with ranks planned from measured damage, then train a little),
//! at 25% and 50% of the dense model's linear multiply-adds. Each variant trains its factors
//! with Adam towards the dense model's last hidden states (or every layer's, or the sentence
//! embeddings: `--on`) on the calibration sentences; held-out fidelity is reported before and
//! after.

use dfdx::prelude::*;

use crate::bert::{Batch, Bert};
use crate::metrics::{self, Fidelity};
use crate::pipeline::Targets;
use crate::pipeline::{self, factorize, recovered, training_targets, Error, FitKind, Training};
use crate::{planned, Setup};
use factorize_runtime::distill::DistillLog;

/// One variant before and after training.
pub struct Recovered {
    pub before: Fidelity,
    pub after: Fidelity,
    pub loss: (f64, f64),
    pub seconds: f64,
}

impl Recovered {
    /// From the held-out embeddings before and after, and the training log.
    fn of(setup: &Setup, (before, after, log): (Vec<f32>, Vec<f32>, DistillLog)) -> Self {
        Self {
            before: metrics::fidelity(&before, &setup.dense_heldout),
            after: metrics::fidelity(&after, &setup.dense_heldout),
            loss: (log.first(10), log.last(10)),
            seconds: log.time.as_secs_f64(),
        }
    }

    /// `before | after` table cells: held-out mean cosine / nearest-neighbour agreement.
    pub fn before_after(&self) -> String {
        format!("{} | {}", self.before.cell(4), self.after.cell(4))
    }
}

/// All 36 Linears at `rank` (64 or 128), filled by `fit`, then trained.
pub fn uniform(
    setup: &Setup,
    (rank, fit): (usize, FitKind),
    targets: &Targets,
    training: &Training,
) -> Result<Recovered, Error> {
    fn at<const R: usize>(
        setup: &Setup,
        fit: FitKind,
        targets: &Targets,
        training: &Training,
    ) -> Result<Recovered, Error> {
        let dense = Bert::<R, f32, Cpu>::load(setup.dir.checkpoint(), &setup.dev)?;
        let (mut small, _, _) = factorize(&dense, fit, &setup.calibration)?;
        let heldout = &setup.ids[pipeline::HELD_OUT];
        Ok(Recovered::of(
            setup,
            recovered(&mut small, heldout, targets, training)?,
        ))
    }
    match rank {
        64 => at::<64>(setup, fit, targets, training),
        _ => at::<128>(setup, fit, targets, training),
    }
}

/// The planned variant at `macs`% (correcting fit on the `calibration` batches), then trained.
pub fn planned(
    setup: &Setup,
    macs: usize,
    calibration: &[(Vec<usize>, Batch<f32, Cpu>)],
    targets: &Targets,
    training: &Training,
) -> Result<Recovered, Error> {
    let heldout = &setup.ids[pipeline::HELD_OUT];
    let dense = &setup.dense;
    let trained = planned::distilled(macs, dense, calibration, targets, training, heldout)?;
    Ok(Recovered::of(setup, trained))
}

/// `minilm recovery [--steps N] [--lr X] [--on hidden|layers|embeddings] [--augment COPIES]
/// [--macs 25|50]`: the table, at the given budgets; with `how.copies`, distillation also sees
/// that many varied copies of each calibration sentence (`augment.rs`).
pub fn recovery(how: &Training, budgets: &[usize]) -> Result<(), Error> {
    let steps = how.steps;
    let setup = Setup::new()?;
    let calibration = &setup.ids[pipeline::CALIBRATION];
    let targets = training_targets(setup.models(), calibration, how)?;
    println!(
        "Recovery by distillation: {steps} Adam steps ({}) towards the dense {} of sentences {}–{}; held-out sentences {}–{}",
        how.caption(),
        how.objective.caption(),
        pipeline::CALIBRATION.start,
        pipeline::CALIBRATION.end - 1,
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1,
    );
    println!(
        "\n| MACs | variant | mean cos / NN before | mean cos / NN after | train loss (first → last 10 steps) | train time |"
    );
    println!("|---|---|---|---|---|---|");
    for macs in budgets.iter().copied() {
        let rank = if macs == 25 { 64 } else { 128 };
        // Weight SVD, the correcting fit at one rank, then the plan (`None`).
        for fit in [Some(FitKind::Svd), Some(FitKind::Correcting), None] {
            let (what, r) = match fit {
                Some(fit) => {
                    let name = match fit {
                        FitKind::Svd => "weight SVD (Composer's way)",
                        FitKind::Data => "data-aware fit",
                        FitKind::Correcting => "correcting fit",
                    };
                    let r = uniform(&setup, (rank, fit), &targets, how)?;
                    (format!("rank {rank}, {name}"), r)
                }
                None => (
                    "planned ranks, correcting fit".to_string(),
                    planned(&setup, macs, &setup.calibration, &targets, how)?,
                ),
            };
            println!(
                "| {macs}% | {what} | {} | {:.4} → {:.4} | {:.0} s |",
                r.before_after(),
                r.loss.0,
                r.loss.1,
                r.seconds,
            );
        }
    }
    Ok(())
}
