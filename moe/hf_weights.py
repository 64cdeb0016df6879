"""Weights in transformers' layout (Mixtral, Qwen3-MoE) mapped to ``moe.model.Transformer``'s.

Legend: D model dim, H query heads, G key/value heads, R = H/G query heads per group,
Dh head dim, E experts, F hidden width (of an expert, or of a dense MLP).

Three layouts differ; everything else is the same tensor under another name:

- Attention: transformers keeps ``q_proj [H·Dh, D]``, ``k_proj``/``v_proj [G·Dh, D]``; ours
  fuses them group-major, ``[G][R + 2][Dh]`` rows (``fuse_qkv``; ``moe.model.Attention``
  says why). RoPE needs no permutation: both rotate (first half, second half) pairs of each
  head (transformers' ``rotate_half``; the GPT-NeoX layout), and transformers' conversion
  scripts already permuted Meta's interleaved-pair checkpoints into it.
- SwiGLU: transformers keeps gate and up as separate matrices (dense MLP: ``gate_proj`` and
  ``up_proj [F, D]``; experts: ``gate_up_proj [E, 2F, D]``, gate rows first); ours
  interleaves (gate, up) pairs (``moe.mlp.swiglu``), and the experts' weights are stored
  input-major (``w_in_EDF``, ``w_out_EFD``).
- Names: ``model.layers.{i}.self_attn.o_proj`` is ``blocks.{i}.attn.out``, and so on
  (``state_dict_from_hf``).

Two forms of a transformers state dict: the in-memory one (``model.state_dict()``, experts
fused as ``gate_up_proj``; ``state_dict_from_hf``) and the saved one (``save_pretrained``'s
safetensors, one tensor per expert projection, Mixtral's under ``block_sparse_moe`` as
``w1``/``w3``/``w2``). ``weight_table`` maps the saved form both ways, one ``Entry`` per
tensor of ours: the HF tensors it is made of and the two conversions, each exact (only
reshapes, stacks and transposes), so an import followed by an export gives the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.config import ModelConfig, MoEConfig


def fuse_qkv(
    q_HDhD: torch.Tensor, k_GDhD: torch.Tensor, v_GDhD: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """``attn.qkv.weight [G·(R+2)·Dh, D]`` from transformers' ``q_proj``, ``k_proj``, ``v_proj`` weights."""
    dim = q_HDhD.shape[1]
    # [H·Dh, D] -> [G, R, Dh, D]; [G·Dh, D] -> [G, 1, Dh, D]
    q_GRDhD = q_HDhD.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, dim)
    k_G1DhD = k_GDhD.reshape(n_kv_heads, 1, head_dim, dim)
    v_G1DhD = v_GDhD.reshape(n_kv_heads, 1, head_dim, dim)
    # [G, R+2, Dh, D] -> [G·(R+2)·Dh, D]
    return torch.cat([q_GRDhD, k_G1DhD, v_G1DhD], dim=1).reshape(-1, dim)


def split_qkv(
    qkv_WD: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_qkv``: ``(q_proj [H·Dh, D], k_proj [G·Dh, D], v_proj [G·Dh, D])``."""
    r = n_heads // n_kv_heads
    # [G·(R+2)·Dh, D] -> [G, R+2, Dh, D]
    qkv_GRDhD = qkv_WD.reshape(n_kv_heads, r + 2, head_dim, -1)
    q_HDhD = qkv_GRDhD[:, :r].reshape(n_heads * head_dim, -1)
    k_GDhD = qkv_GRDhD[:, r].reshape(n_kv_heads * head_dim, -1)
    v_GDhD = qkv_GRDhD[:, r + 1].reshape(n_kv_heads * head_dim, -1)
    return q_HDhD, k_GDhD, v_GDhD


def fuse_gate_up(gate_FD: torch.Tensor, up_FD: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP's ``w_in.weight [2F, D]``: rows 2i and 2i+1 are gate row i and up row i."""
    # [F, 2, D] -> [2F, D]
    return torch.stack([gate_FD, up_FD], dim=1).flatten(0, 1)


def experts_from_hf(gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in_EDF [E, D, 2F], w_out_EFD [E, F, D])`` from transformers' fused expert weights
    (``gate_up_proj [E, 2F, D]`` with the gate rows first, ``down_proj [E, D, F]``)."""
    gate_EFD, up_EFD = gate_up_E2FD.chunk(2, dim=1)
    # [E, F, 2, D] -> [E, 2F, D] -> [E, D, 2F]
    w_in_EDF = torch.stack([gate_EFD, up_EFD], dim=2).flatten(1, 2).transpose(1, 2)
    return w_in_EDF.contiguous(), down_EDF.transpose(1, 2).contiguous()


def _block_from_hf(hf: dict[str, torch.Tensor], i: int, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    src, dst = f"model.layers.{i}.", f"blocks.{i}."
    attn = src + "self_attn."
    out = {
        dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
        dst + "attn.qkv.weight": fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], n_heads, n_kv_heads, head_dim
        ),
        dst + "attn.out.weight": hf[attn + "o_proj.weight"],
        dst + "ffn_norm.weight": hf[src + "post_attention_layernorm.weight"],
    }
    for norm in ("q_norm", "k_norm"):
        if attn + norm + ".weight" in hf:
            out[dst + f"attn.{norm}.weight"] = hf[attn + norm + ".weight"]
    mlp = src + "mlp."
    if mlp + "gate.weight" in hf:
        w_in, w_out = experts_from_hf(hf[mlp + "experts.gate_up_proj"], hf[mlp + "experts.down_proj"])
        out |= {dst + "ffn.router.weight_ED": hf[mlp + "gate.weight"], dst + "ffn.experts.w_in_EDF": w_in,
                dst + "ffn.experts.w_out_EFD": w_out}
    else:
        out |= {dst + "ffn.w_in.weight": fuse_gate_up(hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]),
                dst + "ffn.w_out.weight": hf[mlp + "down_proj.weight"]}
    return out


def state_dict_from_hf(
    hf: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """Our ``Transformer`` state dict from a transformers ``MixtralForCausalLM`` or
    ``Qwen3MoeForCausalLM`` state dict (SwiGLU MLPs and experts, no shared experts, no
    attention biases). A tied LM head comes back as ``lm_head.weight`` equal to the embedding."""
    out = {"embed.weight": hf["model.embed_tokens.weight"]}
    for i in range(n_layers):
        out |= _block_from_hf(hf, i, n_heads, n_kv_heads, head_dim)
    out["norm.weight"] = hf["model.norm.weight"]
    out["lm_head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    return out


# -- the saved (safetensors) form, both ways ------------------------------------------------


@dataclass(frozen=True)
class HFNames:
    """Where a transformers architecture's saved checkpoint keeps its feed-forward weights:
    ``model.layers.{i}.<ffn>`` holds the dense MLP (``gate_proj``, ``up_proj``, ``down_proj``)
    or the router (``gate``) and experts (``experts.{e}.<gate|up|down>.weight``)."""

    ffn: str
    gate: str
    up: str
    down: str
    moe: bool


# The architectures ``weight_table`` maps (``moe ckpt import``/``export``).
HF_NAMES: dict[str, HFNames] = {
    "MixtralForCausalLM": HFNames("block_sparse_moe", "w1", "w3", "w2", moe=True),
    "Qwen3MoeForCausalLM": HFNames("mlp", "gate_proj", "up_proj", "down_proj", moe=True),
    "LlamaForCausalLM": HFNames("mlp", "gate_proj", "up_proj", "down_proj", moe=False),
    "Qwen3ForCausalLM": HFNames("mlp", "gate_proj", "up_proj", "down_proj", moe=False),
}


@dataclass(frozen=True)
class Entry:
    """One tensor of ours (``ours``) and the transformers tensors it is made of (``hf``):
    ``to_ours(hf tensors in that order)`` and its inverse ``to_hf(ours) -> hf tensors``."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


def _same(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _one(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


def split_gate_up(w_in_2FD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_gate_up``: ``(gate [F, D], up [F, D])``."""
    # [2F, D] -> [F, 2, D]
    gate_FD, up_FD = w_in_2FD.unflatten(0, (-1, 2)).unbind(1)
    return gate_FD.contiguous(), up_FD.contiguous()


def _experts_in(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``w_in_EDF [E, D, 2F]`` from ``[gate_0, up_0, gate_1, up_1, ...]`` (each ``[F, D]``)."""
    return torch.stack([fuse_gate_up(g, u).T for g, u in zip(tensors[0::2], tensors[1::2], strict=True)]).contiguous()


def _experts_in_hf(w_in_EDF: torch.Tensor) -> list[torch.Tensor]:
    return [w for e in range(w_in_EDF.shape[0]) for w in split_gate_up(w_in_EDF[e].T)]


def _experts_out(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``w_out_EFD [E, F, D]`` from ``[down_0, down_1, ...]`` (each ``[D, F]``)."""
    return torch.stack([d.T for d in tensors]).contiguous()


def _experts_out_hf(w_out_EFD: torch.Tensor) -> list[torch.Tensor]:
    return [w.T.contiguous() for w in w_out_EFD]


def _qkv(model: ModelConfig) -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], Callable[[torch.Tensor], list[torch.Tensor]]]:
    heads = (model.n_heads, model.kv_heads, model.head_size)
    return (lambda t: fuse_qkv(t[0], t[1], t[2], *heads),
            lambda w: [x.contiguous() for x in split_qkv(w, *heads)])


def _ffn_entries(arch: HFNames, src: str, dst: str, is_moe: bool, num_experts: int) -> list[Entry]:
    ffn = f"{src}{arch.ffn}."
    if not is_moe:
        return [
            Entry(dst + "ffn.w_in.weight", (ffn + "gate_proj.weight", ffn + "up_proj.weight"),
                  lambda t: fuse_gate_up(t[0], t[1]), lambda w: list(split_gate_up(w))),
            Entry(dst + "ffn.w_out.weight", (ffn + "down_proj.weight",), _same, _one),
        ]
    experts = range(num_experts)
    return [
        Entry(dst + "ffn.router.weight_ED", (ffn + "gate.weight",), _same, _one),
        Entry(dst + "ffn.experts.w_in_EDF",
              tuple(f"{ffn}experts.{e}.{p}.weight" for e in experts for p in (arch.gate, arch.up)),
              _experts_in, _experts_in_hf),
        Entry(dst + "ffn.experts.w_out_EFD", tuple(f"{ffn}experts.{e}.{arch.down}.weight" for e in experts),
              _experts_out, _experts_out_hf),
    ]


def weight_table(architecture: str, model: ModelConfig, moe: MoEConfig) -> list[Entry]:
    """Every tensor of our ``Transformer(model, moe)`` (its ``state_dict`` names, the tied LM
    head left out: it is the embedding) against the saved checkpoint of ``architecture``
    (a key of ``HF_NAMES``). Layer ``i`` is an MoE layer where ``model.is_moe_layer(i)``."""
    arch = HF_NAMES[architecture]
    fuse, split = _qkv(model)
    table = [Entry("embed.weight", ("model.embed_tokens.weight",), _same, _one)]
    for i in range(model.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn = src + "self_attn."
        table += [
            Entry(dst + "attn_norm.weight", (src + "input_layernorm.weight",), _same, _one),
            Entry(dst + "attn.qkv.weight", (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                  fuse, split),
            Entry(dst + "attn.out.weight", (attn + "o_proj.weight",), _same, _one),
        ]
        if model.qk_norm:
            table += [Entry(f"{dst}attn.{n}.weight", (f"{attn}{n}.weight",), _same, _one) for n in ("q_norm", "k_norm")]
        table.append(Entry(dst + "ffn_norm.weight", (src + "post_attention_layernorm.weight",), _same, _one))
        table += _ffn_entries(arch, src, dst, model.is_moe_layer(i), moe.num_experts)
    table.append(Entry("norm.weight", ("model.norm.weight",), _same, _one))
    if not model.tie_embeddings:
        table.append(Entry("lm_head.weight", ("lm_head.weight",), _same, _one))
    return table
