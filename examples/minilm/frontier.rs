//! `frontier`: the whole route on MiniLM, from 12.5% to 75% of the dense model's linear
//! multiply-adds. Sensitivity → ranks to a budget → fits → distillation, against one global rank
//! at the same multiply-adds, measured on the held-out sentences; written as tables, ranks files
//! and two SVG figures (the frontier, and each layer's sensitivity curve).
//!
//! The sensitivity runs on the calibration sentences (all 120, the sentences the fits calibrate
//! on; the first N with `--sentences N`: 40 made plans worse, docs/performance.md), twice,
//! to every multiple of 16 that saves multiply-adds: each of the 36 `Linear`s truncated alone
//! (exact data-aware fit on the dense model's inputs, one decomposition per layer), and each
//! encoder layer's attention block (query, key, value, output) and feed-forward block (up,
//! down) as a whole ([`Grouping::Parent`]), fitted in forward order at each rank
//! ([`Truncation::Sequential`]); the damage is the mean `1 − cos` of the sentence embeddings to
//! the dense model's. The exact knapsack then gives ranks per layer, and one rank per block,
//! at each one-rank baseline's cost. Plans are filled three ways (weight SVD, exact data-aware
//! fit, correcting fit) and run with [`Factorizable::simulate`] (the same functions as compiled
//! variants, without their speed).
//! Training needs compiled factors, so the distilled points are the compiled variants at a
//! quarter and half: one rank by weight SVD (Composer's way), and the committed block plans of
//! `planned.rs` with the correcting fit calibrated on [`FitData::MEASURED`] unless
//! `--fit-copies` or `--fit-corpus` say otherwise, trained by [`Training::MEASURED`] unless
//! `--steps`, `--augment`, `--corpus`, `--lr`, `--schedule`, `--train` or `--on` say otherwise.

use std::time::Instant;

use dfdx::prelude::*;
use factorize_runtime::sensitivity::{damage, Cost, Grouping, RankGrid, RankPlan};
use factorize_runtime::sensitivity::{Sensitivity, SensitivityParams, Truncation};
use factorize_runtime::{Factorizable, FactorizeConfig, Fit};

use crate::bert::{Batch, Bert, HIDDEN};
use crate::metrics::{self, Fidelity};
use crate::pipeline::{self, by_length, embed_all, training_targets};
use crate::pipeline::{Error, FitData, FitKind, Training};
use crate::plot::{self, Curve};
use crate::{recovery, Setup};

/// The variant the measurements run on: every `Linear` a pair (rank 128 saves on all 36).
type Probe = Bert<128, f32, Cpu>;

/// The one-rank baselines the budgets are matched to: 12.5% to 75% of the dense model's
/// linear multiply-adds (at 192 the 384² projections stay dense, as the cost rule keeps them).
const UNIFORM: [usize; 6] = [32, 64, 96, 128, 160, 192];

/// The budgets (share of the dense linear multiply-adds, and the uniform rank at it) whose
/// compiled variants are distilled.
const DISTILLED: [(usize, usize); 2] = [(25, 64), (50, 128)];

/// The fits each plan is filled with: `None` is weight SVD.
const FITS: [(Option<Fit>, &str); 3] = [
    (None, "svd"),
    (Some(Fit::exact()), "data"),
    (Some(Fit::correcting()), "correcting"),
];

/// The held-out fidelity of `plan` filled by `fit`.
fn fidelity(
    setup: &Setup,
    probe: &Probe,
    plan: &RankPlan,
    fit: Option<Fit>,
) -> Result<Fidelity, Error> {
    let quiet = FactorizeConfig {
        progress: false,
        ..Default::default()
    };
    let simulated = probe.simulate(plan, fit, &quiet, |m| {
        for (_, batch) in &setup.calibration {
            // A failing forward leaves the layers it did not reach unfitted; the
            // held-out embedding below reports the error.
            let _ = m.try_hidden_states(batch);
        }
    })?;
    let heldout = &setup.ids[pipeline::HELD_OUT];
    let ours = simulated.run(|m| embed_all(&setup.dev, heldout, |b| m.try_embed(b)))?;
    Ok(metrics::fidelity(&ours, &setup.dense_heldout))
}

/// Where the figures and ranks files go.
fn output_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/minilm")
}

/// Each layer's (or group's) damage at every multiple of 16 that saves multiply-adds, on the
/// `sensing` batches.
fn measure(
    probe: &Probe,
    sensing: &[(Vec<usize>, Batch<f32, Cpu>)],
    (grouping, truncation): (Grouping, Truncation),
) -> Result<Sensitivity, Error> {
    let start = Instant::now();
    let params = SensitivityParams {
        grid: RankGrid::Multiples { multiple: 16 },
        grouping,
        truncation,
    };
    let sensitivity = probe.sensitivity(
        &params,
        &FactorizeConfig::default(),
        |m| -> Vec<f32> {
            sensing
                .iter()
                .flat_map(|(_, b)| m.try_embed(b).map(|e| e.as_vec()).unwrap_or_default())
                .collect()
        },
        |reference, output| damage::cosine(reference, output, HIDDEN),
    )?;
    eprintln!(
        "sensitivity: {} groups of {} layers, {:.0} s",
        sensitivity.groups.len(),
        sensitivity.layers().count(),
        start.elapsed().as_secs_f64()
    );
    Ok(sensitivity)
}

/// The table rows of the plans at `rank`'s cost (one rank, per layer, per block; each with
/// its name and ranks file's stem), filled by each fit; their points go on `curves`.
fn rows(
    setup: &Setup,
    probe: &Probe,
    (rank, plans): (usize, [(String, &str, &RankPlan); 3]),
    curves: &mut [Curve],
) -> Result<(), Error> {
    for (k, (name, file, plan)) in plans.into_iter().enumerate() {
        let share = 100.0 * plan.cost as f64 / plan.dense_cost as f64;
        let mut cells = Vec::new();
        for (j, (fit, label)) in FITS.into_iter().enumerate() {
            eprintln!("{name} at rank {rank}'s cost, {label} …");
            let f = fidelity(setup, probe, plan, fit)?;
            cells.push(f.cell(3));
            // One rank: curves 0–2 by fit; per layer: 3 (correcting); per block: 4–5.
            let curve = match (k, j) {
                (0, j) => Some(j),
                (1, 2) => Some(3),
                (2, 1 | 2) => Some(3 + j),
                _ => None,
            };
            if let Some(c) = curve {
                curves[c].points.push((share, f.mean_cosine));
            }
        }
        println!(
            "| {share:.1}% | {name} | {:.4} | {} |",
            plan.damage,
            cells.join(" | ")
        );
        // As a ranks file, for `#[factorize(ranks = ..)]` (see `planned.rs`).
        let path = output_dir().join(format!("{file}-{rank}.ranks"));
        std::fs::write(&path, plan.ranks_file())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs the route and prints its tables; `sentences`: how many calibration sentences the
/// sensitivity uses; `fit`: what the distilled block plans calibrate on; `training`: how the
/// distilled points train (no steps: none).
pub fn frontier(sentences: usize, (fit, training): (FitData, &Training)) -> Result<(), Error> {
    if sentences == 0 {
        return Err("--sentences takes at least 1".into());
    }
    let setup = Setup::new()?;
    let probe = Probe::load(setup.dir.checkpoint(), &setup.dev)?;
    let sensing = by_length(
        &setup.dev,
        &setup.ids[..sentences.min(pipeline::CALIBRATION.end)],
    );
    let per_layer = measure(&probe, &sensing, (Grouping::Layers, Truncation::default()))?;
    // The exact fit, not the correcting one: correction repairs a block truncated alone so
    // well that the knapsack undervalues it (docs/performance.md).
    let sequential = Truncation::Sequential(Fit::exact());
    let per_block = measure(&probe, &sensing, (Grouping::Parent, sequential))?;
    let dir = output_dir();
    std::fs::create_dir_all(&dir)?;
    let figure = dir.join("sensitivity.svg");
    plot::sensitivity(
        &figure,
        &format!(
            "all-MiniLM-L6-v2: each Linear truncated alone ({sentences} calibration sentences)"
        ),
        &per_layer,
    )?;
    eprintln!("wrote {}", figure.display());

    println!(
        "all-MiniLM-L6-v2: one rank for all 36 Linears vs ranks to the same multiply-adds, per layer or per block (attention: q, k, v, out; feed-forward: up, down), by the exact knapsack over multiples of 16 on damage measured on {sentences} calibration sentences; held-out sentences {}–{}: mean cos / NN agreement\n",
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1
    );
    println!("| linear MACs | plan | predicted damage | svd | data | correcting |");
    println!("|---|---|---|---|---|---|");
    // Curves of the figure: one rank by each fit, ranks per layer by the correcting fit, then
    // ranks per block by the two data fits.
    let mut curves: Vec<Curve> = [
        "one rank, weight SVD (Composer's factorization)",
        "one rank, data-aware fit",
        "one rank, correcting fit",
        "ranks per layer to the budget, correcting fit",
        "ranks per block to the budget, data-aware fit",
        "ranks per block to the budget, correcting fit",
    ]
    .into_iter()
    .map(|label| Curve {
        label: label.into(),
        points: Vec::new(),
        line: true,
    })
    .collect();
    for rank in UNIFORM {
        let uniform = per_layer
            .uniform(rank, Cost::Macs)
            .ok_or("a uniform rank is off the grid")?;
        let [layers, blocks] = [&per_layer, &per_block].map(|s| s.plan(Cost::Macs, uniform.cost));
        let (Some(layers), Some(blocks)) = (layers, blocks) else {
            return Err("no plan within the budget".into());
        };
        let plans = [
            (format!("rank {rank}"), "uniform", &uniform),
            ("per layer".into(), "layers", &layers),
            ("per block".into(), "blocks", &blocks),
        ];
        rows(&setup, &probe, (rank, plans), &mut curves)?;
    }
    if training.steps > 0 {
        curves.extend(distilled(&setup, (fit, training))?);
    }
    let figure = dir.join("frontier.svg");
    plot::frontier(
        &figure,
        &format!(
            "all-MiniLM-L6-v2: fidelity on held-out sentences {}–{} (× the goals)",
            pipeline::HELD_OUT.start,
            pipeline::HELD_OUT.end - 1
        ),
        &curves,
    )?;
    eprintln!("wrote {}", figure.display());
    Ok(())
}

/// The compiled variants at [`DISTILLED`] before and after `training` towards the dense model's
/// outputs (`training.objective`): one rank by weight SVD (Composer's way), and the committed
/// block plan with the correcting fit calibrated on `fit` (ours). Prints their table; returns
/// their points for the figure.
fn distilled(setup: &Setup, (fit, training): (FitData, &Training)) -> Result<Vec<Curve>, Error> {
    let steps = training.steps;
    let calibration = &setup.ids[pipeline::CALIBRATION];
    let targets = training_targets(setup.models(), calibration, training)?;
    let fitted_on = fit.sentences(&setup.dense, calibration, &setup.tokenizer)?;
    let fitted_on = by_length(&setup.dev, &fitted_on);
    println!(
        "\nDistilled: {steps} Adam steps ({}) towards the dense model's {}; the block plans' fit calibrated on {}\n",
        training.caption(),
        training.objective.caption(),
        fit.caption(),
    );
    println!("| linear MACs | variant | before | after | train time |");
    println!("|---|---|---|---|---|");
    let mut curves = [
        format!("one rank, weight SVD + {steps} steps (Composer's way)"),
        format!("block ranks (committed plans), correcting fit + {steps} steps"),
    ]
    .map(|label| Curve {
        label,
        points: Vec::new(),
        line: false,
    });
    for (macs, rank) in DISTILLED {
        let composer = recovery::uniform(setup, (rank, FitKind::Svd), &targets, training)?;
        let ours = recovery::planned(setup, macs, &fitted_on, &targets, training)?;
        for (curve, (name, r)) in curves.iter_mut().zip([
            (format!("rank {rank}, weight SVD"), composer),
            ("block ranks (committed), correcting fit".into(), ours),
        ]) {
            println!(
                "| {macs}% | {name} | {} | {:.0} s |",
                r.before_after(),
                r.seconds
            );
            curve.points.push((macs as f64, r.after.mean_cosine));
        }
    }
    Ok(curves.into())
}
