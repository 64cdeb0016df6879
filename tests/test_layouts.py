"""The layout-invariance harness over every kind of layout (world size <= 4).

Each layout trains the same tiny model, seed and global batch for 3 steps through the
harness's own code path (``launch.check_layouts``: its config overrides and defaults,
``launch.train.train_rank`` on every rank, the run's ``metrics.jsonl``, ``compare``), and
is compared with the single-process run on the LM loss, aux loss, z-loss, the routers'
gradient norm and the routed tokens per expert of every MoE layer, at the harness's
default tolerance. The ranks are the session's persistent gloo pools (``rank_pool``):
starting a group of processes per layout, as ``moe check-layouts`` does, would pay the
interpreter, torch and megatron-core imports and the rendezvous again for every layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.check_layouts import Layout, compare, layout_configs, parse_layouts, pipeline_micro_batches, train_records
from launch.config import Config, load_config
from launch.data import prepare, stdlib_sources
from launch.train import train, train_rank
from moe.config import ConfigError
from multirank import RankPool

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 3
RTOL = 1e-5  # moe check-layouts' default
# 4 layers (pp=2 x vpp=2 chunks), 4 experts top-2, global-batch aux loss (the scope that
# does not depend on how the batch is split over ranks and micro-batches). lr 1e-3: Adam's
# m/sqrt(v) turns last-bit differences of tiny expert gradients into whole steps, more so
# at a larger lr (see tests/test_deepspeed_engine.py).
SMALL = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=16", "model.ffn_dim=64",
    "model.vocab_size=257", "moe.num_experts=4", "moe.top_k=2", "moe.normalize_weights=true",
    "moe.expert_ffn_dim=32", "moe.aux_loss_scope=global_batch", "train.batch_size=8", "train.warmup_steps=2",
    "train.lr=1e-3", "train.grad_clip=0.5", "data.val_tokens=256", "launch.threads=1", "launch.timeout_minutes=2",
]
REFERENCE = "dp=1"
# Every kind of layout: data, expert, tensor, pipeline (plain and interleaved), expert-tensor
# parallelism, their combinations, gradient accumulation, and DeepSpeed ZeRO-1/2; and TP on
# one-sequence micro-batches (each TP rank routes half of every sequence), with and without
# sequence parallelism, with experts over the TP ranks, and through a pipeline.
LAYOUTS = [
    "dp=2", "ep=2", "dp=2,micro=2", "ep=4", "tp=2", "pp=2", "tp=2,ep=2", "pp=2,ep=2", "pp=2,vpp=2", "etp=2",
    "tp=2,etp=2,ep=2", "tp=2,pp=2",
    "ep=2,engine=deepspeed,zero=1", "dp=2,engine=deepspeed,zero=2", "dp=2,ep=2,engine=deepspeed,zero=2,micro=2",
    "tp=2,micro=1", "tp=2,sequence_parallel=true,micro=1", "tp=2,ep=2,micro=1",
    "tp=2,pp=2,sequence_parallel=true,micro=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    prepare(stdlib_sources()[:20], out, val_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layouts")


def _config(layout: str, corpus: Path, runs: Path, model: tuple[str, ...] = ()) -> tuple[Layout, Config]:
    out = runs / "-".join([*model, layout]).replace(",", "_").replace("=", "").replace(".", "")
    layouts, configs = layout_configs(TINY, [*SMALL, *model, f"data.path={corpus}"], parse_layouts(layout), STEPS, out)
    return layouts[0], configs[0]


@pytest.fixture(scope="module")
def reference(corpus: Path, runs: Path) -> tuple[Layout, list[dict]]:
    layout, cfg = _config(REFERENCE, corpus, runs)
    train(cfg, "tiny")
    return layout, train_records(Path(str(cfg.train.run_dir)))


def train_layout(rank: int, world_size: int, cfg: Config) -> None:
    """One rank of a layout, as a launcher's rank runs it (``train_rank``)."""
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed insists on it; the launchers export it
    train_rank(cfg, "tiny")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(
    layout: str, corpus: Path, runs: Path, reference: tuple[Layout, list[dict]], rank_pool: Callable[[int], RankPool]
) -> None:
    named, cfg = _config(layout, corpus, runs)
    rank_pool(cfg.parallel.world_size).run(train_layout, cfg, timeout=240)
    records = train_records(Path(str(cfg.train.run_dir)))
    assert len(records) == STEPS
    assert all(len(r["expert_tokens"]) == 4 for r in records)  # every MoE layer compared
    lines, ok = compare([reference[1], records], [reference[0], named], RTOL)
    print("\n".join(lines))
    assert ok, "\n".join(lines)


# The shapes of the models people pretrain (Qwen3-MoE-like attention: grouped-query with 2
# key/value heads for 4 query heads, q/k RMSNorm, head_dim 12 != dim/n_heads = 8) at
# micro-batch 1, where TP ranks split each sequence's tokens; the 6-layer model is the one an
# interleaved pipeline with a lighter first stage needs.
REAL_SHAPES = ("model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=true",
               "train.micro_batch_size=1", "train.batch_size=4")
SIX_LAYERS = (*REAL_SHAPES, "model.n_layers=6")


@pytest.mark.parametrize(
    "model, layout",
    [(REAL_SHAPES, "tp=2"), (REAL_SHAPES, "tp=2,sequence_parallel=true"), (REAL_SHAPES, "tp=2,pp=2"),
     (REAL_SHAPES, "tp=2,ep=2"), (REAL_SHAPES, "pp=2,first_stage_layers=1"),
     (SIX_LAYERS, "pp=2,vpp=2,first_stage_layers=2")],
    ids=["tp2", "tp2-sp", "tp2-pp2", "tp2-ep2", "pp2-uneven", "pp2-vpp2-6layers-uneven"],
)
def test_real_model_shapes_at_micro_batch_1_match_one_process(
    model: tuple[str, ...], layout: str, corpus: Path, runs: Path, rank_pool: Callable[[int], RankPool]
) -> None:
    ref_layout, ref_cfg = _config(REFERENCE, corpus, runs, model)
    if not (Path(str(ref_cfg.train.run_dir)) / "metrics.jsonl").is_file():  # one reference per model
        train(ref_cfg, "tiny")
    named, cfg = _config(layout, corpus, runs, model)
    rank_pool(cfg.parallel.world_size).run(train_layout, cfg, timeout=240)
    records = train_records(Path(str(cfg.train.run_dir)))
    assert len(records) == STEPS
    lines, ok = compare([train_records(Path(str(ref_cfg.train.run_dir))), records], [ref_layout, named], RTOL)
    print("\n".join(lines))
    assert ok, "\n".join(lines)


def test_layout_defaults_and_engines(corpus: Path, runs: Path) -> None:
    dp = {lay.name: next(o for o in lay.overrides if o.startswith("parallel.dp=")) for lay in parse_layouts(
        "ep=2;tp=2,ep=2;etp=2;pp=2,ep=2;tp=2;engine=deepspeed;ep=4,engine=deepspeed;dp=3")}
    assert dp == {"ep=2": "parallel.dp=2", "tp=2,ep=2": "parallel.dp=1", "etp=2": "parallel.dp=2",
                  "pp=2,ep=2": "parallel.dp=2", "tp=2": "parallel.dp=1", "engine=deepspeed": "parallel.dp=2",
                  "ep=4,engine=deepspeed": "parallel.dp=4", "dp=3": "parallel.dp=3"}
    assert parse_layouts("dp=2,zero=2,micro=2")[0].overrides == [
        "parallel.dp=2", "parallel.zero_stage=2", "train.micro_batch_size=2"]
    labels = [_config(name, corpus, runs)[0].engine for name in ("dp=1", "ep=2", "dp=2,engine=deepspeed,zero=2")]
    assert labels == ["local", "megatron", "deepspeed-z2"]
    with pytest.raises(ConfigError, match="layout 'ep=x': ep, etp and tp must be integers"):
        parse_layouts("ep=x")
    with pytest.raises(ConfigError, match="layout 'engine=deepspeed,zero=3' is refused: .*MoE not supported with Stage 3"):
        _config("engine=deepspeed,zero=3", corpus, runs)


@pytest.mark.parametrize(
    "layout, overrides",
    [
        ("pp=2,first_stage_layers=2", ["parallel.pp=2", "parallel.first_stage_layers=2", "parallel.dp=1"]),
        ("pp=2,last_stage_layers=null", ["parallel.pp=2", "parallel.last_stage_layers=null", "parallel.dp=1"]),
        ("tp=2,sequence_parallel=true", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp=1"]),
        ("engine=deepspeed,zero_stage=2", ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.dp=2"]),
        ("dp=2,engine=deepspeed,offload_optimizer=true",
         ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.offload_optimizer=true"]),
        ("micro=1,tp=2,zero=0", ["parallel.tp=2", "parallel.zero_stage=0", "parallel.dp=1", "train.micro_batch_size=1"]),
        (" ep = 2 , etp=2 ", ["parallel.ep=2", "parallel.etp=2", "parallel.dp=4"]),
    ],
)
def test_layout_keys_are_the_parallel_fields_by_name(layout: str, overrides: list[str]) -> None:
    """Every ``parallel.*`` field is a layout key by its own name (values YAML, as in
    overrides, and the configs load), next to the aliases ``micro`` and ``zero``."""
    assert parse_layouts(layout)[0].overrides == overrides
    load_config(TINY, [*SMALL, *overrides])


def test_every_parallel_field_is_a_layout_key() -> None:
    from dataclasses import fields

    from launch.check_layouts import LAYOUT_KEYS
    from parallel.config import ParallelConfig

    assert {f"parallel.{f.name}" for f in fields(ParallelConfig)} <= set(LAYOUT_KEYS.values())
    assert set(LAYOUT_KEYS) == {f.name for f in fields(ParallelConfig)} | {"micro", "zero"}


@pytest.mark.parametrize(
    "layout, message",
    [
        ("sequence_paralel=true", "'sequence_paralel=true' is not key=value with a key in tp, pp, ep, dp, etp, vpp, "
         "first_stage_layers, last_stage_layers, sequence_parallel, engine, zero_stage, offload_optimizer, micro, zero "
         "(did you mean 'sequence_parallel'?)"),
        ("pp=2,first_stage=2", "(did you mean 'first_stage_layers'?)"),
        ("ep=2,tp", "'tp' is not key=value with a key in"),
        ("zero=1,zero_stage=2", "parallel.zero_stage is given twice ('zero=1' and 'zero_stage=2'); give it once"),
        ("tp=true", "ep, etp and tp must be integers"),
    ],
)
def test_unknown_layout_keys_are_one_error_with_the_closest(layout: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_layouts(f"dp=1;{layout}")
    assert str(err.value).startswith(f"layout {layout!r}: ") and message in str(err.value), str(err.value)


def test_pipeline_layouts_default_to_pp_micro_batches() -> None:
    for layout, micro in (("pp=2", 4), ("pp=2,ep=2", 2), ("pp=2,vpp=2", 4), ("pp=2,micro=2", 2), ("dp=2", None)):
        cfg = load_config(TINY, [*SMALL, *parse_layouts(layout)[0].overrides])
        assert pipeline_micro_batches(cfg).train.micro_batch_size == micro, layout


@pytest.mark.parametrize(
    "scope, layouts, groups",
    [
        ("micro_batch", "dp=1;dp=2;ep=2", "8 under dp=1; 4 under dp=2, ep=2"),
        ("micro_batch", "dp=2;dp=1,micro=4;pp=2", None),  # the same micro-batches, however split over ranks
        ("micro_batch", "dp=1;pp=2", "8 under dp=1; 4 under pp=2"),
        ("micro_batch", "dp=2,micro=2;tp=2", "2 under dp=2,micro=2; 8 under tp=2"),
        ("global_batch", "dp=1;dp=2;dp=2,micro=2;pp=2", None),
        ("sequence", "dp=1;dp=2", None),
    ],
)
def test_micro_batch_aux_scope_is_named_when_the_micro_batches_differ(
    scope: str, layouts: str, groups: str | None, corpus: Path, runs: Path
) -> None:
    from launch.check_layouts import aux_scope_warning

    named, configs = layout_configs(TINY, [*SMALL, f"moe.aux_loss_scope={scope}", f"data.path={corpus}"],
                                    parse_layouts(layouts), STEPS, runs / "scope")
    warning = aux_scope_warning(named, configs)
    if groups is None:
        assert warning is None
        return
    assert warning is not None and f"(sequences per micro-batch: {groups})" in warning
    assert "differ by definition" in warning
    assert warning.endswith("set moe.aux_loss_scope=global_batch (the same for every dp, ep and micro-batch size)")


NOISY = ("moe.router=noisy_topk", "moe.importance_loss_coeff=0.1", "moe.load_loss_coeff=0.1")
CHOICE = ("moe.router=expert_choice", "moe.capacity_factor=2.0", "moe.aux_loss_coeff=0")
NOISY_CAUSE = "warning: moe.router=noisy_topk's importance and load losses are per forward only"
CHOICE_CAUSE = "warning: moe.expert_choice_scope=micro_batch lets each expert choose among one forward's tokens"
SWITCH_CAUSE = "warning: moe.aux_loss_scope=micro_batch takes the aux loss"


@pytest.mark.parametrize(
    "model, layouts, causes",
    [
        # per forward whatever the aux scope (SMALL's is global_batch); under TP per TP rank
        (NOISY, "dp=1;dp=2;ep=2", {NOISY_CAUSE: "sequences per forward and TP rank: 8 under dp=1; 4 under dp=2, ep=2"}),
        (NOISY, "dp=1;tp=2", {NOISY_CAUSE: "sequences per forward and TP rank: 8 under dp=1; 4 under tp=2"}),
        (NOISY, "dp=2;dp=1,micro=4;pp=2", {}),
        (("moe.router=noisy_topk",), "dp=1;dp=2", {}),  # no importance or load loss: the noise is the layouts'
        ((*NOISY, "moe.aux_loss_scope=micro_batch"), "dp=1;dp=2",
         {SWITCH_CAUSE: "sequences per micro-batch: 8 under dp=1; 4 under dp=2",
          NOISY_CAUSE: "sequences per forward and TP rank: 8 under dp=1; 4 under dp=2"}),
        ((*CHOICE, "moe.expert_choice_scope=micro_batch"), "dp=1;dp=2,ep=2;tp=2",
         {CHOICE_CAUSE: "sequences per forward and TP rank: 8 under dp=1; 4 under dp=2,ep=2, tp=2"}),
        ((*CHOICE, "moe.expert_choice_scope=sequence"), "dp=1;dp=2;tp=2;pp=2", {}),
    ],
)
def test_per_forward_balancing_and_choice_are_named_when_the_forwards_differ(
    model: tuple[str, ...], layouts: str, causes: dict[str, str], corpus: Path, runs: Path
) -> None:
    """Every cause that depends on one forward's tokens gets its line (the cause, the
    sequences of each layout's forwards, the fix); none when the forwards are the same."""
    from launch.check_layouts import aux_scope_warning

    named, configs = layout_configs(TINY, [*SMALL, *model, f"data.path={corpus}"], parse_layouts(layouts), STEPS,
                                    runs / "per-forward")
    warning = aux_scope_warning(named, configs)
    if not causes:
        assert warning is None
        return
    assert warning is not None
    lines = warning.splitlines()
    assert len(lines) == len(causes)
    for line, (cause, groups) in zip(lines, causes.items()):
        assert line.startswith(cause) and f"({groups})" in line, line
        assert "differ by definition, not by a fault" in line


def test_check_layouts_warns_about_micro_batch_scope_before_training(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One-process layouts (they train in this process): dp=1 against 4-sequence
    micro-batches, whose aux losses differ at the first step, as the warning says."""
    from launch.check_layouts import main

    argv = [str(TINY), *SMALL, "moe.aux_loss_scope=micro_batch", f"data.path={corpus}",
            "--layouts", "dp=1;micro=4", "--steps", "1", "--out", str(tmp_path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    warning = captured.err.index("warning: moe.aux_loss_scope=micro_batch")
    assert warning < captured.err.index("running layout dp=1")
    assert "(sequences per micro-batch: 8 under dp=1; 4 under micro=4)" in captured.err
    assert "layouts DISAGREE (per-forward losses or routing: see the warning above)" in captured.out


@pytest.mark.parametrize(
    "option, message",
    [
        (["--rtol", "-1"], "--rtol -1: must be a finite number >= 0"),
        (["--rtol", "nan"], "--rtol nan: must be a finite number >= 0"),
        (["--rtol", "inf"], "--rtol inf: must be a finite number >= 0"),
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--steps", "-3"], "--steps -3: must be >= 1"),
    ],
)
def test_check_layouts_refuses_bad_rtol_and_steps(
    option: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.cli import main

    assert main(["check-layouts", str(TINY), "--layouts", "dp=1;dp=2", *option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
