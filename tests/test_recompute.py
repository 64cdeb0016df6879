"""Activation recomputation (``train.recompute``, ``moe/recompute.py``).

Recomputation may change what autograd keeps, never the numbers: every mode trains the
same losses, gradient norms and routed counts in one process and under tp=2, pp=2 and
dp=2,ep=2 (the ranks: the session's persistent gloo pools, as in ``tests/test_layouts.py``).
The memory it saves is measured with ``saved_tensors_hooks`` and checked against the
simulator's ``activation_elements`` for each mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from launch.check_layouts import layout_configs, parse_layouts, train_records
from launch.config import Config, load_config
from launch.data import prepare, stdlib_sources
from launch.train import check_layout, train, train_rank
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.model import Transformer
from moe.recompute import apply_recompute
from multirank import RankPool
from parallel.simulator.routing import RoutingRecorder

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 2
MODES = ("none", "selective", "full")
# tests/test_layouts.py's SMALL model, with router jitter on (a recompute must draw the same
# noise), a dense block among the MoE ones (moe_every=2: blocks 1 and 3 are MoE), SwiGLU
# everywhere and a shared expert (every activation selective mode recomputes).
SMALL = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
    "model.vocab_size=257", "model.moe_every=2", "model.activation=swiglu", "moe.num_experts=4", "moe.top_k=2",
    "moe.normalize_weights=true", "moe.expert_ffn_dim=32", "moe.activation=swiglu", "moe.num_shared_experts=1",
    "moe.jitter_eps=0.1", "moe.aux_loss_scope=global_batch", "train.batch_size=8", "train.warmup_steps=2",
    "train.lr=1e-3", "train.grad_clip=0.5", "data.val_tokens=256", "launch.threads=1", "launch.timeout_minutes=2",
]
COMPARED = ("lm_loss", "aux_loss", "z_loss", "grad_norm", "router_grad_norm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out


def train_layout(rank: int, world_size: int, cfg: Config) -> None:
    """One rank of a layout, as a launcher's rank runs it."""
    os.environ["LOCAL_RANK"] = str(rank)
    train_rank(cfg, "tiny")


def _train(layout: str, mode: str, corpus: Path, out: Path, rank_pool: Callable[[int], RankPool]) -> list[dict]:
    _, configs = layout_configs(TINY, [*SMALL, f"data.path={corpus}", f"train.recompute={mode}"],
                                parse_layouts(layout), STEPS, out / mode)
    cfg = configs[0]
    if cfg.parallel.world_size == 1:
        train(cfg, "tiny")
    else:
        rank_pool(cfg.parallel.world_size).run(train_layout, cfg, timeout=240)
    return train_records(Path(str(cfg.train.run_dir)))


@pytest.mark.parametrize("layout", ["dp=1", "tp=2", "pp=2", "dp=2,ep=2"])
def test_every_mode_trains_the_same_numbers(
    layout: str, corpus: Path, tmp_path: Path, rank_pool: Callable[[int], RankPool]
) -> None:
    """Losses, gradient norms (all parameters, and the routers') and routed tokens per
    expert of every MoE layer, per step, within 1e-6 of the run without recomputation."""
    runs = {mode: _train(layout, mode, corpus, tmp_path, rank_pool) for mode in MODES}
    for mode in ("selective", "full"):
        assert len(runs[mode]) == STEPS
        for step, (got, want) in enumerate(zip(runs[mode], runs["none"], strict=True)):
            for key in COMPARED:
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (layout, mode, step, key)
            assert got["expert_tokens"] == want["expert_tokens"], (layout, mode, step)
            assert len(got["expert_tokens"]) == 2  # both MoE layers compared


def _small_model(**moe_kw: object) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(dim=32, n_layers=4, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=257, moe_every=2,
                        activation="swiglu")
    moe = MoEConfig(num_experts=4, top_k=2, normalize_weights=True, expert_ffn_dim=32, activation="swiglu",
                    num_shared_experts=1, jitter_eps=0.1, **moe_kw)  # type: ignore[arg-type]
    return model, moe


def saved_bytes(net: torch.nn.Module, run: Callable[[], object], whole: list[bool] | None = None) -> int:
    """Bytes of the distinct storages autograd keeps through ``run``'s forward, read after
    it (a storage freed for recomputation counts 0), parameters and buffers not counted.
    ``whole``: gets, for each saved tensor the backward reads, whether its storage holds
    it then (a freed storage must have been refilled)."""
    not_activations = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in not_activations:
            kept[t.untyped_storage().data_ptr()] = t
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        if whole is not None:
            whole.append(t.numel() == 0 or t.untyped_storage().nbytes() > 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        run()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def test_recomputation_keeps_less_and_computes_the_same() -> None:
    """full < full of the first block only < none, and full < selective < none, in saved
    bytes; the same loss and gradients (bitwise) in every mode; every saved tensor whole
    when the backward reads it (selective mode frees activation outputs, then refills them)."""
    model, moe = _small_model()
    ids_BS = torch.randint(0, model.vocab_size, (2, model.seq_len))
    kept, grads = {}, {}
    for mode, layers in (("none", None), ("selective", None), ("full", None), ("full", 1)):
        torch.manual_seed(0)
        net = Transformer(model, moe)
        apply_recompute(net, mode, layers)  # type: ignore[arg-type]
        box, whole = {}, []
        kept[mode, layers] = saved_bytes(net, lambda: box.setdefault("out", net(ids_BS, ids_BS)), whole)
        box["out"].loss.backward()
        assert whole and all(whole), (mode, layers)
        grads[mode, layers] = torch.cat([p.grad.flatten() for p in net.parameters()])
    none, selective, full, first = kept["none", None], kept["selective", None], kept["full", None], kept["full", 1]
    print({f"{m}/{n}": b for (m, n), b in kept.items()})
    assert full < first < none
    assert full < selective < none
    for key, grad in grads.items():
        assert torch.equal(grad, grads["none", None]), key


def test_recomputed_blocks_count_routing_once() -> None:
    """Under full recomputation every MoE layer runs twice (forward, then again in the
    backward), yet the model reports one set of stats per layer, each counting the batch's
    T·K assignments once, with the same aux loss as without recomputation, and the routing
    recorder (``train.record_routing``) writes one record per forward."""
    model, moe = _small_model()
    ids_BS = torch.randint(0, model.vocab_size, (2, model.seq_len))
    outs = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        net = Transformer(model, moe)
        apply_recompute(net, mode)  # type: ignore[arg-type]
        calls = []
        for layer in net.moe_layers():
            layer.register_forward_hook(lambda *_: calls.append(1))
        recorder = RoutingRecorder(net, rank=0)
        out = net(ids_BS, ids_BS)
        out.loss.backward()
        outs[mode] = out
        assert len(calls) == (4 if mode == "full" else 2)  # the recompute did run
        assert len(recorder.records) == 1
        assert [sum(c) for c in recorder.records[0].counts_LE] == [ids_BS.numel() * moe.top_k] * 2
        assert len(out.moe_stats) == 2
        assert [int(s.tokens_per_expert_E.sum()) for s in out.moe_stats] == [ids_BS.numel() * moe.top_k] * 2
    assert outs["full"].aux_loss.item() == outs["none"].aux_loss.item()
    assert outs["full"].z_loss.item() == outs["none"].z_loss.item()


def test_apply_recompute_marks_the_first_blocks_of_each_chunk() -> None:
    model, moe = _small_model()
    net = Transformer(model, moe)
    apply_recompute(net, "full", 3)
    assert [b.recompute_block for b in net.blocks.values()] == [True, True, True, False]
    apply_recompute(net, "selective")
    assert not any(b.recompute_block for b in net.blocks.values())
    assert all(b.recompute_norms and b.ffn.shared.recompute_act if b.ffn.__class__.__name__ == "MoELayer"
               else b.recompute_norms and b.ffn.recompute_act for b in net.blocks.values())
    assert all(layer.experts.recompute_act for layer in net.moe_layers())
    apply_recompute(net, "none")
    assert not any(b.recompute_norms or b.recompute_block for b in net.blocks.values())
    with pytest.raises(ValueError, match="needs mode='full'"):
        apply_recompute(net, "selective", 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.recompute=selective", "train.recompute_layers=2"],
         "train.recompute_layers=2: counts whole recomputed blocks: it needs train.recompute=full "
         "(train.recompute='selective')"),
        (["train.recompute_layers=2"], "it needs train.recompute=full (train.recompute='none')"),
        (["train.recompute=full", "train.recompute_layers=0"], "train.recompute_layers=0: must be >= 1"),
        (["train.recompute=partial"], "train.recompute"),
    ],
)
def test_config_refuses_bad_recompute(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [*SMALL, *overrides])


@pytest.mark.parametrize(
    "layout, layers, message",
    [
        ("", 5, "train.recompute_layers=5: the model holds 4 block(s); set train.recompute_layers to at most 4"),
        ("parallel.pp=2", 3, "train.recompute_layers=3: the largest pipeline chunk (pp=2, vpp=1) holds 2 block(s)"),
        ("parallel.pp=2 parallel.vpp=2", 2, "the largest pipeline chunk (pp=2, vpp=2) holds 1 block(s)"),
    ],
)
def test_recompute_layers_above_a_chunk_is_refused(layout: str, layers: int, message: str) -> None:
    """One block more than the largest chunk holds is refused, naming the most it may be;
    that most is accepted."""

    def config(recompute_layers: int) -> Config:
        return load_config(TINY, [*SMALL, "train.recompute=full", f"train.recompute_layers={recompute_layers}",
                                  "train.micro_batch_size=2", *layout.split()])

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(config(layers))
    check_layout(config(layers - 1))


def test_run_marks_the_model_it_trains(corpus: Path, tmp_path: Path) -> None:
    """``Run`` applies ``train.recompute`` to the modules it trains (after EP/TP/the split)."""
    from launch.train import Run

    for mode, layers, blocks, norms in (("full", 2, [True, True, False, False], False),
                                         ("selective", None, [False] * 4, True)):
        extra = [f"train.recompute={mode}", f"train.recompute_layers={'null' if layers is None else layers}"]
        cfg = load_config(TINY, [*SMALL, f"data.path={corpus}", f"train.run_dir={tmp_path / mode}", *extra])
        run = Run(cfg, "tiny")
        assert [b.recompute_block for c in run.chunks for b in c.blocks.values()] == blocks
        assert all(b.recompute_norms == norms for c in run.chunks for b in c.blocks.values())
        assert all(layer.experts.recompute_act == norms for c in run.chunks for layer in c.moe_layers())
