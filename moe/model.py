"""A decoder-only transformer language model with MoE feed-forward layers.

Legend: B batch, S sequence, D model dim, H query heads, G key/value heads (query
groups), R = H/G query heads per group, Dh head dim (``model.head_dim``, by default D/H),
W = (H + 2G)·Dh the fused projection's width, V vocab, L layers, E experts, K experts
per token.

Read top to bottom: RoPE -> attention -> block (attention + dense MLP or MoE) ->
the model, which returns the LM loss and the sum of every MoE layer's routing losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer, MoEStats
from moe.mlp import MLP
from moe.recompute import checkpointed


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[S, Dh/2]`` for rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_SF.cos().float(), angles_SF.sin().float()


def apply_rope(x_BHSDh: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of each head by position-dependent angles.

    The half-split layout (GPT-NeoX) is megatron-core's default (``rotary_interleaved=False``).
    """
    seq = x_BHSDh.shape[2]
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    cos, sin = cos_SF[:seq], sin_SF[:seq]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x_BHSDh.dtype)


class Attention(nn.Module):
    """Causal self-attention, multi-head or grouped-query, through ``scaled_dot_product_attention``.

    The fused projection's rows are group-major: for each of the G key/value groups, its R
    query heads, then its key head, then its value head, ``[G][R + 2][Dh]``
    (``moe.hf_weights.fuse_qkv`` builds it from separate q, k, v weights). A contiguous
    slice of rows (a tensor-parallel shard) thus holds whole groups; the number of groups
    is read off the projection's output width, which is how a sharded copy runs its heads.
    With G = H (R = 1) this is the multi-head layout ``[H][q, k, v][Dh]``. Query head
    ``g·R + r`` attends with key/value head ``g`` (the ``repeat_interleave`` pairing of
    ``enable_gqa``, and of transformers' ``repeat_kv``); ``out`` reads the heads in that order.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_size
        self.group_size = cfg.n_heads // cfg.kv_heads
        self.qkv = nn.Linear(cfg.dim, cfg.qkv_width, bias=False)
        # One gain of Dh per projection, shared by all heads (Qwen3, OLMoE).
        self.q_norm = nn.RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.out = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        qkv_BSW = self.qkv(x_BSD)
        # B and S are read off the projection's output, which may hold more rows than its
        # input (a sequence-parallel projection gathers the batch first).
        batch, seq, _ = qkv_BSW.shape
        r = self.group_size
        # [B, S, G*(R+2)*Dh] -> [B, S, G, R+2, Dh]
        qkv_BSGRDh = qkv_BSW.view(batch, seq, -1, r + 2, self.head_dim)
        q_BSGRDh = qkv_BSGRDh[:, :, :, :r]
        k_BSGDh, v_BSGDh = qkv_BSGRDh[:, :, :, r], qkv_BSGRDh[:, :, :, r + 1]
        if self.q_norm is not None and self.k_norm is not None:
            # Normed before the flatten below, which copies when G, R > 1: the norm then
            # keeps a view of the projection's output, not a copy, for the backward.
            q_BSGRDh, k_BSGDh = self.q_norm(q_BSGRDh), self.k_norm(k_BSGDh)
        # query head h = g·R + r: [B, S, G, R, Dh] -> [B, S, H, Dh]
        q_BSHDh = q_BSGRDh.flatten(2, 3)
        q_BHSDh = apply_rope(q_BSHDh.transpose(1, 2), cos_SF, sin_SF)
        k_BGSDh = apply_rope(k_BSGDh.transpose(1, 2), cos_SF, sin_SF)
        o_BHSDh = F.scaled_dot_product_attention(
            q_BHSDh, k_BGSDh, v_BSGDh.transpose(1, 2), is_causal=True, enable_gqa=r > 1
        )
        # [B, H, S, Dh] -> [B, S, H*Dh]
        return self.out(o_BHSDh.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    ``recompute_block`` / ``recompute_norms``: set by ``moe.recompute.apply_recompute``
    (the whole block / its two norms recomputed in the backward).
    """

    recompute_block: bool = False
    recompute_norms: bool = False

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: MLP | MoELayer = (
            MoELayer(cfg.dim, moe, cfg.vocab_size) if is_moe else MLP(cfg.dim, cfg.ffn_dim, cfg.activation)
        )

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SF: torch.Tensor,
        sin_SF: torch.Tensor,
        load_E: torch.Tensor | None = None,
        ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """``ids_BS``: the token ids, for an MoE layer whose router reads them (hash routing)."""
        x_BSD = x_BSD + self.attn(self._norm(self.attn_norm, x_BSD), cos_SF, sin_SF)
        h_BSD = self._norm(self.ffn_norm, x_BSD)
        if isinstance(self.ffn, MoELayer):
            y_BSD, stats = self.ffn(h_BSD, load_E, ids_BS)
            return x_BSD + y_BSD, stats
        return x_BSD + self.ffn(h_BSD), None

    def _norm(self, norm: nn.RMSNorm, x_BSD: torch.Tensor) -> torch.Tensor:
        return checkpointed(norm, x_BSD) if self.recompute_norms else norm(x_BSD)


@dataclass
class ModelOutput:
    """``loss = lm_loss + aux_loss + z_loss`` is what training minimises.

    ``aux_loss`` and ``z_loss`` are summed over this model's MoE layers (each already
    scaled by its coefficient); ``moe_stats`` has one entry per MoE layer, in layer order.
    A model without an LM head (a pipeline stage before the last) returns its hidden
    states in ``hidden_BSD`` and no logits.
    """

    logits_BSV: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    moe_stats: list[MoEStats]
    hidden_BSD: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        assert self.lm_loss is not None, "call the model with targets to get a loss"
        return self.lm_loss + self.aux_loss + self.z_loss


class CrossEntropy(nn.Module):
    """Mean next-token cross-entropy in fp32; tensor parallelism swaps in a vocab-parallel one."""

    def forward(self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def model_pieces(cfg: ModelConfig, moe: MoEConfig) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The model's top-level pieces in construction order, each with what builds it: the
    embedding, every block, the final norm, the LM head (tied or not)."""
    return [
        ("embed", partial(nn.Embedding, cfg.vocab_size, cfg.dim)),
        *((f"blocks.{i}", partial(Block, cfg, moe, cfg.is_moe_layer(i))) for i in range(cfg.n_layers)),
        ("norm", partial(nn.RMSNorm, cfg.dim, eps=cfg.norm_eps)),
        ("lm_head", partial(nn.Linear, cfg.dim, cfg.vocab_size, bias=False)),
    ]


def init_parameters(named: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig) -> None:
    """N(0, init_std) everywhere; projections into the residual stream (attention out,
    MLP/expert out) scaled by ``1/sqrt(2L)`` so the residual's variance stays O(1) with
    depth (GPT-2); RMSNorm gains at 1. In the order given, from the global generator."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    for name, param in named:
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
        elif name.endswith(("out.weight", "w_out.weight", "w_out_EFD")):
            nn.init.normal_(param, std=out_std)
        else:
            nn.init.normal_(param, std=std)


class Transformer(nn.Module):
    """Token embedding -> L blocks -> RMSNorm -> LM head (tied to the embedding if asked).

    Blocks are keyed by their global index (``blocks.5.attn...``) so that parameter names
    are the same in every layout. A pipeline stage is this model with some blocks removed
    and ``embed`` (first stage) or ``norm``/``lm_head`` (last stage) set to None; the
    forward skips what is absent (as torchtitan's models do).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, pieces: dict[str, nn.Module] | None = None) -> None:
        """``pieces``: already built and initialised pieces (``build_streamed``), by their
        ``model_pieces`` names; those absent are left out (None, or no block). None: build
        and initialise every piece here."""
        super().__init__()
        self.cfg = cfg
        self.moe_cfg = moe
        built = {name: make() for name, make in model_pieces(cfg, moe)} if pieces is None else pieces
        self.embed: nn.Embedding | None = built.get("embed")
        self.blocks = nn.ModuleDict({n.removeprefix("blocks."): m for n, m in built.items() if n.startswith("blocks.")})
        self.norm: nn.RMSNorm | None = built.get("norm")
        self.lm_head: nn.Linear | None = built.get("lm_head")
        self.loss_fn: nn.Module = CrossEntropy()
        if cfg.tie_embeddings and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight
        cos_SF, sin_SF = rope_tables(cfg.seq_len, cfg.head_size, cfg.rope_theta)
        self.register_buffer("rope_cos_SF", cos_SF, persistent=False)
        self.register_buffer("rope_sin_SF", sin_SF, persistent=False)
        if pieces is None:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init_parameters`` over the whole model (a tied LM head once, as the embedding)."""
        init_parameters(self.named_parameters(), self.cfg)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks.values() if isinstance(b.ffn, MoELayer)]

    def moe_layer_index(self, block: str) -> int:
        """Global index, among all MoE layers of the full model, of block ``block``'s MoE layer."""
        return sum(self.cfg.is_moe_layer(i) for i in range(int(block)))

    def forward(
        self,
        ids_BS: torch.Tensor | None,
        targets_BS: torch.Tensor | None = None,
        load_LE: torch.Tensor | None = None,
        hidden_BSD: torch.Tensor | None = None,
    ) -> ModelOutput:
        """``ids_BS`` on a model with an embedding, else ``hidden_BSD`` from the previous stage.

        ``load_LE``: per MoE layer of the *full* model (global order), the global-batch
        assignment fraction the ``global_batch`` aux-loss scope uses (see ``moe.losses``);
        None = this batch's own.
        """
        if self.embed is not None:
            if ids_BS.shape[1] > self.cfg.seq_len:
                raise ValueError(f"sequence length {ids_BS.shape[1]} exceeds model.seq_len={self.cfg.seq_len}")
            x_BSD = self.embed(ids_BS)
        else:
            x_BSD = hidden_BSD
        stats: list[MoEStats] = []
        for name, block in self.blocks.items():
            is_moe = isinstance(block.ffn, MoELayer)
            load_E = None if load_LE is None or not is_moe else load_LE[self.moe_layer_index(name)]
            # A recomputed block returns its first forward's outputs (stats included): the
            # recompute in the backward only refills what autograd needs.
            run = partial(checkpointed, block) if block.recompute_block else block
            x_BSD, layer_stats = run(x_BSD, self.rope_cos_SF, self.rope_sin_SF, load_E, ids_BS)
            if layer_stats is not None:
                stats.append(layer_stats)
        zero = x_BSD.new_zeros((), dtype=torch.float32)
        aux_loss = sum((s.aux_loss for s in stats), zero)
        z_loss = sum((s.z_loss for s in stats), zero)
        if self.lm_head is None:
            return ModelOutput(None, None, aux_loss, z_loss, stats, hidden_BSD=x_BSD)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        lm_loss = None if targets_BS is None else self.loss_fn(logits_BSV, targets_BS)
        return ModelOutput(logits_BSV, lm_loss, aux_loss, z_loss, stats)


def build_streamed(
    cfg: ModelConfig, moe: MoEConfig, keep: Callable[[str], bool], finish: Callable[[str, nn.Module], None]
) -> Transformer:
    """``Transformer(cfg, moe)`` holding only the pieces ``keep`` names, each passed to
    ``finish`` (which may shard it in place) as soon as it is built: the pieces' values are
    exactly the whole model's, but at most one whole piece (the largest block) exists at a
    time, never the whole model.

    The whole model draws from the global generator twice: each piece's constructor (e.g.
    ``nn.Linear``'s own init) in construction order, then ``reset_parameters`` over all
    parameters in the same order. So a first pass builds and drops every piece, recording
    the generator's state before each; a second builds each piece again from its recorded
    state on a forked generator (its constructor draws what it drew in the whole model,
    ``NoisyTopKRouter``'s salt included) and initialises it from the main generator, which
    the first pass left where ``reset_parameters`` starts. A tied LM head is the embedding:
    not initialised again, tied after (``keep`` must keep the embedding with it).
    """
    plan = model_pieces(cfg, moe)
    states = []
    for _, make in plan:  # pass 1: where each constructor starts, and where the init starts
        states.append(torch.get_rng_state())
        make()
    built: dict[str, nn.Module] = {}
    for (name, make), state in zip(plan, states, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            piece = make()
        if not (cfg.tie_embeddings and name == "lm_head"):
            init_parameters(piece.named_parameters(prefix=name), cfg)
        if keep(name):
            finish(name, piece)
            built[name] = piece
    return Transformer(cfg, moe, built)
