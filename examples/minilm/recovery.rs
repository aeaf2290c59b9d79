//! Recovery by training, measured: Composer's way (weight SVD, then train) against this crate's
//! (a correcting fit, uniform or with ranks planned from measured damage, then train a little),
//! at 25% and 50% of the dense model's linear multiply-adds. Each variant trains its factors
//! with Adam towards the dense model's last hidden states on the calibration sentences; held-out
//! fidelity is reported before and after.

use dfdx::prelude::*;

use crate::bert::Bert;
use crate::metrics::{self, Fidelity};
use crate::pipeline::{self, distillation_targets, factorize, recovered, Error, FitKind};
use crate::pipeline::{Objective, Targets};
use crate::{planned, Setup};

/// One variant before and after training.
struct Recovered {
    before: Fidelity,
    after: Fidelity,
    loss: (f64, f64),
    seconds: f64,
}

/// All 36 Linears at rank `R`, filled by `fit`, then trained for `steps` steps.
fn uniform<const R: usize>(
    setup: &Setup,
    fit: FitKind,
    targets: &Targets,
    training: (usize, f64),
) -> Result<Recovered, Error> {
    let dense = Bert::<R, f32, Cpu>::load(setup.dir.checkpoint(), &setup.dev)?;
    let (mut small, _, _) = factorize(&dense, fit, &setup.calibration)?;
    let heldout = &setup.ids[pipeline::HELD_OUT];
    let (before, after, log) = recovered(&mut small, heldout, targets, training)?;
    Ok(Recovered {
        before: metrics::fidelity(&before, &setup.dense_heldout),
        after: metrics::fidelity(&after, &setup.dense_heldout),
        loss: (log.first(10), log.last(10)),
        seconds: log.time.as_secs_f64(),
    })
}

/// The planned variant at `macs`% (correcting fit), then trained for `steps` steps.
fn planned(
    setup: &Setup,
    macs: usize,
    targets: &Targets,
    training: (usize, f64),
) -> Result<Recovered, Error> {
    let heldout = &setup.ids[pipeline::HELD_OUT];
    let (before, after, log) = planned::distilled(
        macs,
        &setup.dense,
        &setup.calibration,
        targets,
        training,
        heldout,
    )?;
    Ok(Recovered {
        before: metrics::fidelity(&before, &setup.dense_heldout),
        after: metrics::fidelity(&after, &setup.dense_heldout),
        loss: (log.first(10), log.last(10)),
        seconds: log.time.as_secs_f64(),
    })
}

/// `minilm recovery [--steps N] [--lr X] [--on hidden|embeddings]`: the table.
pub fn recovery(steps: usize, learning_rate: f64, objective: Objective) -> Result<(), Error> {
    let training = (steps, learning_rate);
    let setup = Setup::new()?;
    let targets = distillation_targets(&setup.dense, &setup.calibration, objective)?;
    println!(
        "Recovery by distillation: {steps} Adam steps (learning rate {}, the factors only) towards the dense {} of sentences {}–{}; held-out sentences {}–{}",
        learning_rate,
        match objective {
            Objective::Hidden => "last hidden states",
            Objective::Embeddings => "sentence embeddings",
        },
        pipeline::CALIBRATION.start,
        pipeline::CALIBRATION.end - 1,
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1,
    );
    println!(
        "\n| MACs | variant | mean cos / NN before | mean cos / NN after | train loss (first → last 10 steps) | train time |"
    );
    println!("|---|---|---|---|---|---|");
    for (macs, rank) in [(25, 64), (50, 128)] {
        let rows: [(&str, Recovered); 3] = [
            (
                "rank {rank}, weight SVD (Composer's way)",
                match rank {
                    64 => uniform::<64>(&setup, FitKind::Svd, &targets, training)?,
                    _ => uniform::<128>(&setup, FitKind::Svd, &targets, training)?,
                },
            ),
            (
                "rank {rank}, correcting fit",
                match rank {
                    64 => uniform::<64>(&setup, FitKind::Correcting, &targets, training)?,
                    _ => uniform::<128>(&setup, FitKind::Correcting, &targets, training)?,
                },
            ),
            (
                "planned ranks, correcting fit",
                planned(&setup, macs, &targets, training)?,
            ),
        ];
        for (what, r) in rows {
            eprintln!(
                "{macs}%: {} done",
                what.replace("{rank}", &rank.to_string())
            );
            println!(
                "| {macs}% | {} | {:.4} / {:.0}% | {:.4} / {:.0}% | {:.4} → {:.4} | {:.0} s |",
                what.replace("{rank}", &rank.to_string()),
                r.before.mean_cosine,
                100.0 * r.before.neighbour_agreement,
                r.after.mean_cosine,
                100.0 * r.after.neighbour_agreement,
                r.loss.0,
                r.loss.1,
                r.seconds,
            );
        }
    }
    Ok(())
}
