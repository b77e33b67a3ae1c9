//! DeepSeekMoE routing: router logits → the top-k experts of one token and their weights.
//!
//! The rules (transformers 5.24's `DeepseekV2TopkRouter` / `DeepseekV3TopkRouter`, in f32):
//! - scores = softmax (V2) or sigmoid (V3) of the logits;
//! - selection scores = scores + `e_score_correction_bias` (noaux_tc) or the scores themselves;
//! - grouped methods score each group (noaux_tc: sum of its top-2 selection scores;
//!   group_limited_greedy: its maximum), keep the `topk_group` best groups and exclude the experts
//!   of the others;
//! - the top-k experts by selection score among the rest; ties go to the lower index;
//! - weights = the unbiased scores of the chosen experts, divided by their sum (+1e-20) when
//!   normalising, then multiplied by `routed_scaling_factor`.

use super::config::{RoutingConfig, Scoring, TopkMethod};

/// Reusable per-token buffers.
#[derive(Default)]
pub struct RouteScratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    group_scores: Vec<f32>,
    group_kept: Vec<bool>,
}

/// Index of the largest `values[i]` with `allowed(i)`; the lowest index wins ties. A NaN never
/// beats a number, so corrupt logits still give a valid index rather than a panic.
fn argmax_where(values: &[f32], allowed: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if !allowed(i) {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => v > values[b] || (values[b].is_nan() && !v.is_nan()),
        };
        if better {
            best = Some(i);
        }
    }
    best
}

/// Routes one token: writes `cfg.top_k` expert indices and weights.
///
/// `logits` has `cfg.n_experts` values; `bias` is the `e_score_correction_bias` (noaux_tc only).
pub fn route(
    cfg: &RoutingConfig,
    bias: Option<&[f32]>,
    logits: &[f32],
    s: &mut RouteScratch,
    experts: &mut [usize],
    weights: &mut [f32],
) {
    let n = cfg.n_experts;
    debug_assert_eq!(logits.len(), n);
    debug_assert!(experts.len() == cfg.top_k && weights.len() == cfg.top_k);
    s.scores.clear();
    match cfg.scoring {
        Scoring::Sigmoid => s.scores.extend(logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp()))),
        Scoring::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            s.scores.extend(logits.iter().map(|&l| (l - max).exp()));
            let sum: f32 = s.scores.iter().sum();
            s.scores.iter_mut().for_each(|v| *v /= sum);
        }
    }
    s.choice.clear();
    match (cfg.method, bias) {
        (TopkMethod::NoauxTc, Some(bias)) => s.choice.extend(s.scores.iter().zip(bias).map(|(a, b)| a + b)),
        _ => s.choice.extend_from_slice(&s.scores),
    }

    // Groups: score each, keep the best `topk_group`.
    let group_size = n / cfg.n_group.max(1);
    s.group_kept.clear();
    s.group_kept.resize(cfg.n_group, true);
    if cfg.n_group > 1 && cfg.method != TopkMethod::Greedy {
        s.group_scores.clear();
        for group in s.choice.chunks_exact(group_size) {
            let score = match cfg.method {
                TopkMethod::NoauxTc => {
                    let first = argmax_where(group, |_| true).unwrap_or(0);
                    let second = argmax_where(group, |i| i != first).unwrap_or(first);
                    group[first] + group[second]
                }
                _ => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            };
            s.group_scores.push(score);
        }
        s.group_kept.fill(false);
        for _ in 0..cfg.topk_group {
            let kept = &s.group_kept;
            if let Some(g) = argmax_where(&s.group_scores, |g| !kept[g]) {
                s.group_kept[g] = true;
            }
        }
    }

    // Top-k experts among the kept groups.
    let mut total = 0.0f32;
    for j in 0..cfg.top_k {
        let (kept, chosen) = (&s.group_kept, &experts[..j]);
        let pick = argmax_where(&s.choice, |e| kept[e / group_size] && !chosen.contains(&e)).unwrap_or(0);
        experts[j] = pick;
        weights[j] = s.scores[pick];
        total += weights[j];
    }
    if cfg.normalize {
        // Divide first, then scale, as the reference does.
        let denom = total + 1e-20;
        weights
            .iter_mut()
            .for_each(|w| *w = *w / denom * cfg.routed_scaling_factor);
    } else {
        weights.iter_mut().for_each(|w| *w *= cfg.routed_scaling_factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a tiny deterministic generator (the crate has no `rand` dev-dependency).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
        }
    }

    /// The rules of the module doc, written the obvious way in f64 (sorts, sets).
    fn reference(cfg: &RoutingConfig, bias: Option<&[f32]>, logits: &[f32]) -> Vec<(usize, f64)> {
        let n = cfg.n_experts;
        let scores: Vec<f64> = match cfg.scoring {
            Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).collect(),
            Scoring::Softmax => {
                let m = logits.iter().map(|&l| l as f64).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            }
        };
        let choice: Vec<f64> = match (cfg.method, bias) {
            (TopkMethod::NoauxTc, Some(b)) => scores.iter().zip(b).map(|(s, b)| s + *b as f64).collect(),
            _ => scores.clone(),
        };
        let gs = n / cfg.n_group;
        let mut allowed = vec![true; n];
        if cfg.n_group > 1 && cfg.method != TopkMethod::Greedy {
            let mut groups: Vec<(f64, usize)> = (0..cfg.n_group)
                .map(|g| {
                    let mut v: Vec<f64> = choice[g * gs..(g + 1) * gs].to_vec();
                    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    let score = if cfg.method == TopkMethod::NoauxTc {
                        v[0] + v[1]
                    } else {
                        v[0]
                    };
                    (score, g)
                })
                .collect();
            groups.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let kept: Vec<usize> = groups[..cfg.topk_group].iter().map(|g| g.1).collect();
            for (e, a) in allowed.iter_mut().enumerate() {
                *a = kept.contains(&(e / gs));
            }
        }
        let mut order: Vec<usize> = (0..n).filter(|&e| allowed[e]).collect();
        order.sort_by(|&a, &b| choice[b].partial_cmp(&choice[a]).unwrap().then(a.cmp(&b)));
        let chosen = &order[..cfg.top_k];
        let sum: f64 = chosen.iter().map(|&e| scores[e]).sum();
        chosen
            .iter()
            .map(|&e| {
                let w = if cfg.normalize { scores[e] / sum } else { scores[e] };
                (e, w * cfg.routed_scaling_factor as f64)
            })
            .collect()
    }

    fn config(
        scoring: Scoring,
        method: TopkMethod,
        n: usize,
        k: usize,
        groups: (usize, usize),
        normalize: bool,
    ) -> RoutingConfig {
        RoutingConfig {
            n_experts: n,
            top_k: k,
            scoring,
            method,
            n_group: groups.0,
            topk_group: groups.1,
            normalize,
            routed_scaling_factor: 2.5,
        }
    }

    fn check(cfg: &RoutingConfig, bias: Option<&[f32]>, logits: &[f32]) {
        let mut s = RouteScratch::default();
        let (mut experts, mut weights) = (vec![0; cfg.top_k], vec![0.0; cfg.top_k]);
        route(cfg, bias, logits, &mut s, &mut experts, &mut weights);
        let mut ours: Vec<(usize, f32)> = experts.iter().copied().zip(weights.iter().copied()).collect();
        ours.sort_by_key(|p| p.0);
        let mut expected = reference(cfg, bias, logits);
        expected.sort_by_key(|p| p.0);
        let ids: Vec<usize> = ours.iter().map(|p| p.0).collect();
        let expected_ids: Vec<usize> = expected.iter().map(|p| p.0).collect();
        assert_eq!(ids, expected_ids, "{cfg:?}\nlogits {logits:?}\nbias {bias:?}");
        for ((_, a), (_, b)) in ours.iter().zip(&expected) {
            assert!((*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn matches_reference_on_random_scores() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let configs = [
            config(Scoring::Sigmoid, TopkMethod::NoauxTc, 16, 4, (4, 2), true),
            config(Scoring::Sigmoid, TopkMethod::NoauxTc, 16, 3, (1, 1), false),
            config(Scoring::Sigmoid, TopkMethod::NoauxTc, 32, 8, (8, 4), true),
            config(Scoring::Softmax, TopkMethod::Greedy, 12, 3, (1, 1), false),
            config(Scoring::Softmax, TopkMethod::GroupLimitedGreedy, 16, 3, (4, 2), false),
            config(Scoring::Softmax, TopkMethod::GroupLimitedGreedy, 16, 4, (8, 3), false),
        ];
        for cfg in &configs {
            for _ in 0..300 {
                let logits: Vec<f32> = (0..cfg.n_experts).map(|_| rng.uniform(-4.0, 4.0)).collect();
                let bias: Vec<f32> = (0..cfg.n_experts).map(|_| rng.uniform(-0.5, 0.5)).collect();
                check(cfg, Some(&bias), &logits);
            }
        }
    }

    #[test]
    fn ties_pick_the_lower_index() {
        // Quantised logits make exact ties in experts and in group scores frequent.
        let mut rng = Rng(42);
        let configs = [
            config(Scoring::Sigmoid, TopkMethod::NoauxTc, 16, 4, (4, 2), true),
            config(Scoring::Softmax, TopkMethod::GroupLimitedGreedy, 16, 3, (4, 2), false),
            config(Scoring::Softmax, TopkMethod::Greedy, 8, 3, (1, 1), false),
        ];
        for cfg in &configs {
            for _ in 0..300 {
                let logits: Vec<f32> = (0..cfg.n_experts).map(|_| rng.uniform(0.0, 4.0).floor()).collect();
                let bias = vec![0.0; cfg.n_experts];
                check(cfg, Some(&bias), &logits);
            }
        }
        let cfg = config(Scoring::Softmax, TopkMethod::Greedy, 6, 2, (1, 1), false);
        let mut s = RouteScratch::default();
        let (mut e, mut w) = ([0; 2], [0.0; 2]);
        route(&cfg, None, &[1.0; 6], &mut s, &mut e, &mut w);
        assert_eq!(e, [0, 1]);
    }

    #[test]
    fn bias_steers_selection_but_not_weights() {
        let cfg = config(Scoring::Sigmoid, TopkMethod::NoauxTc, 4, 1, (1, 1), false);
        let mut s = RouteScratch::default();
        let (mut e, mut w) = ([0; 1], [0.0; 1]);
        route(
            &cfg,
            Some(&[0.0, 0.0, 0.0, 10.0]),
            &[3.0, 0.0, 0.0, -3.0],
            &mut s,
            &mut e,
            &mut w,
        );
        assert_eq!(e, [3]);
        assert!((w[0] - 2.5 / (1.0 + 3f32.exp())).abs() < 1e-6);
    }

    #[test]
    fn nan_logits_do_not_panic() {
        let cfg = config(Scoring::Sigmoid, TopkMethod::NoauxTc, 8, 2, (4, 2), true);
        let mut s = RouteScratch::default();
        let (mut e, mut w) = ([0; 2], [0.0; 2]);
        route(&cfg, None, &[f32::NAN; 8], &mut s, &mut e, &mut w);
        assert!(e.iter().all(|&i| i < 8) && e[0] != e[1]);
    }
}
