//! Sensitivity: what each layer does to the model's output when it alone is factorized, at each
//! rank of a grid. These are the damages that ranks are then allocated by, to a budget
//! ([`Sensitivity::plan`], the exact knapsack of [`crate::budget`]).
//!
//! Layer-local error is a poor guide to what a network loses: a layer whose own output error is
//! small may feed one that amplifies it. So the damage is measured where the user cares, at the
//! model's output, through a closure (with [`damage::mse`] and [`damage::cosine`] provided).
//!
//! How ([`crate::Factorizable::sensitivity`]): the variant runs as the dense model (every
//! factorized layer stood in for by its dense layer, see [`crate::calibrate::StandIn`]) to give
//! the reference output. Then, layer by layer, one decomposition gives the best pair of every
//! rank as a prefix ([`directions`]), and the layer stands in truncated to each rank of its
//! grid while all others stay dense. The cost is forward passes, `1 + Σ (1 + ranks)`, and one
//! eigen-decomposition per layer.
//!
//! ```
//! use factorize_runtime::sensitivity::RankGrid;
//! use factorize_runtime::{cost::LayerShape, LayerKind};
//! let grid = RankGrid::Fractions { fractions: vec![0.25, 0.5, 0.75], multiple: 32 };
//! // 384 → 384 breaks even at rank 192: a quarter, a half and three quarters of its cost.
//! let ranks = grid.ranks(&LayerShape::new(LayerKind::Linear, 384, 384, 1));
//! assert_eq!(ranks, [64, 96, 160]);
//! ```

use std::collections::HashMap;
use std::fmt;

use crate::budget::{allocate, Choice};
use crate::calibrate::{
    dense_stand_ins, dense_weights, forward_order, inputs_of, missing_dense, DenseWeights,
    RecordedInput, Refit, StandIn, VisitDense, VisitFactorized,
};
use crate::config::{FactorizeConfig, Fit, Method};
use crate::cost::LayerShape;
use crate::engine::calibrated::{self, directions, Calibration};
use crate::engine::{self, WeightMatrix};
use crate::error::FactorizeError;
use crate::factorizable::Factorizable;
use crate::stand_in::{StandIns, Standing};

/// The ranks each layer is measured at, rounded to a multiple: GEMM kernels run whole tiles, so
/// a rank of 100 costs about what 112 does.
#[derive(Debug, Clone, PartialEq)]
pub enum RankGrid {
    /// For each fraction `f` in `(0, 1)` of the layer's dense multiply-adds, the rank whose pair
    /// costs `f` of it, rounded to the nearest `multiple` (at least one).
    Fractions {
        /// Fractions of the dense layer's multiply-adds.
        fractions: Vec<f64>,
        /// The multiple ranks are rounded to (at least 1).
        multiple: usize,
    },
    /// Every multiple of `multiple` that saves multiply-adds: the finest grid for that multiple,
    /// and one that holds the same ranks for every layer (so one-rank baselines are on it).
    Multiples {
        /// The step (at least 1).
        multiple: usize,
    },
}

impl RankGrid {
    /// The default fractions: 1/16 to 7/8 of the dense cost, finer where the budgets of interest
    /// (a quarter to a half) fall.
    pub const FRACTIONS: [f64; 9] = [0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875];
    /// The default multiple: 16, a SIMD width and a GEMM tile edge on the CPU and the GPU.
    pub const MULTIPLE: usize = 16;

    /// The ranks for a layer of `shape` that save multiply-adds, rising, without repeats.
    pub fn ranks(&self, shape: &LayerShape) -> Vec<usize> {
        let mut ranks: Vec<usize> = match self {
            RankGrid::Fractions {
                fractions,
                multiple,
            } => {
                let multiple = (*multiple).max(1);
                let per_rank = (shape.fan_in() + shape.out_dim) as f64;
                fractions
                    .iter()
                    .filter(|f| f.is_finite() && **f > 0.0)
                    .map(|f| {
                        let exact = f * shape.dense_macs() as f64 / per_rank;
                        ((exact / multiple as f64).round() as usize).max(1) * multiple
                    })
                    .collect()
            }
            RankGrid::Multiples { multiple } => {
                let multiple = (*multiple).max(1);
                (1..=shape.max_rank() / multiple)
                    .map(|k| k * multiple)
                    .collect()
            }
        };
        ranks.retain(|&r| r <= shape.max_rank());
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }
}

impl Default for RankGrid {
    fn default() -> Self {
        RankGrid::Fractions {
            fractions: Self::FRACTIONS.to_vec(),
            multiple: Self::MULTIPLE,
        }
    }
}

/// How a layer is truncated to a rank while its sensitivity is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Truncation {
    /// The truncated SVD of the weight ([`Method::Svd`]).
    Weight,
    /// The exact data-aware fit on the inputs the layer sees in the dense model
    /// ([`Fit::Exact`]; what [`Fit::Correcting`] gives a layer with nothing upstream changed).
    Data {
        /// Relative ridge, as [`Fit::Exact`]'s.
        ridge: f64,
    },
}

impl Default for Truncation {
    fn default() -> Self {
        Truncation::Data {
            ridge: Fit::DEFAULT_RIDGE,
        }
    }
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Multiply-adds of one calibration run: per-position cost × positions the layer saw.
    Macs,
    /// Parameters.
    Params,
}

/// One layer's measurements.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LayerSensitivity {
    /// The layer's path in the model.
    pub path: String,
    /// Its dims.
    pub shape: LayerShape,
    /// Output positions (rows) it computed in one calibration run.
    pub positions: usize,
    /// The ranks measured, rising.
    pub ranks: Vec<usize>,
    /// The damage at each rank, as the closure measured it.
    pub damage: Vec<f64>,
}

impl LayerSensitivity {
    /// The layer's cost dense (`None`) or as a pair of rank `rank`.
    pub fn cost(&self, rank: Option<usize>, cost: Cost) -> u64 {
        let s = &self.shape;
        let per = match (cost, rank) {
            (Cost::Macs, None) => s.dense_macs() * self.positions,
            (Cost::Macs, Some(r)) => s.factorized_macs(r) * self.positions,
            (Cost::Params, None) => s.dense_params(),
            (Cost::Params, Some(r)) => s.factorized_params(r),
        };
        per as u64
    }

    /// Its options for [`allocate`]: dense (no damage) first, then each rank.
    pub fn choices(&self, cost: Cost) -> Vec<Choice> {
        std::iter::once(Choice::new(self.cost(None, cost), 0.0))
            .chain(
                self.ranks
                    .iter()
                    .zip(&self.damage)
                    .map(|(&r, &d)| Choice::new(self.cost(Some(r), cost), d.max(0.0))),
            )
            .collect()
    }
}

/// Every measured layer, in field order.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Sensitivity {
    /// One entry per factorized layer the forward reached.
    pub layers: Vec<LayerSensitivity>,
}

/// Ranks for every measured layer (`None`: kept dense), with what they cost and lose.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RankPlan {
    /// Path and rank of each layer, in field order.
    pub layers: Vec<(String, Option<usize>)>,
    /// The plan's cost.
    pub cost: u64,
    /// The cost with every layer dense.
    pub dense_cost: u64,
    /// The sum of the measured damages of its choices.
    pub damage: f64,
}

impl RankPlan {
    /// The rank of the layer at `path`: `Some(None)` when it stays dense, `None` when the plan
    /// does not have it.
    pub fn rank(&self, path: &str) -> Option<Option<usize>> {
        self.layers.iter().find(|(p, _)| p == path).map(|(_, r)| *r)
    }

    /// The plan as a ranks file, `path = rank` or `path = dense` per line: what
    /// `#[factorize(ranks = "file")]` reads at compile time to freeze it into the types.
    pub fn ranks_file(&self) -> String {
        let mut out = format!(
            "# {} of {} ({:.1}%), measured damage {:.4e}\n",
            self.cost,
            self.dense_cost,
            100.0 * self.cost as f64 / self.dense_cost.max(1) as f64,
            self.damage
        );
        for (path, rank) in &self.layers {
            match rank {
                Some(r) => out.push_str(&format!("{path} = {r}\n")),
                None => out.push_str(&format!("{path} = dense\n")),
            }
        }
        out
    }
}

impl fmt::Display for RankPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cost {} of {} ({:.1}%), damage {:.4e}",
            self.cost,
            self.dense_cost,
            100.0 * self.cost as f64 / self.dense_cost.max(1) as f64,
            self.damage
        )?;
        for (path, rank) in &self.layers {
            match rank {
                Some(r) => writeln!(f, "{path}: {r}")?,
                None => writeln!(f, "{path}: dense")?,
            }
        }
        Ok(())
    }
}

impl Sensitivity {
    /// The cost with every layer dense.
    pub fn dense_cost(&self, cost: Cost) -> u64 {
        self.layers.iter().map(|l| l.cost(None, cost)).sum()
    }

    /// The ranks of least total damage whose cost is at most `budget` (exactly, over the grid:
    /// see [`allocate`]); `None` when even the smallest ranks exceed it.
    pub fn plan(&self, cost: Cost, budget: u64) -> Option<RankPlan> {
        let choices: Vec<Vec<Choice>> = self.layers.iter().map(|l| l.choices(cost)).collect();
        let picked = allocate(&choices, budget)?;
        let layers = self
            .layers
            .iter()
            .zip(&picked.choices)
            .map(|(l, &c)| (l.path.clone(), c.checked_sub(1).map(|i| l.ranks[i])))
            .collect();
        Some(RankPlan {
            layers,
            cost: picked.cost,
            dense_cost: self.dense_cost(cost),
            damage: picked.damage,
        })
    }

    /// Every layer at `rank` (dense where `rank` saves nothing, as the cost rule keeps it), for
    /// comparison; `None` when a layer that `rank` would pay on was not measured at it.
    pub fn uniform(&self, rank: usize, cost: Cost) -> Option<RankPlan> {
        let mut plan = RankPlan {
            layers: Vec::new(),
            cost: 0,
            dense_cost: self.dense_cost(cost),
            damage: 0.0,
        };
        for l in &self.layers {
            let chosen = if rank > l.shape.max_rank() {
                None
            } else {
                let i = l.ranks.iter().position(|&r| r == rank)?;
                plan.damage += l.damage[i].max(0.0);
                Some(rank)
            };
            plan.cost += l.cost(chosen, cost);
            plan.layers.push((l.path.clone(), chosen));
        }
        Some(plan)
    }
}

/// Damage measures for [`crate::Factorizable::sensitivity`]'s closure, on outputs flattened
/// row-major.
pub mod damage {
    /// The mean squared difference.
    pub fn mse<T: Copy + Into<f64>>(reference: &[T], output: &[T]) -> f64 {
        let n = reference.len().max(1) as f64;
        reference
            .iter()
            .zip(output)
            .map(|(&a, &b)| (a.into() - b.into()).powi(2))
            .sum::<f64>()
            / n
    }

    /// The mean over rows of `width` of `1 − cos` between the reference row and the output row
    /// (0 when the directions agree; a zero row counts as orthogonal to anything non-zero).
    pub fn cosine<T: Copy + Into<f64>>(reference: &[T], output: &[T], width: usize) -> f64 {
        let width = width.max(1);
        let rows = reference.len() / width;
        let mut total = 0.0;
        for (a, b) in reference
            .chunks_exact(width)
            .zip(output.chunks_exact(width))
        {
            let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
            for (&x, &y) in a.iter().zip(b) {
                let (x, y): (f64, f64) = (x.into(), y.into());
                ab += x * y;
                aa += x * x;
                bb += y * y;
            }
            let cos = match (aa > 0.0, bb > 0.0) {
                (true, true) => ab / (aa.sqrt() * bb.sqrt()),
                (false, false) => 1.0,
                _ => 0.0,
            };
            total += 1.0 - cos;
        }
        total / rows.max(1) as f64
    }
}

/// `layer` (dense weights `(w, b)`) truncated to each of `ranks` from one decomposition, as
/// stand-ins, and the positions its recorded `inputs` hold.
fn truncations(
    path: &str,
    layer: &mut dyn Refit,
    (w, b): (&[f64], &[f64]),
    inputs: &[RecordedInput],
    ranks: &[usize],
    truncation: Truncation,
) -> Result<(Vec<StandIn>, usize), FactorizeError> {
    let shape = layer.shape();
    let rows = layer.rows(path, inputs)?;
    let positions = rows.len() / shape.fan_in().max(1);
    let Some(&max) = ranks.last() else {
        return Ok((Vec::new(), positions));
    };
    let wm = WeightMatrix::new(path, w, shape.out_dim, shape.fan_in())?;
    let family = match truncation {
        Truncation::Weight => directions(&wm, b, None, 0.0, max)?,
        Truncation::Data { ridge } => {
            let x = Calibration::of_rows(path, &rows, shape.fan_in(), None)?;
            directions(&wm, b, Some(&x), ridge, max)?
        }
    };
    let stand_ins = ranks
        .iter()
        .map(|&r| {
            let (wr, br) = family.truncated(r);
            layer.stand_in(path, (&wr, &br))
        })
        .collect::<Result<_, _>>()?;
    Ok((stand_ins, positions))
}

/// The dense weights by path and a variant that runs as `dense` under the returned stand-ins.
///
/// The variant's own weights are never used (every measured run stands its layers in), so a
/// fresh init, which costs no decomposition, builds it. Boxed: stand-ins are keyed by layer
/// address, so the layers must not move.
fn as_dense<M>(
    dense: &M,
    cfg: &FactorizeConfig,
) -> Result<(Box<M::Factorized>, DenseWeights, StandIns), FactorizeError>
where
    M: VisitDense + Factorizable,
    M::Factorized: VisitFactorized,
{
    let fresh = FactorizeConfig {
        method: Method::Fresh,
        progress: false,
        ..*cfg
    };
    let mut model = Box::new(dense.factorize(&fresh)?);
    let weights = dense_weights(dense);
    let all_dense = dense_stand_ins(&mut *model, &weights)?;
    Ok((model, weights, all_dense))
}

/// The body of [`crate::Factorizable::sensitivity`].
pub(crate) fn measure<M, O, F, G>(
    dense: &M,
    grid: &RankGrid,
    truncation: Truncation,
    cfg: &FactorizeConfig,
    mut run: F,
    mut damage: G,
) -> Result<Sensitivity, FactorizeError>
where
    M: VisitDense + Factorizable,
    M::Factorized: VisitFactorized,
    F: FnMut(&M::Factorized) -> O,
    G: FnMut(&O, &O) -> f64,
{
    let (mut model, weights, all_dense) = as_dense(dense, cfg)?;
    let reference = {
        let _standing = Standing::start(&all_dense);
        run(&model)
    };
    let mut layers = Vec::new();
    model.visit_factorized("", &mut |path, layer| {
        layers.push((path.to_string(), layer.address(), layer.shape()));
        Ok(())
    })?;
    let mut measured = Sensitivity::default();
    for (k, (path, address, shape)) in layers.iter().enumerate() {
        let ranks = grid.ranks(shape);
        let _progress = crate::progress::Layer::doing(
            cfg,
            "measuring",
            path,
            &format!("{} ranks, layer {} of {}", ranks.len(), k + 1, layers.len()),
        );
        let inputs = inputs_of(&*model, *address, &all_dense, &mut run);
        if inputs.is_empty() {
            // Not reached by the forward: nothing to measure, nothing to save.
            continue;
        }
        let (w, b) = weights.get(path).ok_or_else(|| missing_dense(path))?;
        let (mut stand_ins, mut positions) = (Vec::new(), 0);
        model.visit_factorized("", &mut |p, layer| {
            if layer.address() == *address {
                (stand_ins, positions) =
                    truncations(p, layer, (w, b), &inputs, &ranks, truncation)?;
            }
            Ok(())
        })?;
        let mut damages = Vec::with_capacity(ranks.len());
        for stand_in in stand_ins {
            let mut one_truncated = all_dense.clone();
            one_truncated.insert(*address, stand_in);
            let output = {
                let _standing = Standing::start(&one_truncated);
                run(&model)
            };
            damages.push(damage(&reference, &output));
        }
        measured.layers.push(LayerSensitivity {
            path: path.clone(),
            shape: *shape,
            positions,
            ranks,
            damage: damages,
        });
    }
    Ok(measured)
}

/// A [`RankPlan`] run without compiling it (see [`crate::Factorizable::simulate`]): the
/// variant with every planned layer stood in for by the dense product of its fitted pair.
pub struct Simulated<T> {
    /// Boxed: stand-ins are keyed by layer address, so the layers must not move.
    model: Box<T>,
    stand_ins: StandIns,
}

impl<T> Simulated<T> {
    /// `f` on the variant as the plan makes it, on the calling thread.
    pub fn run<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let _standing = Standing::start(&self.stand_ins);
        f(&self.model)
    }
}

impl<T> fmt::Debug for Simulated<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Simulated({} layers)", self.stand_ins.len())
    }
}

/// `layer` (dense weights `(w, b)`) as the dense product of its rank-`rank` pair, fitted on
/// its recorded `inputs` (and the dense model's, for a correcting fit) or by weight SVD.
fn fitted(
    path: &str,
    layer: &mut dyn Refit,
    (w, b): (&[f64], &[f64]),
    (inputs, reference): (&[RecordedInput], Option<&[RecordedInput]>),
    rank: usize,
    fit: Option<Fit>,
    cfg: &FactorizeConfig,
) -> Result<StandIn, FactorizeError> {
    let shape = layer.shape();
    let wm = WeightMatrix::new(path, w, shape.out_dim, shape.fan_in())?;
    let Some(kind) = fit else {
        return layer.stand_in(path, (&engine::solve(&wm, rank, cfg)?.value.product(), b));
    };
    let rows = layer.rows(path, inputs)?;
    let reference = reference.map(|r| layer.rows(path, r)).transpose()?;
    let x = Calibration::of_rows(path, &rows, shape.fan_in(), reference.as_deref())?;
    let solved = calibrated::solve(&wm, b, &x, rank, kind, cfg.backend)?.value;
    layer.stand_in(path, (&solved.factors.product(), &solved.bias))
}

/// The body of [`crate::Factorizable::simulate`].
pub(crate) fn simulate<M, F>(
    dense: &M,
    plan: &RankPlan,
    fit: Option<Fit>,
    cfg: &FactorizeConfig,
    mut run: F,
) -> Result<Simulated<M::Factorized>, FactorizeError>
where
    M: VisitDense + Factorizable,
    M::Factorized: VisitFactorized,
    F: FnMut(&M::Factorized),
{
    let (mut model, weights, all_dense) = as_dense(dense, cfg)?;
    let mut paths = HashMap::new();
    model.visit_factorized("", &mut |path, layer| {
        paths.insert(layer.address(), path.to_string());
        Ok(())
    })?;
    for (path, _) in &plan.layers {
        if !paths.values().any(|p| p == path) {
            return Err(FactorizeError::Calibration {
                layer: path.clone(),
                reason: "the plan names a layer that the variant does not factorize".into(),
            });
        }
    }
    // Forward order, as calibration fits: each layer sees what the layers before it, as
    // already fitted, hand it.
    let order = forward_order(&*model, &all_dense, &mut run);
    let mut current = all_dense.clone();
    for address in order {
        let Some(path) = paths.get(&address) else {
            continue;
        };
        let Some(Some(rank)) = plan.rank(path) else {
            continue;
        };
        let needs_rows = fit.is_some();
        let inputs = if needs_rows {
            inputs_of(&*model, address, &current, &mut run)
        } else {
            Vec::new()
        };
        let reference = match fit {
            Some(Fit::Correcting { .. }) => Some(inputs_of(&*model, address, &all_dense, &mut run)),
            _ => None,
        };
        let (w, b) = weights.get(path).ok_or_else(|| missing_dense(path))?;
        model.visit_factorized("", &mut |p, layer| {
            if layer.address() == address {
                let inputs = (inputs.as_slice(), reference.as_deref());
                let fitted = fitted(p, layer, (w, b), inputs, rank, fit, cfg)?;
                current.insert(address, fitted);
            }
            Ok(())
        })?;
    }
    Ok(Simulated {
        model,
        stand_ins: current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerKind;

    fn layer(ranks: Vec<usize>, damage: Vec<f64>) -> LayerSensitivity {
        LayerSensitivity {
            path: "fc".into(),
            shape: LayerShape::new(LayerKind::Linear, 256, 256, 1),
            positions: 10,
            ranks,
            damage,
        }
    }

    #[test]
    fn grid_ranks_are_rounded_saving_and_distinct() {
        let shape = LayerShape::new(LayerKind::Linear, 384, 1536, 1);
        let ranks = RankGrid::default().ranks(&shape);
        assert_eq!(ranks, [16, 32, 64, 80, 112, 160, 192, 224, 272]);
        assert!(ranks.iter().all(|r| r % 16 == 0 && *r <= shape.max_rank()));
        // Rounding never leaves the saving side, and tiny layers get at least one multiple.
        let tiny = LayerShape::new(LayerKind::Linear, 8, 8, 1);
        assert_eq!(RankGrid::default().ranks(&tiny), Vec::<usize>::new());
        let odd = RankGrid::Fractions {
            fractions: vec![0.99, f64::NAN, -1.0],
            multiple: 0,
        };
        assert_eq!(odd.ranks(&shape), [304]);
        let every = RankGrid::Multiples { multiple: 100 }.ranks(&shape);
        assert_eq!(every, [100, 200, 300]);
    }

    #[test]
    fn plans_are_the_exact_allocation_and_uniform_plans_add_up() {
        let s = Sensitivity {
            layers: vec![
                layer(vec![32, 64], vec![0.5, 0.1]),
                LayerSensitivity {
                    path: "fc2".into(),
                    ..layer(vec![32, 64], vec![0.01, 0.0])
                },
            ],
        };
        let dense = s.dense_cost(Cost::Macs);
        assert_eq!(dense, 2 * 256 * 256 * 10);
        // Room for one layer at 64 and one at 32: the damaged layer gets 64.
        let budget = (64 + 32) * 512 * 10;
        let plan = s.plan(Cost::Macs, budget).unwrap();
        assert_eq!(
            plan.layers,
            [("fc".into(), Some(64)), ("fc2".into(), Some(32))]
        );
        assert_eq!((plan.cost, plan.damage), (budget, 0.11));
        assert_eq!(plan.rank("fc2"), Some(Some(32)));
        let file = plan.ranks_file();
        assert!(file.starts_with("# 491520 of 1310720 (37.5%)"), "{file}");
        assert!(file.ends_with("\nfc = 64\nfc2 = 32\n"), "{file}");
        let mut kept = plan.clone();
        kept.layers[1].1 = None;
        assert!(kept.ranks_file().ends_with("fc2 = dense\n"));
        let uniform = s.uniform(32, Cost::Macs).unwrap();
        assert_eq!((uniform.cost, uniform.damage), (64 * 512 * 10, 0.51));
        assert!(s.uniform(48, Cost::Macs).is_none());
        let above = s.uniform(200, Cost::Params).unwrap();
        assert_eq!((above.cost, above.layers[0].1), (dense_params(2), None));
        assert!(s.plan(Cost::Macs, 10).is_none());
    }

    fn dense_params(layers: u64) -> u64 {
        layers * (256 * 256 + 256)
    }

    #[test]
    fn damage_measures() {
        assert_eq!(damage::mse(&[1.0f32, 2.0], &[1.0, 4.0]), 2.0);
        let a = [1.0f64, 0.0, 0.0, 1.0];
        let b = [2.0f64, 0.0, 1.0, 0.0];
        assert!((damage::cosine(&a, &b, 2) - 0.5).abs() < 1e-12);
        assert_eq!(damage::cosine(&[0.0f64; 2], &[0.0; 2], 2), 0.0);
    }
}
