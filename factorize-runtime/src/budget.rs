//! Ranks by budget: one option per layer (dense, or a rank), the least total damage within a
//! budget of cost. This is the multiple-choice knapsack, solved exactly.
//!
//! Each layer offers [`Choice`]s, each with a `cost` and a `damage`:
//! - the cost is multiply-adds or parameters, from [`crate::cost`];
//! - the damage is whatever the caller measured (e.g. the loss in output fidelity when that
//!   layer alone is factorized at that rank).
//!
//! [`allocate`] picks exactly one choice per layer so that the costs sum to at most the budget
//! and the damages sum to the least possible. It is exact, not greedy: it merges the layers one
//! by one while keeping the whole Pareto frontier of (cost, damage) over the layers merged so far.
//! A partial selection that costs more and damages no less than another can never be part of
//! a better answer, so only the frontier is kept.
//!
//! ```
//! use factorize_runtime::budget::{allocate, Choice};
//! // Two layers: dense (cost 10, no damage) or factorized (cost 4, some damage).
//! let layers = vec![
//!     vec![Choice::new(10, 0.0), Choice::new(4, 0.3)],
//!     vec![Choice::new(10, 0.0), Choice::new(4, 0.1)],
//! ];
//! // Room for one dense layer: factorize the one that suffers least.
//! let picked = allocate(&layers, 14).unwrap();
//! assert_eq!(picked.choices, [0, 1]);
//! assert_eq!((picked.cost, picked.damage), (14, 0.1));
//! assert!(allocate(&layers, 7).is_none()); // nothing fits
//! ```

/// One option for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// What it costs: multiply-adds or parameters.
    pub cost: u64,
    /// What it loses, as the caller measured it; smaller is better. Must not be NaN.
    pub damage: f64,
}

impl Choice {
    /// A choice of `cost` and `damage`.
    pub const fn new(cost: u64, damage: f64) -> Self {
        Self { cost, damage }
    }
}

/// The answer of [`allocate`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Allocation {
    /// For each layer, the index of its chosen [`Choice`].
    pub choices: Vec<usize>,
    /// The total cost, at most the budget.
    pub cost: u64,
    /// The total damage, the least possible within the budget.
    pub damage: f64,
}

/// A partial selection over the layers merged so far: its totals and where it came from.
#[derive(Debug, Clone, Copy)]
struct State {
    cost: u64,
    damage: f64,
    /// Index of the state it extends in the previous frontier, and the choice that extends it.
    parent: usize,
    choice: usize,
}

/// The least-damage selection of one choice per layer whose costs sum to at most `budget`;
/// `None` when no selection fits (or a layer offers no choice). Ties are broken towards the
/// cheaper selection, then towards lower choice indices, so the answer is deterministic.
///
/// # Panics
/// When a damage is NaN: damages must be ordered.
pub fn allocate(layers: &[Vec<Choice>], budget: u64) -> Option<Allocation> {
    assert!(
        layers.iter().flatten().all(|c| !c.damage.is_nan()),
        "a damage is NaN: damages must be ordered"
    );
    let root = State {
        cost: 0,
        damage: 0.0,
        parent: 0,
        choice: 0,
    };
    let mut frontiers: Vec<Vec<State>> = vec![vec![root]];
    for options in layers {
        let previous = frontiers.last().map(Vec::as_slice).unwrap_or_default();
        let mut next: Vec<State> = previous
            .iter()
            .enumerate()
            .flat_map(|(parent, s)| {
                options.iter().enumerate().filter_map(move |(choice, c)| {
                    let cost = s.cost.checked_add(c.cost).filter(|&t| t <= budget)?;
                    Some(State {
                        cost,
                        damage: s.damage + c.damage,
                        parent,
                        choice,
                    })
                })
            })
            .collect();
        if next.is_empty() {
            return None;
        }
        frontiers.push(pareto(&mut next));
    }
    // The last frontier is sorted by cost with strictly falling damage: its last state is the
    // least damage within the budget.
    let best = frontiers.last()?.len() - 1;
    let mut choices = vec![0; layers.len()];
    let mut at = best;
    for (layer, frontier) in frontiers.iter().enumerate().skip(1).rev() {
        choices[layer - 1] = frontier[at].choice;
        at = frontier[at].parent;
    }
    let last = frontiers.last()?[best];
    Some(Allocation {
        choices,
        cost: last.cost,
        damage: last.damage,
    })
}

/// The states no other state beats (cheaper or as cheap, and less or as little damage), by
/// rising cost and strictly falling damage; among equal states, the first in `states`' order.
fn pareto(states: &mut [State]) -> Vec<State> {
    states.sort_by(|a, b| {
        a.cost
            .cmp(&b.cost)
            .then(a.damage.total_cmp(&b.damage))
            .then(a.parent.cmp(&b.parent))
            .then(a.choice.cmp(&b.choice))
    });
    let mut kept: Vec<State> = Vec::new();
    for s in states.iter() {
        if kept.last().is_none_or(|k| s.damage < k.damage) {
            kept.push(*s);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every selection, by enumeration: the least damage within the budget, if any.
    fn brute_force(layers: &[Vec<Choice>], budget: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut index = vec![0usize; layers.len()];
        loop {
            let cost: u64 = index.iter().zip(layers).map(|(&i, l)| l[i].cost).sum();
            let damage: f64 = index.iter().zip(layers).map(|(&i, l)| l[i].damage).sum();
            if cost <= budget && best.is_none_or(|b| damage < b) {
                best = Some(damage);
            }
            // The next index vector, odometer style.
            let mut k = 0;
            loop {
                if k == layers.len() {
                    return best;
                }
                index[k] += 1;
                if index[k] < layers[k].len() {
                    break;
                }
                index[k] = 0;
                k += 1;
            }
        }
    }

    fn instances() -> impl Strategy<Value = (Vec<Vec<Choice>>, u64)> {
        let choice = (0u64..40, 0u32..1000).prop_map(|(c, d)| Choice::new(c, f64::from(d) / 100.0));
        let layer = proptest::collection::vec(choice, 1..5);
        (proptest::collection::vec(layer, 1..6), 0u64..150)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The exact optimum of every small instance, against enumeration; the selection it
        /// returns has the totals it reports.
        #[test]
        fn matches_brute_force((layers, budget) in instances()) {
            let got = allocate(&layers, budget);
            let expected = brute_force(&layers, budget);
            prop_assert_eq!(got.is_some(), expected.is_some());
            if let (Some(got), Some(expected)) = (got, expected) {
                prop_assert!((got.damage - expected).abs() < 1e-9, "{} vs {}", got.damage, expected);
                let picked: Vec<Choice> =
                    got.choices.iter().zip(&layers).map(|(&i, l)| l[i]).collect();
                prop_assert_eq!(picked.iter().map(|c| c.cost).sum::<u64>(), got.cost);
                let damage: f64 = picked.iter().map(|c| c.damage).sum();
                prop_assert!((damage - got.damage).abs() < 1e-9);
                prop_assert!(got.cost <= budget);
            }
        }
    }

    #[test]
    fn beats_the_greedy_choice_by_damage_saved_per_cost() {
        // From the cheapest choices, greedy takes layer 0's upgrade first (10 saved for 2, a
        // ratio of 5, against 30 for 9) and then has no room for layer 1's: damage 30. The
        // optimum keeps layer 0 cheap and makes layer 1 dense: damage 10.
        let layers = vec![
            vec![Choice::new(1, 10.0), Choice::new(3, 0.0)],
            vec![Choice::new(1, 30.0), Choice::new(10, 0.0)],
        ];
        let a = allocate(&layers, 11).unwrap();
        assert_eq!(
            (a.choices.as_slice(), a.cost, a.damage),
            (&[0, 1][..], 11, 10.0)
        );
    }

    #[test]
    fn no_layers_cost_nothing_and_empty_options_fit_nowhere() {
        let a = allocate(&[], 0).unwrap();
        assert_eq!((a.choices.len(), a.cost, a.damage), (0, 0, 0.0));
        assert!(allocate(&[vec![]], 100).is_none());
    }

    #[test]
    #[should_panic(expected = "NaN")]
    fn a_nan_damage_is_a_bug_of_the_caller() {
        let _ = allocate(&[vec![Choice::new(1, f64::NAN)]], 10);
    }
}
