//! Feed-forward blocks: the dense SwiGLU MLP, and DeepSeekMoE (shared experts + routed experts).
//!
//! A batch is routed token by token, then grouped by expert: each chosen expert gathers its
//! tokens, runs once over all of them (its weights are read once per batch), and scatter-adds its
//! output scaled by each token's routing weight. Experts no token chose are never touched.

use r1serve_kernels::{Backend, WeightMatrix};

use super::config::{MoeConfig, RoutingConfig, TopkMethod};
use super::routing::{route, RouteScratch};
use crate::error::Result;
use crate::model::ensure;
use crate::weights::WeightStore;

/// `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate: WeightMatrix,
    up: WeightMatrix,
    down: WeightMatrix,
}

/// Buffers of one MLP pass.
#[derive(Default)]
pub struct MlpScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

impl Mlp {
    pub fn matrices(&self) -> impl Iterator<Item = &WeightMatrix> {
        [&self.gate, &self.up, &self.down].into_iter()
    }

    /// See `CausalLm::prepare_weights`.
    pub fn prepare(&self, be: &dyn Backend) {
        self.matrices().for_each(|w| be.prepare_weight(w));
    }

    pub fn bytes_per_token(&self) -> usize {
        self.matrices().map(WeightMatrix::stored_bytes).sum()
    }

    /// Loads `{prefix}.{gate,up,down}_proj.weight`.
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Self {
            gate: store.matrix(&format!("{prefix}.gate_proj.weight"), intermediate, hidden)?,
            up: store.matrix(&format!("{prefix}.up_proj.weight"), intermediate, hidden)?,
            down: store.matrix(&format!("{prefix}.down_proj.weight"), hidden, intermediate)?,
        })
    }

    /// `out[n, hidden] = mlp(x[n, hidden])`.
    pub fn forward(&self, be: &dyn Backend, x: &[f32], s: &mut MlpScratch, out: &mut [f32]) {
        let n = x.len() / self.gate.cols().max(1);
        let inter = self.gate.rows();
        let gate = ensure(&mut s.gate, n * inter);
        be.matmul(x, &self.gate, gate);
        let up = ensure(&mut s.up, n * inter);
        be.matmul(x, &self.up, up);
        let act = ensure(&mut s.act, n * inter);
        be.silu_mul(gate, up, act);
        be.matmul(act, &self.down, out);
    }
}

/// One MoE layer.
pub struct Moe {
    routing: RoutingConfig,
    /// Router `[n_routed, hidden]`, in its stored format; logits are computed in f32.
    router: WeightMatrix,
    /// `e_score_correction_bias` (noaux_tc).
    bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

/// Buffers of one MoE pass.
#[derive(Default)]
pub struct MoeScratch {
    logits: Vec<f32>,
    route: RouteScratch,
    /// `[n, top_k]` chosen experts and weights.
    chosen: Vec<usize>,
    weights: Vec<f32>,
    /// Tokens grouped by expert: `(token, weight)`, expert `e`'s from `starts[e]` to `starts[e + 1]`.
    starts: Vec<usize>,
    assignments: Vec<(usize, f32)>,
    fill: Vec<usize>,
    gathered: Vec<f32>,
    expert_out: Vec<f32>,
    mlp: MlpScratch,
}

impl Moe {
    /// The router's, the shared experts' and every routed expert's matrices.
    pub fn matrices(&self) -> impl Iterator<Item = &WeightMatrix> {
        std::iter::once(&self.router)
            .chain(self.shared.iter().flat_map(Mlp::matrices))
            .chain(self.experts.iter().flat_map(Mlp::matrices))
    }

    /// The routed experts (see `CausalLm::prepare_weights`).
    pub fn prepare(&self, be: &dyn Backend) {
        for expert in &self.experts {
            expert.prepare(be);
        }
    }

    /// Router, shared experts and `top_k` routed experts (all experts are the same size).
    pub fn bytes_per_token(&self) -> usize {
        let expert = self.experts.first().map_or(0, Mlp::bytes_per_token);
        self.router.stored_bytes() + self.shared.as_ref().map_or(0, Mlp::bytes_per_token) + self.routing.top_k * expert
    }

    pub fn load(store: &WeightStore, prefix: &str, moe: &MoeConfig, hidden: usize) -> Result<Self> {
        let routing = moe.routing.clone();
        let p = format!("{prefix}.mlp");
        let n = routing.n_experts;
        let experts = (0..n)
            .map(|e| Mlp::load(store, &format!("{p}.experts.{e}"), hidden, moe.moe_intermediate_size))
            .collect::<Result<Vec<_>>>()?;
        let shared = match moe.n_shared_experts {
            0 => None,
            k => Some(Mlp::load(
                store,
                &format!("{p}.shared_experts"),
                hidden,
                moe.moe_intermediate_size * k,
            )?),
        };
        let bias = match routing.method {
            TopkMethod::NoauxTc => Some(store.vector(&format!("{p}.gate.e_score_correction_bias"), n)?),
            _ => None,
        };
        Ok(Self {
            router: store.matrix(&format!("{p}.gate.weight"), n, hidden)?,
            bias,
            experts,
            shared,
            routing,
        })
    }

    /// `out[n, hidden] = shared(x) + Σ_chosen weight · expert(x)`.
    pub fn forward(&self, be: &dyn Backend, x: &[f32], s: &mut MoeScratch, out: &mut [f32]) {
        let hidden = self.router.cols();
        let n = x.len() / hidden.max(1);
        let (n_experts, k) = (self.routing.n_experts, self.routing.top_k);

        // Route every token (in f32: a BF16-rounded input can flip a close expert choice).
        let logits = ensure(&mut s.logits, n * n_experts); // [n, n_routed]
        be.matmul_f32(x, &self.router, logits);
        s.chosen.clear();
        s.chosen.resize(n * k, 0);
        let weights = ensure(&mut s.weights, n * k);
        for ((token_logits, experts), token_weights) in logits
            .chunks_exact(n_experts)
            .zip(s.chosen.chunks_exact_mut(k))
            .zip(weights.chunks_exact_mut(k))
        {
            route(
                &self.routing,
                self.bias.as_deref(),
                token_logits,
                &mut s.route,
                experts,
                token_weights,
            );
        }

        // Group assignments by expert (counting sort, token order kept inside each expert).
        s.starts.clear();
        s.starts.resize(n_experts + 1, 0);
        for &e in &s.chosen {
            s.starts[e + 1] += 1;
        }
        for e in 0..n_experts {
            s.starts[e + 1] += s.starts[e];
        }
        s.assignments.clear();
        s.assignments.resize(n * k, (0, 0.0));
        s.fill.clear();
        s.fill.extend_from_slice(&s.starts[..n_experts]);
        for (i, (&e, &w)) in s.chosen.iter().zip(weights.iter()).enumerate() {
            s.assignments[s.fill[e]] = (i / k, w);
            s.fill[e] += 1;
        }

        // Routed experts, each over its gathered tokens; accumulate into `out`.
        out.fill(0.0);
        for (e, expert) in self.experts.iter().enumerate() {
            let group = &s.assignments[s.starts[e]..s.starts[e + 1]];
            if group.is_empty() {
                continue;
            }
            let gathered = ensure(&mut s.gathered, group.len() * hidden);
            for (dst, &(t, _)) in gathered.chunks_exact_mut(hidden).zip(group) {
                dst.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let expert_out = ensure(&mut s.expert_out, group.len() * hidden);
            expert.forward(be, gathered, &mut s.mlp, expert_out);
            for (row, &(t, w)) in expert_out.chunks_exact(hidden).zip(group) {
                for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                    *o += w * v;
                }
            }
        }

        // Shared experts see every token.
        if let Some(shared) = &self.shared {
            let shared_out = ensure(&mut s.expert_out, n * hidden);
            shared.forward(be, x, &mut s.mlp, shared_out);
            be.add_assign(out, shared_out);
        }
    }
}
