"""Parameter and FLOP counts from the configs alone (no model instance needed).

Used for logging MFU, for scaling-law sweeps and for the performance predictor, which
all need the numbers for models that are never built here.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig, MoEConfig
from moe.expert_choice_router import group_capacity
from moe.mlp import input_width


@dataclass(frozen=True)
class ParamCounts:
    """Total and per-token-active parameter counts; "embedding" is the token embedding
    plus an untied LM head, "non-embedding" is everything else (Kaplan et al. 2020)."""

    embedding: int
    non_embedding_total: int
    non_embedding_active: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding_total

    @property
    def active(self) -> int:
        return self.embedding + self.non_embedding_active


def _mlp_params(dim: int, ffn_dim: int, activation: str) -> int:
    return dim * input_width(ffn_dim, activation) + ffn_dim * dim


def router_params(dim: int, moe: MoEConfig) -> int:
    """One MoE layer's router weights (``moe`` as built, i.e. ``fine_grained()``): none for
    hash routing, ``2·E·D`` for noisy top-k (``W_g`` and ``W_noise``, both multiplied in
    training), ``E·D`` otherwise. The sigmoid router's expert bias is a buffer, not counted."""
    if moe.router == "hash":
        return 0
    return (2 if moe.router == "noisy_topk" else 1) * moe.num_experts * dim


def experts_per_token(moe: MoEConfig, group_tokens: int) -> float:
    """The expert rows one token costs on average (``moe`` as built): K for the token-choice
    routers (dropless; capacity drops are not subtracted); under expert choice each of the E
    experts takes ``C = min(ceil(cf·G·K/E), G)`` tokens of every group of ``group_tokens`` G,
    so ``C·E/G`` (``cf·K`` when ``cf·G·K/E`` is whole, at most E)."""
    if moe.router != "expert_choice":
        return float(moe.top_k)
    assert moe.capacity_factor is not None  # MoEConfig requires it for expert choice
    capacity = group_capacity(group_tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
    return capacity * moe.num_experts / group_tokens


def _moe_layer_params(dim: int, moe: MoEConfig, experts: float) -> float:
    """Router + ``experts`` routed experts (a count, or a mean per token) + the shared experts."""
    shared = _mlp_params(dim, moe.expert_ffn_dim * moe.num_shared_experts, moe.activation) if moe.num_shared_experts else 0
    return router_params(dim, moe) + experts * _mlp_params(dim, moe.expert_ffn_dim, moe.activation) + shared


def moe_layer_forward_flops_per_token(dim: int, moe: MoEConfig, group_tokens: int) -> float:
    """An MoE layer's forward matmul FLOPs per token in training, ``2·(router + experts_per_token
    · expert + shared)`` weights (``moe`` as configured; counted as built): the router's matmuls
    (two under noisy top-k), the rows the experts compute, the shared experts. ``group_tokens``:
    the tokens expert choice chooses among (``experts_per_token``)."""
    moe = moe.fine_grained()
    return 2.0 * _moe_layer_params(dim, moe, experts_per_token(moe, group_tokens))


def num_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def attention_width(cfg: ModelConfig) -> int:
    """``H·Dh``: the width of the queries, of the attention output, and of ``out``'s input."""
    return cfg.n_heads * cfg.head_size


def _attention_params(cfg: ModelConfig) -> int:
    """Fused qkv ``D·(H + 2G)·Dh`` + output ``H·Dh·D`` (``4·D²`` for multi-head with Dh = D/H)."""
    return cfg.dim * cfg.qkv_width + attention_width(cfg) * cfg.dim


def _norm_params(cfg: ModelConfig) -> int:
    """RMSNorm gains: two of D per block, the q and k gains of Dh with ``qk_norm``, the final norm."""
    qk = 2 * cfg.head_size if cfg.qk_norm else 0
    return cfg.n_layers * (2 * cfg.dim + qk) + cfg.dim


def _non_embedding(cfg: ModelConfig, moe: MoEConfig, experts_per_moe_layer: int) -> int:
    n_moe = num_moe_layers(cfg)
    n_dense = cfg.n_layers - n_moe
    return (
        cfg.n_layers * _attention_params(cfg)
        + n_dense * _mlp_params(cfg.dim, cfg.ffn_dim, cfg.activation)
        + n_moe * int(_moe_layer_params(cfg.dim, moe, experts_per_moe_layer))
        + _norm_params(cfg)
    )


def param_counts(cfg: ModelConfig, moe: MoEConfig) -> ParamCounts:
    """Counts as the model in ``moe.model`` holds them (its tests check this equality).

    Fine-grained experts (``moe.granularity`` G) are counted as built: ``E·G`` experts of
    width F/G, ``K·G`` active, so expert parameters, total and active, do not change with
    G (an MLP's parameters are linear in its width); only the router grows, to ``E·G·D``.
    Active counts K experts per token for every router; expert choice's tokens meet
    ``experts_per_token`` (about cf·K) on average, which ``train_flops_per_token`` counts.
    """
    moe = moe.fine_grained()
    embedding = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return ParamCounts(
        embedding=embedding,
        non_embedding_total=_non_embedding(cfg, moe, moe.num_experts),
        non_embedding_active=_non_embedding(cfg, moe, moe.top_k),
    )


def train_flops_per_token(cfg: ModelConfig, moe: MoEConfig) -> float:
    """Model FLOPs per trained token: ``6 · P_matmul + 6 · L · S · H·Dh``.

    ``P_matmul`` is the matmul weights a token meets: attention projections, the dense MLP
    or the MoE layer (``moe_layer_forward_flops_per_token / 2``: its router, two matrices
    under noisy top-k; the expert rows it costs, ``experts_per_token``: K, or expert
    choice's ``C·E/S`` over a sequence; the shared experts), and the LM head (``V·D``). The
    second term is attention scores and values: ``2·2·H·Dh`` FLOPs per key (``H·Dh = D`` by
    default; grouped-query attention shares keys and values between query heads but every
    query head still computes its own scores), ``S/2`` keys on average under the causal
    mask, times 3 for forward + backward. Norms, softmaxes and the noisy router's softplus
    and noise are left out, as in Kaplan et al. and Megatron's count. Expert choice over a
    ``micro_batch`` group rounds its capacity up over ``b·S`` tokens rather than S: the
    count takes S's (they differ by less than ``E/S`` expert rows per token).
    """
    n_moe = num_moe_layers(cfg)
    matmul = (
        cfg.n_layers * _attention_params(cfg)
        + (cfg.n_layers - n_moe) * _mlp_params(cfg.dim, cfg.ffn_dim, cfg.activation)
        + n_moe * moe_layer_forward_flops_per_token(cfg.dim, moe, cfg.seq_len) / 2
        + cfg.vocab_size * cfg.dim
    )
    return 6.0 * matmul + 6.0 * cfg.n_layers * cfg.seq_len * attention_width(cfg)
