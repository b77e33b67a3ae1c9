//! Log-probabilities from logits, NaN-safe.

use crate::sequence::TokenLogprob;

/// `log_softmax(logits)` with the normaliser summed in f64. NaN logits count as -inf.
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    out.clear();
    if !max.is_finite() {
        // No usable logit (all NaN/-inf, or +inf): a uniform distribution is the honest answer.
        let uniform = -(logits.len() as f32).ln();
        out.extend(logits.iter().map(|_| uniform));
        return;
    }
    let sum: f64 = logits
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    let lse = max + sum.ln() as f32;
    out.extend(
        logits
            .iter()
            .map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v - lse }),
    );
}

/// The log-probability of `token` under `row`'s distribution and its `k` best alternatives
/// (none when `k` is 0); `buf` holds the row's log-softmax afterwards.
pub fn score(row: &[f32], token: u32, k: usize, buf: &mut Vec<f32>) -> TokenLogprob {
    log_softmax(row, buf);
    TokenLogprob {
        token,
        logprob: buf.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: if k > 0 { top_k(buf, k) } else { Vec::new() },
    }
}

/// The `k` most likely tokens, best first; ties go to the lower id.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    let key = |i: &u32| logprobs[*i as usize];
    let k = k.min(ids.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| key(b).total_cmp(&key(a)).then(a.cmp(b));
    ids.select_nth_unstable_by(k - 1, order);
    ids.truncate(k);
    ids.sort_by(order);
    ids.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_f64() {
        let logits = [1.0f32, 2.0, -3.0, 0.5];
        let mut out = Vec::new();
        log_softmax(&logits, &mut out);
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        for (o, &v) in out.iter().zip(&logits) {
            assert!((*o as f64 - (v as f64 - z.ln())).abs() < 1e-6);
        }
    }

    #[test]
    fn nan_logits_do_not_poison() {
        let mut out = Vec::new();
        log_softmax(&[f32::NAN, 0.0, 0.0], &mut out);
        assert_eq!(out[0], f32::NEG_INFINITY);
        assert!((out[1] - 0.5f32.ln()).abs() < 1e-6);
        log_softmax(&[f32::NAN, f32::NAN], &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_id() {
        let lp = [-1.0f32, -0.5, -1.0, -3.0];
        assert_eq!(top_k(&lp, 3), vec![(1, -0.5), (0, -1.0), (2, -1.0)]);
        assert_eq!(top_k(&lp, 10).len(), 4);
        assert!(top_k(&lp, 0).is_empty());
    }
}
