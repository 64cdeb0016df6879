"""``moe/accounting.py`` against the built modules: each router's parameters are the
module's (sum of numel) and each MoE layer's forward FLOPs are the matmuls torch's
``FlopCounterMode`` counts on a forward of the layer, for every router of the menu.

Legend: B sequences, S positions, T = B·S tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe.accounting import moe_layer_forward_flops_per_token, param_counts, router_params, train_flops_per_token
from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.model import Transformer

B, S, D, V = 3, 10, 32, 50
MODEL = ModelConfig(vocab_size=V, dim=D, n_layers=2, n_heads=2, seq_len=S, ffn_dim=64)
BASE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)
# expert choice: cf·S·K/E = 1.5·10·1/4 = 3.75, so each expert takes C = 4 of a sequence's 10
# tokens: 1.6 expert rows per token, not cf·K = 1.5 (and C = 12 of the micro-batch's 30: 1.6)
CHOICE = {"router": "expert_choice", "capacity_factor": 1.5, "top_k": 1, "aux_loss_coeff": 0.0, "normalize_weights": False}
VARIANTS = {
    "topk": {},
    "sinkhorn": {"router": "sinkhorn", "aux_loss_coeff": 0.0},
    "hash": {"router": "hash", "top_k": 1, "normalize_weights": False},
    "noisy_topk": {"router": "noisy_topk", "importance_loss_coeff": 0.1, "load_loss_coeff": 0.1},
    "expert_choice": CHOICE,
    "expert_choice_micro_batch": {**CHOICE, "expert_choice_scope": "micro_batch", "capacity_factor": 1.3},
    "sigmoid_groups_bias": {"score": "sigmoid", "expert_bias_update_rate": 1e-3, "n_groups": 2, "topk_groups": 1,
                            "num_experts": 8, "num_shared_experts": 1},
    "granularity_2": {"granularity": 2, "activation": "swiglu", "num_shared_experts": 1},
}


def _grouped_mm_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``torch._grouped_mm`` of ``x [N, D]`` by ``w [E, D, F]`` (the forward's form): 2·N·D·F.
    FlopCounterMode has no formula of its own for it (torch 2.13)."""
    assert len(x_shape) == 2 and len(w_shape) == 3
    return 2 * x_shape[0] * x_shape[1] * w_shape[2]


def _counted(fn: Any) -> dict[str, int]:
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_router_params_are_the_built_routers(variant: str) -> None:
    moe = dataclasses.replace(BASE, **VARIANTS[variant])
    layer = MoELayer(D, moe, V)
    assert router_params(D, moe.fine_grained()) == sum(p.numel() for p in layer.router.parameters())
    model = Transformer(MODEL, moe)
    assert param_counts(MODEL, moe).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_layer_flops_are_the_matmuls_its_forward_runs(variant: str) -> None:
    """Training forward (the noisy router's second matmul runs in training only)."""
    moe = dataclasses.replace(BASE, **VARIANTS[variant])
    torch.manual_seed(0)
    layer = MoELayer(D, moe, V).train()
    x_BSD, ids_BS = torch.randn(B, S, D), torch.randint(0, V, (B, S))
    counted = _counted(lambda: layer(x_BSD, ids_BS=ids_BS))
    group = S if moe.expert_choice_scope == "sequence" else B * S
    assert sum(counted.values()) / (B * S) == pytest.approx(moe_layer_forward_flops_per_token(D, moe, group), rel=1e-12)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "expert_choice_micro_batch"])
def test_train_flops_per_token_is_three_forwards_of_the_counted_matmuls(variant: str) -> None:
    """A whole model's forward: every matmul but attention's scores and values (SDPA, the
    formula's second term) is a third of the formula's first term per token."""
    moe = dataclasses.replace(BASE, **VARIANTS[variant])
    torch.manual_seed(0)
    model = Transformer(MODEL, moe).train()
    ids_BS = torch.randint(0, V, (B, S))
    counted = _counted(lambda: model(ids_BS))
    matmul = sum(n for op, n in counted.items() if "scaled_dot_product" not in op)
    attention = 6.0 * MODEL.n_layers * S * MODEL.dim
    assert 3 * matmul / (B * S) == pytest.approx(train_flops_per_token(MODEL, moe) - attention, rel=1e-12)


def _one_process(moe: MoEConfig) -> Any:
    from parallel.config import ParallelConfig
    from parallel.simulator.predict import Layout

    return Layout.build(ParallelConfig(), MODEL, moe, B, B)


@pytest.mark.parametrize("variant", VARIANTS)
def test_predictor_params_are_the_built_models(variant: str) -> None:
    """``moe simulate``'s parameters (names, sizes) for each router: noisy top-k's two
    matrices, hash routing's none, fine-grained experts as built."""
    from parallel.simulator.predict import rank_params

    moe = dataclasses.replace(BASE, **VARIANTS[variant])
    built = {(name, p.numel()) for name, p in Transformer(MODEL, moe).named_parameters()}
    assert {(s.name, s.numel) for s in rank_params(MODEL, moe, _one_process(moe))} == built


@pytest.mark.parametrize("variant", VARIANTS)
def test_predictor_flops_are_the_matmuls_a_forward_runs(variant: str) -> None:
    """``micro_batch_flops`` (its matmuls and the experts' rows, ``rows_per_token``) against
    FlopCounterMode on a one-process forward of the micro-batch (attention left out: SDPA's
    count is its own convention)."""
    from parallel.simulator.predict import micro_batch_flops, rows_per_token

    moe = dataclasses.replace(BASE, **VARIANTS[variant])
    layout = _one_process(moe)
    torch.manual_seed(0)
    model = Transformer(MODEL, moe).train()
    ids_BS = torch.randint(0, V, (B, S))
    counted = _counted(lambda: model(ids_BS))
    rows = layout.routed_tokens * rows_per_token(moe.fine_grained(), layout)
    predicted = micro_batch_flops(MODEL, moe, layout, 0, rows)
    assert predicted["matmul"] + predicted["grouped_mm"] == pytest.approx(
        sum(n for op, n in counted.items() if "scaled_dot_product" not in op), rel=1e-12)
