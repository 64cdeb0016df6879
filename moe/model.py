"""A decoder-only transformer language model with MoE feed-forward layers.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim (D/H), V vocab,
L layers, E experts, K experts per token.

Read top to bottom: RoPE -> attention -> block (attention + dense MLP or MoE) ->
the model, which returns the LM loss and the sum of every MoE layer's routing losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer, MoEStats
from moe.mlp import MLP


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
    """Causal multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x_BSD.shape
        # [B, S, 3D] -> 3 x [B, H, S, Dh]
        q, k, v = (
            self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        )
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        o_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # [B, H, S, Dh] -> [B, S, D]
        return self.out(o_BHSDh.transpose(1, 2).reshape(batch, seq, dim))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: MLP | MoELayer = MoELayer(cfg.dim, moe) if is_moe else MLP(cfg.dim, cfg.ffn_dim, cfg.activation)

    def forward(
        self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor, load_E: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SF, sin_SF)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            y_BSD, stats = self.ffn(h_BSD, load_E)
            return x_BSD + y_BSD, stats
        return x_BSD + self.ffn(h_BSD), None


@dataclass
class ModelOutput:
    """``loss = lm_loss + aux_loss + z_loss`` is what training minimises.

    ``aux_loss`` and ``z_loss`` are summed over MoE layers (each already scaled by its
    coefficient); ``moe_stats`` has one entry per MoE layer, in layer order.
    """

    logits_BSV: torch.Tensor
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    moe_stats: list[MoEStats]

    @property
    def loss(self) -> torch.Tensor:
        assert self.lm_loss is not None, "call the model with targets to get a loss"
        return self.lm_loss + self.aux_loss + self.z_loss


class Transformer(nn.Module):
    """Token embedding -> L blocks -> RMSNorm -> LM head (tied to the embedding if asked)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.moe_cfg = moe
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, moe, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos_SF, sin_SF = rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos_SF", cos_SF, persistent=False)
        self.register_buffer("rope_sin_SF", sin_SF, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; projections into the residual stream (attention out,
        MLP/expert out) scaled by ``1/sqrt(2L)`` so the residual's variance stays O(1)
        with depth (GPT-2); RMSNorm gains at 1."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("out.weight", "w_out.weight", "w_out_EFD")):
                nn.init.normal_(param, std=out_std)
            else:
                nn.init.normal_(param, std=std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self, ids_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, load_LE: torch.Tensor | None = None
    ) -> ModelOutput:
        """``load_LE``: per MoE layer, the global-batch assignment fraction the
        ``global_batch`` aux-loss scope uses (see ``moe.losses``); None = this batch's own."""
        seq = ids_BS.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.seq_len={self.cfg.seq_len}")
        x_BSD = self.embed(ids_BS)
        stats: list[MoEStats] = []
        for block in self.blocks:
            load_E = None if load_LE is None or not isinstance(block.ffn, MoELayer) else load_LE[len(stats)]
            x_BSD, layer_stats = block(x_BSD, self.rope_cos_SF, self.rope_sin_SF, load_E)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
        zero = logits_BSV.new_zeros((), dtype=torch.float32)
        return ModelOutput(
            logits_BSV=logits_BSV,
            lm_loss=lm_loss,
            aux_loss=sum((s.aux_loss for s in stats), zero),
            z_loss=sum((s.z_loss for s in stats), zero),
            moe_stats=stats,
        )
