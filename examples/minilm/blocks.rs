//! `blocks`: ranks to a budget chosen per block instead of per layer. The knapsack of
//! `frontier` adds damages measured one layer at a time, which underrates layers whose errors
//! compound (an attention block's Q and K meet in one product). Here each encoder layer's
//! attention block (query, key, value, output) and feed-forward block (up, down) is truncated
//! as a whole to each multiple of 16, every other layer dense, fitted by the exact data-aware
//! fit in forward order (`simulate`); the damage is the mean `1 − cos` of calibration sentences'
//! embeddings. The exact knapsack ([`allocate`]) then picks one rank (or dense) per block at
//! the multiply-adds of each one-rank baseline of `frontier`. Public API only: `simulate`,
//! `budget::allocate` and `RankPlan`.

use std::time::Instant;

use dfdx::prelude::*;
use factorize_runtime::budget::{allocate, Choice};
use factorize_runtime::sensitivity::{damage, Cost, RankGrid, RankPlan, Sensitivity, Truncation};
use factorize_runtime::{Factorizable, FactorizeConfig, Fit};

use crate::bert::{Batch, HIDDEN};
use crate::frontier::{fidelity, Probe, FITS, UNIFORM};
use crate::pipeline::{self, by_length, Error};
use crate::Setup;

/// The rank step within a block.
const STEP: usize = 16;

/// A block: its name (the layers' common path prefix) and its layers' indices.
struct Block {
    name: String,
    members: Vec<usize>,
    /// The ranks measured, rising, and the damage at each.
    ranks: Vec<usize>,
    damage: Vec<f64>,
}

/// Every layer's shape and cost, without measuring any rank: a grid with no fraction.
fn layers(
    probe: &Probe,
    quiet: &FactorizeConfig,
    batch: &Batch<f32, Cpu>,
) -> Result<Sensitivity, Error> {
    let grid = RankGrid::Fractions {
        fractions: Vec::new(),
        multiple: STEP,
    };
    Ok(probe.sensitivity(
        &grid,
        Truncation::default(),
        quiet,
        |m| m.try_embed(batch).map(|e| e.as_vec()).unwrap_or_default(),
        |_, _| 0.0,
    )?)
}

/// `all` with every layer dense but those of `ranks` (by index).
fn plan_with(all: &RankPlan, ranks: impl Fn(usize) -> Option<usize>) -> RankPlan {
    let mut plan = all.clone();
    for (k, (_, rank)) in plan.layers.iter_mut().enumerate() {
        *rank = ranks(k);
    }
    plan
}

/// The plan's cost in multiply-adds.
fn cost_of(plan: &RankPlan, measured: &Sensitivity) -> u64 {
    (plan.layers.iter().zip(&measured.layers))
        .map(|((_, r), l)| l.cost(*r, Cost::Macs))
        .sum()
}

/// The encoder's blocks (layers grouped by their path without its last segment), each
/// truncated as a whole to every multiple of [`STEP`] it saves at and scored on `sensing`.
fn measure(
    setup: &Setup,
    probe: &Probe,
    (measured, all_dense): (&Sensitivity, &RankPlan),
    sensing: &[(Vec<usize>, Batch<f32, Cpu>)],
) -> Result<Vec<Block>, Error> {
    let quiet = FactorizeConfig {
        progress: false,
        ..Default::default()
    };
    let embed_all = |m: &<Probe as Factorizable>::Factorized| -> Result<Vec<f32>, Error> {
        let mut out = Vec::new();
        for (_, b) in sensing {
            out.extend(m.try_embed(b)?.as_vec());
        }
        Ok(out)
    };
    let reference = {
        let mut out = Vec::new();
        for (_, b) in sensing {
            out.extend(setup.dense.try_embed(b)?.as_vec());
        }
        out
    };
    let mut blocks: Vec<Block> = Vec::new();
    for (i, l) in measured.layers.iter().enumerate() {
        let name = l.path.rsplit_once('.').map_or(&*l.path, |(p, _)| p);
        match blocks.iter_mut().find(|b| b.name == name) {
            Some(b) => b.members.push(i),
            None => blocks.push(Block {
                name: name.to_string(),
                members: vec![i],
                ranks: Vec::new(),
                damage: Vec::new(),
            }),
        }
    }
    let start = Instant::now();
    for block in &mut blocks {
        let top = (block.members.iter())
            .map(|&i| measured.layers[i].shape.max_rank())
            .min()
            .unwrap_or(0);
        for rank in (STEP..=top).step_by(STEP) {
            let plan = plan_with(all_dense, |k| block.members.contains(&k).then_some(rank));
            let simulated = probe.simulate(&plan, Some(Fit::exact()), &quiet, |m| {
                for (_, b) in sensing {
                    // A failed forward leaves layers unfitted; the embedding below reports it.
                    let _ = m.try_hidden_states(b);
                }
            })?;
            let output = simulated.run(embed_all)?;
            block.ranks.push(rank);
            block
                .damage
                .push(damage::cosine(&reference, &output, HIDDEN));
        }
        eprintln!(
            "{}: {} ranks, {:.0} s",
            block.name,
            block.ranks.len(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(blocks)
}

/// Prints the table: block budgets against `frontier`'s one-rank baselines.
pub fn blocks(sentences: usize) -> Result<(), Error> {
    if sentences == 0 {
        return Err("--sentences takes at least 1".into());
    }
    let setup = Setup::new()?;
    let probe = Probe::load(setup.dir.checkpoint(), &setup.dev)?;
    let quiet = FactorizeConfig {
        progress: false,
        ..Default::default()
    };
    let sensing = by_length(
        &setup.dev,
        &setup.ids[..sentences.min(pipeline::CALIBRATION.end)],
    );
    let measured = layers(&probe, &quiet, &sensing[0].1)?;
    let all_dense = measured
        .plan(Cost::Macs, measured.dense_cost(Cost::Macs))
        .ok_or("no dense plan")?;
    let blocks = measure(&setup, &probe, (&measured, &all_dense), &sensing)?;
    let choices: Vec<Vec<Choice>> = (blocks.iter())
        .map(|b| {
            let cost = |rank| -> u64 {
                (b.members.iter())
                    .map(|&i| measured.layers[i].cost(rank, Cost::Macs))
                    .sum()
            };
            std::iter::once(Choice::new(cost(None), 0.0))
                .chain(
                    (b.ranks.iter().zip(&b.damage)).map(|(&r, &d)| Choice::new(cost(Some(r)), d)),
                )
                .collect()
        })
        .collect();
    println!(
        "all-MiniLM-L6-v2: one rank per block (attention: q, k, v, out; feed-forward: up, down) to the multiply-adds of one global rank, block damage measured on {sentences} calibration sentences; held-out sentences {}–{}: mean cos / NN agreement\n",
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1
    );
    println!("| linear MACs | one rank | block ranks (attention, feed-forward per layer) | data | correcting |");
    println!("|---|---|---|---|---|");
    for rank in UNIFORM {
        let uniform = plan_with(&all_dense, |k| {
            (rank <= measured.layers[k].shape.max_rank()).then_some(rank)
        });
        let budget = cost_of(&uniform, &measured);
        let picked = allocate(&choices, budget).ok_or("no block plan within the budget")?;
        let mut plan = all_dense.clone();
        let mut chosen = Vec::new();
        for (b, &c) in blocks.iter().zip(&picked.choices) {
            let r = c.checked_sub(1).map(|i| b.ranks[i]);
            for &m in &b.members {
                plan.layers[m].1 = r;
            }
            chosen.push(r.map_or("dense".to_string(), |r| r.to_string()));
        }
        plan.cost = cost_of(&plan, &measured);
        plan.damage = picked.damage;
        let mut cells = Vec::new();
        for (fit, label) in FITS.into_iter().skip(1) {
            eprintln!("rank {rank} budget, {label} …");
            let f = fidelity(&setup, &probe, &plan, fit)?;
            cells.push(f.cell(3));
        }
        // As a ranks file, for `#[factorize(ranks = ..)]` (see `planned.rs`).
        let file = crate::frontier::output_dir().join(format!("blocks-{rank}.ranks"));
        std::fs::create_dir_all(crate::frontier::output_dir())?;
        std::fs::write(&file, plan.ranks_file())?;
        eprintln!("wrote {}", file.display());
        println!(
            "| {:.1}% | {rank} | {} | {} |",
            100.0 * plan.cost as f64 / plan.dense_cost as f64,
            chosen.join(" "),
            cells.join(" | ")
        );
    }
    Ok(())
}
