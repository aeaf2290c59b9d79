//! `frontier`: ranks chosen per layer to a budget from measured sensitivity, against one global
//! rank at the same multiply-adds, each filled three ways (weight SVD, exact data-aware fit,
//! correcting fit), measured on the held-out sentences.
//!
//! The sensitivity runs on calibration sentences (the first 40 unless `--sentences N`): each of the 36 `Linear`s truncated alone to
//! every multiple of 16 that saves multiply-adds, the damage being the mean `1 − cos` of the
//! sentence embeddings to the dense model's. Plans are then run with
//! [`Factorizable::simulate`] (the same functions as compiled variants, without their speed).

use std::time::Instant;

use dfdx::prelude::*;
use factorize_runtime::sensitivity::{damage, Cost, RankGrid, RankPlan, Truncation};
use factorize_runtime::{Factorizable, FactorizeConfig, Fit};

use crate::bert::{Bert, HIDDEN};
use crate::metrics::{self, Fidelity};
use crate::pipeline::{self, by_length, embed_all, Error};
use crate::Setup;

/// The variant the measurements run on: every `Linear` a pair (rank 128 saves on all 36).
type Probe = Bert<128, f32, Cpu>;

/// The one-rank baselines the budgets are matched to: a quarter and a half of the dense
/// model's linear multiply-adds.
const UNIFORM: [usize; 2] = [64, 128];

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

/// Prints the frontier table; `sentences`: how many calibration sentences the sensitivity uses.
pub fn frontier(sentences: usize) -> Result<(), Error> {
    let setup = Setup::new()?;
    let probe = Probe::load(setup.dir.checkpoint(), &setup.dev)?;
    let sensing = by_length(
        &setup.dev,
        &setup.ids[..sentences.min(pipeline::CALIBRATION.end)],
    );
    let start = Instant::now();
    let sensitivity = probe.sensitivity(
        &RankGrid::Multiples { multiple: 16 },
        Truncation::default(),
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
        "sensitivity: {} layers, {} sentences, {:.0} s",
        sensitivity.layers.len(),
        sentences,
        start.elapsed().as_secs_f64()
    );
    println!(
        "all-MiniLM-L6-v2: one rank for all 36 Linears vs ranks per layer to the same multiply-adds (exact knapsack over multiples of 16 on measured sensitivity, {sentences} calibration sentences); held-out sentences {}–{}: mean cos / NN agreement\n",
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1
    );
    println!("| linear MACs | plan | predicted damage | svd | data | correcting |");
    println!("|---|---|---|---|---|---|");
    for rank in UNIFORM {
        let uniform = sensitivity
            .uniform(rank, Cost::Macs)
            .ok_or("a uniform rank is off the grid")?;
        let budget = sensitivity
            .plan(Cost::Macs, uniform.cost)
            .ok_or("no plan within the budget")?;
        for (name, plan) in [
            (format!("rank {rank}"), &uniform),
            ("budget".into(), &budget),
        ] {
            let mut cells = Vec::new();
            for (fit, label) in FITS {
                eprintln!("{name}, {label} …");
                let f = fidelity(&setup, &probe, plan, fit)?;
                cells.push(format!(
                    "{:.3} / {:.0}%",
                    f.mean_cosine,
                    100.0 * f.neighbour_agreement
                ));
            }
            println!(
                "| {:.1}% | {name} | {:.4} | {} |",
                100.0 * plan.cost as f64 / plan.dense_cost as f64,
                plan.damage,
                cells.join(" | ")
            );
        }
        // The plans as ranks files, for `#[factorize(ranks = ..)]` (see `planned.rs`).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/minilm-ranks");
        std::fs::create_dir_all(&dir)?;
        for (name, plan) in [("budget", &budget), ("uniform", &uniform)] {
            let file = dir.join(format!("{name}-{rank}.ranks"));
            std::fs::write(&file, plan.ranks_file())?;
            eprintln!("wrote {}", file.display());
        }
    }
    Ok(())
}
