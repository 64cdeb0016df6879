"""Our attention (grouped-query heads, head_dim != dim/n_heads, q/k RMSNorm) and whole model
against transformers' Qwen3-MoE and Mixtral, built from configs with random weights (nothing
downloaded) and copied into ours with ``moe.hf_weights``. transformers runs its eager
attention (matmul, softmax, ``repeat_kv``) with an explicit causal mask: an implementation
independent of the ``scaled_dot_product_attention`` call ours makes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.hf_weights import fuse_qkv, split_qkv, state_dict_from_hf
from moe.model import Attention, Transformer, rope_tables

transformers = pytest.importorskip("transformers")

BATCH, SEQ, DIM = 2, 16, 32
TOL = 1e-5
# head_dim 16 with 4 heads is 2·dim wide, as in Qwen3-30B-A3B (32 heads x 128 on 2048).
CASES: dict[str, dict[str, Any]] = {
    "qwen3-gqa-qknorm-wide-heads": {"family": "qwen3", "heads": 4, "kv_heads": 2, "head_dim": 16},
    "qwen3-one-kv-head": {"family": "qwen3", "heads": 4, "kv_heads": 1, "head_dim": 6},
    "mixtral-gqa": {"family": "mixtral", "heads": 8, "kv_heads": 2, "head_dim": None},
    "mixtral-mha": {"family": "mixtral", "heads": 4, "kv_heads": 4, "head_dim": None},
}


def _hf_config(case: dict[str, Any], layers: int = 2, tie: bool = False) -> Any:
    common = dict(
        vocab_size=50, hidden_size=DIM, num_hidden_layers=layers, num_attention_heads=case["heads"],
        num_key_value_heads=case["kv_heads"], rms_norm_eps=1e-5, max_position_embeddings=SEQ,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_experts_per_tok=2,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    if case["family"] == "qwen3":
        # decoder_sparse_step=2: layer 0 dense (intermediate_size), layer 1 MoE, as our moe_every=2
        return transformers.Qwen3MoeConfig(
            **common, head_dim=case["head_dim"], intermediate_size=48, moe_intermediate_size=24,
            num_experts=4, norm_topk_prob=True, decoder_sparse_step=2,
        )
    return transformers.MixtralConfig(**common, head_dim=case["head_dim"], intermediate_size=24, num_local_experts=4)


def _our_configs(case: dict[str, Any], layers: int = 2, tie: bool = False) -> tuple[ModelConfig, MoEConfig]:
    qwen = case["family"] == "qwen3"
    model = ModelConfig(
        vocab_size=50, dim=DIM, n_layers=layers, n_heads=case["heads"], n_kv_heads=case["kv_heads"],
        head_dim=case["head_dim"], qk_norm=qwen, seq_len=SEQ, ffn_dim=48, activation="swiglu",
        moe_every=2 if qwen else 1, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=tie,
    )
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, activation="swiglu", normalize_weights=True,
                    kernels="torch")
    return model, moe


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere; norm gains near 1 but not 1, so a gain left out or
    mapped to the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.2 * noise if param.dim() == 1 else 0.2 * noise)


def _causal_mask() -> torch.Tensor:
    return torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def test_fused_rows_are_group_major() -> None:
    """4 query heads in 2 groups, head size 1: rows q0 q1 k0 v0 | q2 q3 k1 v1, so a
    contiguous half (a tp=2 shard) holds group 0 or group 1 whole."""
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = fuse_qkv(q, k, v, n_heads=4, n_kv_heads=2, head_dim=1)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 4, 2, 1), (q, k, v), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_transformers(name: str) -> None:
    """Output and input gradient of one attention sublayer (RoPE included) on the same weights."""
    case = CASES[name]
    hf_cfg = _hf_config(case)
    module = (transformers.models.qwen3_moe.modeling_qwen3_moe if case["family"] == "qwen3"
              else transformers.models.mixtral.modeling_mixtral)
    attn_cls = module.Qwen3MoeAttention if case["family"] == "qwen3" else module.MixtralAttention
    rope_cls = module.Qwen3MoeRotaryEmbedding if case["family"] == "qwen3" else module.MixtralRotaryEmbedding
    hf = attn_cls(hf_cfg, layer_idx=0)
    _randomize(hf, seed=1)
    cfg, _ = _our_configs(case)
    ours = Attention(cfg)
    w = {n: p.detach() for n, p in hf.named_parameters()}
    state = {"qkv.weight": fuse_qkv(w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"],
                                    cfg.n_heads, cfg.kv_heads, cfg.head_size),
             "out.weight": w["o_proj.weight"]}
    if cfg.qk_norm:
        state |= {"q_norm.weight": w["q_norm.weight"], "k_norm.weight": w["k_norm.weight"]}
    ours.load_state_dict(state)

    x = torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(2))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    positions = torch.arange(SEQ)[None].expand(BATCH, -1)
    want, _ = hf(x_hf, rope_cls(hf_cfg)(x_hf, positions), attention_mask=_causal_mask())
    got = ours(x_ours, *rope_tables(SEQ, cfg.head_size, cfg.rope_theta))
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert want.abs().max() > 0.1  # not a vanishing output that any code would match
    assert _max_diff(got, want) < TOL
    assert _max_diff(x_ours.grad, x_hf.grad) < TOL


@pytest.mark.parametrize("name", ["qwen3-gqa-qknorm-wide-heads", "mixtral-gqa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_matches_transformers(name: str, tie: bool) -> None:
    """Whole-model logits: embedding, dense and MoE blocks (softmax router, top-2 renormalised
    gates, SwiGLU experts), final norm and LM head, on the same weights."""
    case = CASES[name]
    hf_cfg = _hf_config(case, tie=tie)
    hf_cls = transformers.Qwen3MoeForCausalLM if case["family"] == "qwen3" else transformers.MixtralForCausalLM
    hf = hf_cls(hf_cfg).eval()
    _randomize(hf, seed=4)
    cfg, moe = _our_configs(case, tie=tie)
    ours = Transformer(cfg, moe).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_size))

    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits_BSV
    assert want.abs().max() > 0.1
    assert _max_diff(got, want) < TOL
