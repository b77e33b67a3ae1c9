//! Token selection: greedy, or temperature with top-k / top-p / min-p, reproducible under a seed,
//! after the presence / frequency / repetition penalties (vLLM semantics).
//!
//! Order of operations on one row of logits: penalties → temperature → top-k → min-p → top-p →
//! draw. Greedy (`temperature == 0`) takes the argmax of the penalised logits.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::EngineError;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Drops tokens whose probability is below `min_p` × the most likely token's; 0 means off.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated; 0 means off. In [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was already generated; 0 means off. In [-2, 2].
    pub frequency_penalty: f32,
    /// Tokens seen in the prompt or the output get their logit divided by it when positive,
    /// multiplied when not; 1 means off. Must be > 0.
    pub repetition_penalty: f32,
    /// Same seed, same tokens; `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let invalid = |msg: String| Err(EngineError::InvalidRequest(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return invalid(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Whether any penalty needs the token history.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// One sequence's sampler: its parameters, its random stream and (when a penalty is on) the
/// token history the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
    /// Distinct prompt tokens (only with a repetition penalty).
    prompt_tokens: HashSet<u32>,
    /// How often each token was generated so far (only with a penalty).
    output_counts: HashMap<u32, u32>,
    penalised: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, EngineError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
            prompt_tokens: HashSet::new(),
            output_counts: HashMap::new(),
            penalised: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records the prompt (the repetition penalty also covers prompt tokens).
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.prompt_tokens = prompt.iter().copied().collect();
        }
    }

    /// Records a generated token that was not drawn by [`Sampler::sample`] (a forced token), so
    /// the penalties see it.
    pub fn observe(&mut self, token: u32) {
        if self.params.has_penalties() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Applies the penalties to one row of logits in place (vLLM semantics): the repetition
    /// penalty on every token seen in the prompt or the output (positive logits divided, others
    /// multiplied), then `logit -= frequency × count + presence × (count > 0)` for output tokens.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let repeated = self
                .prompt_tokens
                .iter()
                .chain(self.output_counts.keys().filter(|t| !self.prompt_tokens.contains(t)));
            for &t in repeated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Picks the next token from one row of logits (after the penalties) and records it in the
    /// history. NaN logits are never chosen.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let has_history = !self.prompt_tokens.is_empty() || !self.output_counts.is_empty();
        let token = if self.params.has_penalties() && has_history {
            let mut penalised = std::mem::take(&mut self.penalised);
            penalised.clear();
            penalised.extend_from_slice(logits);
            self.apply_penalties(&mut penalised);
            let token = self.pick(&penalised);
            self.penalised = penalised;
            token
        } else {
            self.pick(logits)
        };
        self.observe(token);
        token
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan() && **v > f32::NEG_INFINITY)
                .map(|(i, &v)| (i as u32, v * inv_t)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        // Best first; ties by id so the order (and so the draw) is reproducible. With top-k, select
        // the k best first so only they are sorted, not the whole vocabulary.
        let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, best_first);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(best_first);
        let max = self.candidates[0].1;
        let mut total = 0.0f64;
        for c in self.candidates.iter_mut() {
            let p = ((c.1 - max) as f64).exp();
            c.1 = p as f32;
            total += p;
        }
        if self.params.min_p > 0.0 {
            // Relative to the best token, whose unnormalised probability is 1.
            let keep = self
                .candidates
                .iter()
                .position(|c| c.1 < self.params.min_p)
                .unwrap_or(self.candidates.len())
                .max(1);
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.1 as f64).sum();
        }
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p.
            let mut mass = 0.0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                mass += c.1 as f64 / total;
                if mass >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.1 as f64).sum();
        }
        let mut target = self.rng.random::<f64>() * total;
        for &(id, p) in &self.candidates {
            target -= p as f64;
            if target <= 0.0 {
                return id;
            }
        }
        self.candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest logit, ignoring NaN; the lowest index wins ties; 0 when nothing is usable.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_ignores_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1)).unwrap();
        assert_eq!(s.sample(&[0.1, f32::NAN, 0.2]), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0f32, 1.9, 0.0, -1.0, -5.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3)).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // p(0) ≈ 0.46, p(1) ≈ 0.42: top_p 0.5 keeps just the first two.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3)).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn sampled_frequencies_follow_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11)).unwrap();
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5, 0)).is_err());
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p ∝ 1, 0.5, 0.05: min_p 0.1 keeps the first two only.
        let logits = [0.0f32, 0.5f32.ln(), 0.05f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.1,
            ..params(1.0, 0, 1.0, 9)
        })
        .unwrap();
        let draws: Vec<u32> = (0..500).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&1));
    }

    #[test]
    fn presence_and_frequency_penalties_follow_vllm() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        })
        .unwrap();
        s.set_prompt(&[3]); // not penalised: these two only count output tokens
        for t in [1, 1, 2] {
            s.observe(t);
        }
        let mut logits = [1.0f32, 1.0, 1.0, 1.0];
        s.apply_penalties(&mut logits);
        assert_eq!(logits, [1.0, 1.0 - 0.5 - 2.0 * 0.25, 1.0 - 0.5 - 0.25, 1.0]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        s.set_prompt(&[0, 1, 1]);
        s.observe(1);
        s.observe(2);
        let mut logits = [3.0f32, -1.0, 0.5, 4.0];
        s.apply_penalties(&mut logits);
        // Each seen token once, however often it occurs; unseen token 3 untouched.
        assert_eq!(logits, [1.5, -2.0, 0.25, 4.0]);
    }

    #[test]
    fn penalties_steer_greedy_and_sample_records_its_tokens() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 2.0,
            ..SamplingParams::default()
        })
        .unwrap();
        let logits = [1.0f32, 0.0, -5.0];
        // Token 0 wins, is recorded, then loses its lead to token 1 (1 - 2 < 0).
        assert_eq!(s.sample(&logits), 0);
        assert_eq!(s.sample(&logits), 1);
        // Both penalised now: 0 leads again (-1 > -2).
        assert_eq!(s.sample(&logits), 0);
        // Without penalties the history is not even kept.
        let mut plain = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!((0..3).map(|_| plain.sample(&logits)).collect::<Vec<_>>(), [0, 0, 0]);
    }

    #[test]
    fn bad_penalties_are_rejected() {
        let bad = [
            SamplingParams {
                min_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..SamplingParams::default()
            },
        ];
        for p in bad {
            let err = Sampler::new(p).err().expect("rejected").to_string();
            assert!(err.contains("must be"), "{err}");
        }
    }
}
