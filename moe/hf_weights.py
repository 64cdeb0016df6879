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
"""

from __future__ import annotations

import torch


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
