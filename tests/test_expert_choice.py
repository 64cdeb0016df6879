"""Expert-choice routing (Zhou et al. 2022): each expert takes its top C tokens of a group,
gates are the tokens' softmax probabilities; against a loop-by-loop reference, per group
scope, and the refusals (no capacity factor, an aux loss, a TP layout that splits sequences).

Legend: B sequences, S positions, T tokens, D model dim, E experts, K the mean experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe.config import ConfigError, MoEConfig
from moe.expert_choice_router import ExpertChoiceRouting, group_capacity
from moe.layer import MoELayer
from parallel.tensor_parallel import check_whole_sequences

DIM, E, K = 12, 4, 2


def _layer(scope: str = "sequence", cf: float = 1.0, seed: int = 0) -> MoELayer:
    cfg = MoEConfig(num_experts=E, top_k=K, router="expert_choice", capacity_factor=cf, expert_choice_scope=scope,
                    aux_loss_coeff=0.0, expert_ffn_dim=8)
    torch.manual_seed(seed)
    layer = MoELayer(DIM, cfg)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return layer


def _reference(layer: MoELayer, x_BSD: torch.Tensor, groups: int) -> torch.Tensor:
    """Loop by loop: per group and expert, the C tokens of largest probability (earlier
    token first on ties), each output ``sum over the experts that took it of p·expert(x)``."""
    batch, seq, dim = x_BSD.shape
    x_TD = x_BSD.reshape(-1, dim)
    probs_TE = (x_TD @ layer.router.weight_ED.T).softmax(dim=-1).detach()
    y_TD = torch.zeros_like(x_TD)
    size = x_TD.shape[0] // groups
    capacity = min(math.ceil(layer.cfg.capacity_factor * size * K / E), size)
    for g in range(groups):
        for e in range(E):
            scores = [(-float(probs_TE[t, e]), t) for t in range(g * size, (g + 1) * size)]
            for _, t in sorted(scores)[:capacity]:
                y_TD[t] += probs_TE[t, e] * layer.experts(x_TD[t : t + 1], _rows(e))[0]
    return y_TD.view(batch, seq, dim)


def _rows(expert: int) -> torch.Tensor:
    """``tokens_per_expert_E`` sending one row to ``expert``."""
    rows_E = torch.zeros(E, dtype=torch.long)
    rows_E[expert] = 1
    return rows_E


@pytest.mark.parametrize("scope, cf", [("sequence", 1.0), ("sequence", 2.0), ("micro_batch", 1.0), ("micro_batch", 0.5)])
def test_layer_equals_the_loop_reference(scope: str, cf: float) -> None:
    layer = _layer(scope, cf)
    x_BSD = torch.randn(3, 8, DIM)
    y_BSD, stats = layer(x_BSD)
    groups = 3 if scope == "sequence" else 1
    torch.testing.assert_close(y_BSD, _reference(layer, x_BSD, groups), rtol=1e-5, atol=1e-6)
    capacity = group_capacity(24 // groups, K, E, cf)
    assert stats.tokens_per_expert_E.tolist() == [capacity * groups] * E  # balanced by construction


def test_routing_takes_c_tokens_per_expert_and_sequence_with_softmax_gates() -> None:
    layer = _layer("sequence", 1.5)
    x_BSD = torch.randn(2, 10, DIM)
    routing = layer.router(x_BSD)
    assert isinstance(routing, ExpertChoiceRouting)
    c = math.ceil(1.5 * 10 * K / E)
    assert routing.keep_TK.view(2, 10, E).sum(dim=1).tolist() == [[c] * E] * 2
    probs_TE = routing.logits_TE.softmax(dim=-1)
    torch.testing.assert_close(routing.weights_TK, probs_TE * routing.keep_TK)
    taken_T = routing.keep_TK.sum(dim=1)
    assert int(taken_T.min()) >= 0 and int(taken_T.max()) <= E and float(taken_T.float().mean()) == pytest.approx(c * E / 10)


def test_capacity_never_exceeds_the_group() -> None:
    assert group_capacity(8, 2, 4, 1.0) == 4
    assert group_capacity(8, 4, 4, 3.0) == 8  # ceil(24) clamped: an expert takes a token at most once


def test_sequence_scope_routes_each_sequence_alone_micro_batch_scope_does_not() -> None:
    """What makes data and expert parallelism (which split micro-batches by sequences) route
    as one process: under the sequence scope a batch is its sequences routed one by one."""
    x_BSD = torch.randn(4, 6, DIM)
    for scope, alone in (("sequence", True), ("micro_batch", False)):
        layer = _layer(scope)
        whole = layer(x_BSD)[0]
        parts = torch.cat([layer(x_BSD[b : b + 1])[0] for b in range(4)])
        assert torch.allclose(whole, parts, rtol=1e-6, atol=1e-7) == alone


def test_sequence_scope_is_not_causal() -> None:
    """The docstring's warning, shown: a later token changes an earlier token's output."""
    layer = _layer("sequence", 0.5)
    x_BSD = torch.randn(1, 8, DIM)
    changed = False
    for _ in range(20):
        later = x_BSD.clone()
        later[0, -1] = torch.randn(DIM) * 5
        changed |= not torch.allclose(layer(x_BSD)[0][0, :-1], layer(later)[0][0, :-1])
    assert changed


def test_gradients_reach_the_router_through_the_gates() -> None:
    layer = _layer()
    y_BSD, _ = layer(torch.randn(2, 8, DIM))
    y_BSD.square().sum().backward()
    assert layer.router.weight_ED.grad is not None and float(layer.router.weight_ED.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"router": "expert_choice", "aux_loss_coeff": 0.0}, "moe.capacity_factor=None: moe.router=expert_choice needs a capacity factor"),
        ({"router": "expert_choice", "capacity_factor": 2.0}, "moe.aux_loss_coeff=0.01: moe.router=expert_choice balances by construction"),
        ({"router": "expert_choice", "capacity_factor": 2.0, "aux_loss_coeff": 0.0, "top_k": 9}, "moe.top_k=9: must be in [1, moe.num_experts=8]"),
    ],
)
def test_bad_expert_choice_configs_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        MoEConfig(**kwargs)
    assert message in str(err.value)


def test_tensor_parallel_must_keep_sequences_whole() -> None:
    cfg = MoEConfig(router="expert_choice", capacity_factor=2.0, aux_loss_coeff=0.0)
    check_whole_sequences(cfg, 2, 4)  # two whole sequences per TP rank: accepted
    check_whole_sequences(MoEConfig(router="expert_choice", capacity_factor=2.0, aux_loss_coeff=0.0,
                                    expert_choice_scope="micro_batch"), 2, 1)  # the scope is the rank's tokens
    with pytest.raises(ConfigError, match=r"parallel.tp=2 with micro-batches of 1 sequence\(s\).*multiple of parallel.tp=2"):
        check_whole_sequences(cfg, 2, 1)
    with pytest.raises(ConfigError, match="noisy_topk seeds its noise by whole sequences"):
        check_whole_sequences(MoEConfig(router="noisy_topk"), 2, 3)


def test_fused_kernels_dispatch_the_expert_choice_as_torch_does() -> None:
    """The Triton permute/unpermute (the interpreter on CPU) take the E-slot routing with its
    keep mask and per-expert blocks of C rows, and give the torch path's output and gradients."""
    torch_layer, fused_layer = _layer("sequence", 1.0), _layer("sequence", 1.0)
    fused_layer.cfg = MoEConfig(**{**fused_layer.cfg.__dict__, "kernels": "fused"})
    x_BSD = torch.randn(2, 8, DIM)
    outs = []
    for layer in (torch_layer, fused_layer):
        x = x_BSD.clone().requires_grad_()
        y_BSD, _ = layer(x)
        y_BSD.square().sum().backward()
        outs.append((y_BSD.detach(), x.grad, layer.router.weight_ED.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_routing_passes_through_the_routers_forward_hooks() -> None:
    """What ``train.record_routing`` (``parallel.simulator.routing``) and other router hooks read."""
    layer = _layer("sequence", 1.0)
    seen: list[ExpertChoiceRouting] = []
    layer.router.register_forward_hook(lambda module, args, routing: seen.append(routing))
    layer(torch.randn(3, 8, DIM))
    assert len(seen) == 1 and seen[0].counts_E.tolist() == [3 * group_capacity(8, K, E, 1.0)] * E
    assert seen[0].experts_TK.shape == (24, E)
