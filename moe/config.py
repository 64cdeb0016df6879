"""Configuration of the model and its MoE layers.

Each dataclass is frozen and validates its own values in ``__post_init__``; the YAML
loader in ``launch/config.py`` checks key names and types before it constructs them,
so a message from here is always about a value, and names the key as it is written
in YAML (``moe.top_k``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, value and fix."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("key=value: allowed")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the
    last one silently, so a pasted block would override the first unseen. Every YAML the
    project reads (configs, hardware files) goes through it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be repeated
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in lines:
                raise ConfigError(f"key '{key}' is given twice (lines {lines[key]} and {line}); keep one")
            if isinstance(key, Hashable):
                lines[key] = line
        return super().construct_mapping(node, deep)


Activation = Literal["gelu", "swiglu"]


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, causal attention, dense or MoE MLPs.

    Attention: ``n_heads`` query heads of ``head_dim`` (None: ``dim / n_heads``) sharing
    ``n_kv_heads`` key/value heads (None: ``n_heads``, multi-head; fewer: grouped-query
    attention, Ainslie et al. 2023, as in Mixtral and Qwen3-MoE); ``qk_norm`` adds a
    learned RMSNorm over each head's query and key before RoPE (Qwen3, OLMoE).
    """

    vocab_size: int = 257
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    seq_len: int = 256
    ffn_dim: int = 768
    activation: Activation = "gelu"
    moe_every: int = 1
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "seq_len", "ffn_dim"):
            value = getattr(self, key)
            require(value >= 1, f"model.{key}", value, "must be >= 1")
        self._check_attention()
        require(
            0 <= self.moe_every <= self.n_layers,
            "model.moe_every",
            self.moe_every,
            f"must be in [0, model.n_layers={self.n_layers}] (0 = dense model, 1 = MoE in every layer)",
        )
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
        require(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")

    def _check_attention(self) -> None:
        if self.head_dim is None:
            require(
                self.dim % self.n_heads == 0,
                "model.n_heads",
                self.n_heads,
                f"must divide model.dim={self.dim} (or set model.head_dim)",
            )
            require(
                (self.dim // self.n_heads) % 2 == 0,
                "model.n_heads",
                self.n_heads,
                f"head size model.dim/model.n_heads={self.dim}/{self.n_heads} must be even for RoPE",
            )
        else:
            require(
                self.head_dim >= 2 and self.head_dim % 2 == 0,
                "model.head_dim",
                self.head_dim,
                "must be even and >= 2: RoPE rotates pairs of a head's dimensions (null = model.dim/model.n_heads)",
            )
        if self.n_kv_heads is not None:
            require(
                self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                "model.n_kv_heads",
                self.n_kv_heads,
                f"must divide model.n_heads={self.n_heads}: each key/value head serves an equal group of "
                "query heads (null = model.n_heads, multi-head attention)",
            )

    @property
    def head_size(self) -> int:
        """Dh: ``head_dim``, or ``dim / n_heads`` when it is null."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """G: ``n_kv_heads``, or ``n_heads`` when it is null."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def qkv_width(self) -> int:
        """Output features of the fused projection: H query heads and G key and value heads."""
        return (self.n_heads + 2 * self.kv_heads) * self.head_size

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` (0-based) is MoE when ``(layer + 1) % moe_every == 0``.

        moe_every=2 gives GLaM's every-other layer (layers 1, 3, 5, ...), moe_every=1 every
        layer, moe_every=0 none.
        """
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts: the router, capacity, the losses that shape routing, the experts.

    The routing menu beside softmax top-k (``score``, ``routed_scaling_factor``,
    ``expert_bias_update_rate``, ``n_groups``/``topk_groups``: ``moe.router.SigmoidRouter``;
    ``granularity``: ``fine_grained``). ``num_experts``, ``top_k``, ``expert_ffn_dim`` and
    ``num_shared_experts`` are the coarse values; the layer is built from ``fine_grained()``.
    """

    num_experts: int = 8
    top_k: int = 2
    router: Literal["topk", "sinkhorn", "hash", "expert_choice", "noisy_topk"] = "topk"
    capacity_factor: float | None = None
    drop_policy: Literal["position", "probability"] = "position"
    normalize_weights: bool = True
    jitter_eps: float = 0.0
    aux_loss_coeff: float = 0.01
    aux_loss_scope: Literal["micro_batch", "sequence", "global_batch"] = "micro_batch"
    z_loss_coeff: float = 1e-3
    expert_ffn_dim: int = 768
    activation: Activation = "gelu"
    num_shared_experts: int = 0
    kernels: Literal["auto", "fused", "torch"] = "auto"
    score: Literal["softmax", "sigmoid"] = "softmax"
    routed_scaling_factor: float = 1.0
    expert_bias_update_rate: float = 0.0
    n_groups: int = 1
    topk_groups: int | None = None
    granularity: int = 1
    expert_choice_scope: Literal["sequence", "micro_batch"] = "sequence"
    importance_loss_coeff: float = 0.0
    load_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        require(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        require(
            1 <= self.top_k <= self.num_experts,
            "moe.top_k",
            self.top_k,
            f"must be in [1, moe.num_experts={self.num_experts}]",
        )
        require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "moe.capacity_factor",
            self.capacity_factor,
            "must be > 0, or null for dropless routing",
        )
        # With k=1 a renormalised gate is identically 1.0 (softmax or sigmoid scores): the LM
        # loss would no longer reach the router, which then learns only from the aux loss.
        require(
            not (self.normalize_weights and self.top_k * self.granularity == 1),
            "moe.normalize_weights",
            self.normalize_weights,
            "with moe.top_k=1 every renormalised gate is 1.0 and the router gets no LM-loss "
            "gradient; set moe.normalize_weights=false (Switch uses the raw probability)",
        )
        require(
            0.0 <= self.jitter_eps < 1.0,
            "moe.jitter_eps",
            self.jitter_eps,
            "must be in [0, 1) (Switch uses 0.01; 0 disables jitter)",
        )
        require(self.aux_loss_coeff >= 0, "moe.aux_loss_coeff", self.aux_loss_coeff, "must be >= 0")
        require(self.z_loss_coeff >= 0, "moe.z_loss_coeff", self.z_loss_coeff, "must be >= 0")
        require(self.expert_ffn_dim >= 1, "moe.expert_ffn_dim", self.expert_ffn_dim, "must be >= 1")
        require(
            self.num_shared_experts >= 0,
            "moe.num_shared_experts",
            self.num_shared_experts,
            "must be >= 0",
        )
        self._check_routing_menu()
        self._check_expert_choice_and_noisy()

    def _check_routing_menu(self) -> None:
        """Sigmoid scores, bias balancing, group-limited routing and fine-grained experts."""
        require(
            self.routed_scaling_factor > 0,
            "moe.routed_scaling_factor",
            self.routed_scaling_factor,
            "must be > 0 (DeepSeek-V3: 2.5; 1.0 leaves the gates as they are)",
        )
        require(
            self.expert_bias_update_rate >= 0,
            "moe.expert_bias_update_rate",
            self.expert_bias_update_rate,
            "must be >= 0 (0 = no bias balancing; DeepSeek-V3: 1e-3)",
        )
        sigmoid_only = {
            "expert_bias_update_rate": self.expert_bias_update_rate > 0,
            "n_groups": self.n_groups != 1,
            "routed_scaling_factor": self.routed_scaling_factor != 1.0,
        }
        for key, used in sigmoid_only.items():
            require(
                not used or (self.score == "sigmoid" and self.router == "topk"),
                f"moe.{key}",
                getattr(self, key),
                f"needs moe.score=sigmoid and moe.router=topk (got score={self.score!r}, router={self.router!r})",
            )
        require(
            self.score == "softmax" or self.router == "topk",
            "moe.score",
            self.score,
            f"sigmoid scores need moe.router=topk (moe.router={self.router!r} scores by its own rule)",
        )
        require(self.granularity >= 1, "moe.granularity", self.granularity, "must be >= 1 (1 = coarse experts)")
        require(
            self.expert_ffn_dim % self.granularity == 0,
            "moe.granularity",
            self.granularity,
            f"must divide moe.expert_ffn_dim={self.expert_ffn_dim}: each expert is split into granularity "
            "experts of width expert_ffn_dim/granularity",
        )
        self._check_groups()

    def _check_expert_choice_and_noisy(self) -> None:
        """Expert-choice routing (``moe.expert_choice_router``) and noisy top-k gating with
        its importance and load losses (``moe.noisy_router``)."""
        require(
            self.router != "expert_choice" or self.capacity_factor is not None,
            "moe.capacity_factor",
            self.capacity_factor,
            "moe.router=expert_choice needs a capacity factor: each expert takes its top "
            "ceil(capacity_factor*T*top_k/num_experts) tokens (Zhou et al. 2022: 2.0)",
        )
        require(
            self.router != "expert_choice" or self.aux_loss_coeff == 0,
            "moe.aux_loss_coeff",
            self.aux_loss_coeff,
            "moe.router=expert_choice balances by construction (every expert takes the same number of tokens): "
            "set moe.aux_loss_coeff=0",
        )
        require(
            self.router != "noisy_topk" or self.top_k < self.num_experts,
            "moe.top_k",
            self.top_k,
            f"moe.router=noisy_topk needs moe.top_k < moe.num_experts={self.num_experts}: with every expert "
            "chosen the noise changes nothing and the load estimate is undefined",
        )
        for key in ("importance_loss_coeff", "load_loss_coeff"):
            value = getattr(self, key)
            require(value >= 0, f"moe.{key}", value, "must be >= 0 (Shazeer et al. 2017: 0.1)")
            require(
                value == 0 or self.router == "noisy_topk",
                f"moe.{key}",
                value,
                f"is a loss of moe.router=noisy_topk (moe.router={self.router!r}); set it to 0 or the router to noisy_topk",
            )

    def _check_groups(self) -> None:
        """Groups are over the ``routed_experts`` fine-grained experts (see ``fine_grained``)."""
        experts, top_k = self.num_experts * self.granularity, self.top_k * self.granularity
        require(
            self.n_groups >= 1 and experts % self.n_groups == 0,
            "moe.n_groups",
            self.n_groups,
            f"must be >= 1 and divide the routed experts moe.num_experts*moe.granularity={experts}",
        )
        require(
            self.topk_groups is None or 1 <= self.topk_groups <= self.n_groups,
            "moe.topk_groups",
            self.topk_groups,
            f"must be in [1, moe.n_groups={self.n_groups}] (null = moe.n_groups: every group eligible)",
        )
        held = self.eligible_groups * (experts // self.n_groups)
        require(
            top_k <= held,
            "moe.top_k",
            self.top_k,
            f"the {self.eligible_groups} eligible group(s) (moe.topk_groups) of {experts // self.n_groups} experts "
            f"hold {held} experts, fewer than the {top_k} chosen per token; raise moe.topk_groups",
        )
        require(
            self.n_groups == 1 or experts // self.n_groups >= 2,
            "moe.n_groups",
            self.n_groups,
            f"a group scores by the sum of its top-2 experts: each of the {experts} experts' groups needs >= 2",
        )

    @property
    def eligible_groups(self) -> int:
        """``topk_groups``, or ``n_groups`` when it is null."""
        return self.n_groups if self.topk_groups is None else self.topk_groups

    @property
    def routed_experts(self) -> int:
        """``E·G``: the experts the layer holds and routes to (``granularity`` G)."""
        return self.num_experts * self.granularity

    def fine_grained(self) -> MoEConfig:
        """The config of the layer that is built (Krajewski et al. 2024): each of the E
        experts split into G of width ``expert_ffn_dim / G``, so ``E·G`` experts, ``K·G``
        chosen, and the shared experts counted in those units (``S·G`` of width F/G, the same
        ``S·F`` hidden units). Total and active expert parameters are unchanged (the router
        grows to ``E·G·D``). G = 1 returns the config itself."""
        if self.granularity == 1:
            return self
        g = self.granularity
        return replace(
            self,
            num_experts=self.num_experts * g,
            top_k=self.top_k * g,
            expert_ffn_dim=self.expert_ffn_dim // g,
            num_shared_experts=self.num_shared_experts * g,
            granularity=1,
        )
