"""Sharded checkpoints (parallel/dist_checkpoint.py): round trips within and across layouts
with the identical next-step loss, integrity checks, and ``moe ckpt inspect``.

Each rank function builds the tiny MoE model on the pool's ranks under one layout, trains,
saves or loads, and returns losses; the pytest process compares layouts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from multirank import RankPool
from launch.cli import main as cli
from launch.data import prepare, stdlib_sources
from parallel.checkpoint import CheckpointError, latest_checkpoint
from parallel.config import ParallelConfig
from parallel.dist_checkpoint import (
    MANIFEST_FILE,
    content_hash,
    describe_dist_checkpoint,
    load_dist_checkpoint,
    save_dist_checkpoint,
)
from parallel.engine import MegatronEngine, OptimSettings
from parallel.expert_parallel import apply_expert_parallel
from parallel.groups import ParallelGroups, init_groups
from parallel.topology import BatchShape, Topology

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=1)
MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, capacity_factor=None)
BATCH = 8
OPTIM = OptimSettings(lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
CONFIG = {"model": {"dim": 32, "n_layers": 2}, "moe": {"num_experts": 4}}
# Under another layout the same weights give losses that differ in reduction order only
# (ep4 vs ep2, forward alone: 7e-6 relative); the weights themselves reshard exactly.
TOL = 1e-4


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (BATCH, MODEL.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _setup(
    world: int, ep: int, tp: int = 1, model: ModelConfig = MODEL, etp: int = 1
) -> tuple[ParallelGroups, Transformer, MegatronEngine]:
    dp = world // tp
    topology = Topology.build(ParallelConfig(tp=tp, dp=dp, ep=ep, etp=etp), model, MOE, BatchShape(BATCH, BATCH // dp), world)
    groups = init_groups(topology, timeout_minutes=1)
    torch.manual_seed(7)
    net = Transformer(model, MOE)
    if ep > 1:
        apply_expert_parallel(net, groups.ep)
    if tp > 1 or etp > 1:
        from parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(net, groups, sequence_parallel=False)
    return groups, net, MegatronEngine(net, groups, OPTIM)


def _train(engine: MegatronEngine, groups: ParallelGroups, steps: range, vocab: int) -> list[float]:
    """This rank's slice of each step's batch; the dp-averaged losses."""
    losses = []
    for step in steps:
        x, y = _batch(step, vocab)
        x, y = x.chunk(groups.dp_size)[groups.dp_rank], y.chunk(groups.dp_size)[groups.dp_rank]
        engine.zero_grad()
        loss = engine.module(x, y).loss
        loss.backward()
        engine.step(1e-3 * (step + 1))
        mean = loss.detach().reshape(1)
        dist.all_reduce(mean, group=groups.dp)
        losses.append(mean.item() / groups.dp_size)
    return losses


def _save_then_continue(
    rank: int, world: int, ep: int, ckpt: str, steps: int, tp: int = 1, model: ModelConfig = MODEL, etp: int = 1
) -> list[float]:
    """Train ``steps``, save, train two more; the losses of those two."""
    groups, net, engine = _setup(world, ep, tp, model, etp)
    _train(engine, groups, range(steps), model.vocab_size)
    save_dist_checkpoint(Path(ckpt), steps, engine, net, groups, {"step": steps, "config": CONFIG}, keep=3)
    return _train(engine, groups, range(steps, steps + 2), model.vocab_size)


def _padding_rows(net: Transformer, groups: ParallelGroups) -> list[torch.Tensor]:
    """This rank's rows of the vocabulary-parallel weights beyond the real vocabulary (tp > 1)."""
    params = dict(net.named_parameters())
    weights = [params[k] for k in ("embed.weight", "lm_head.weight") if k in params]
    return [w[max(0, net.cfg.vocab_size - groups.tp.rank() * w.shape[0]):] for w in weights]


def _load_then_continue(
    rank: int, world: int, ep: int, path: str, save_to: str | None, tp: int = 1, model: ModelConfig = MODEL,
    etp: int = 1,
) -> list[float]:
    """Load under this layout, optionally save it again at once, train two steps; the rows
    padding the vocabulary stay zero (Adam moments and master weights of those rows included:
    otherwise the two steps would move them)."""
    groups, net, engine = _setup(world, ep, tp, model, etp)
    extras = load_dist_checkpoint(Path(path), engine, net, groups, CONFIG)
    step = extras["step"]
    if save_to is not None:
        save_dist_checkpoint(Path(save_to), step, engine, net, groups, {"step": step, "config": CONFIG}, keep=3)
    losses = _train(engine, groups, range(step, step + 2), model.vocab_size)
    assert all(not rows.any() for rows in _padding_rows(net, groups)), "padded vocabulary rows became nonzero"
    return losses


def test_ep_2_to_1_to_4_gives_the_identical_next_steps(rank_pool: Callable[[int], RankPool], tmp_path: Path) -> None:
    ref = rank_pool(2).run(_save_then_continue, 2, str(tmp_path / "ep2"), 2)[0]
    ep2 = latest_checkpoint(tmp_path / "ep2")
    same = rank_pool(2).run(_load_then_continue, 2, str(ep2), None)[0]
    assert same == ref  # same layout: bit-exact
    ep1 = rank_pool(2).run(_load_then_continue, 1, str(ep2), str(tmp_path / "ep1"))[0]
    assert ep1 == pytest.approx(ref, rel=TOL)
    ep1_ckpt = latest_checkpoint(tmp_path / "ep1")
    ep4 = rank_pool(4).run(_load_then_continue, 4, str(ep1_ckpt), None)[0]
    assert ep4 == pytest.approx(ref, rel=TOL)
    saved, resaved = (json.loads((p / MANIFEST_FILE).read_text()) for p in (ep2, ep1_ckpt))
    assert (saved["layout"]["ep"], resaved["layout"]["ep"], saved["step"]) == (2, 1, 2)
    w_in = saved["tensors"]["blocks.0.ffn.experts.w_in_EDF"]
    assert w_in["global_shape"][0] == 4 and len(w_in["shards"]) == 2
    assert len(resaved["tensors"]["blocks.0.ffn.experts.w_in_EDF"]["shards"]) == 1
    # Resharded bit for bit: every model and optimizer tensor (Adam moments, fp32 master
    # weights) has the same layout-independent content hash after ep 2 -> 1.
    assert {k: t["content_hash"] for k, t in saved["tensors"].items()} == {
        k: t["content_hash"] for k, t in resaved["tensors"].items()}
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in saved["tensors"])


def test_tp2_ep2_to_tp1_to_tp2(rank_pool: Callable[[int], RankPool], tmp_path: Path) -> None:
    """Mixed: saved at tp2 x ep2 (world 2: the EP group folds over the TP ranks), loaded at
    tp1 x dp2 x ep1, then at tp2 again."""
    ref = rank_pool(2).run(_save_then_continue, 2, str(tmp_path / "tp2"), 2, 2)[0]
    tp2 = latest_checkpoint(tmp_path / "tp2")
    tp1 = rank_pool(2).run(_load_then_continue, 1, str(tp2), str(tmp_path / "tp1"))[0]
    assert tp1 == pytest.approx(ref, rel=TOL)
    back = rank_pool(2).run(_load_then_continue, 2, str(latest_checkpoint(tmp_path / "tp1")), None, 2)[0]
    assert back == pytest.approx(ref, rel=TOL)
    saved, resaved = (json.loads((p / MANIFEST_FILE).read_text()) for p in (tp2, latest_checkpoint(tmp_path / "tp1")))
    assert saved["layout"]["tp"] == 2 and resaved["layout"]["tp"] == 1
    assert {k: t["content_hash"] for k, t in saved["tensors"].items()} == {
        k: t["content_hash"] for k, t in resaved["tensors"].items()}


@pytest.mark.parametrize(("tied", "ep", "etp"), [(True, 2, 1), (False, 1, 2)])
def test_an_odd_vocab_tp2_to_tp1_to_tp2(
    rank_pool: Callable[[int], RankPool], tmp_path: Path, tied: bool, ep: int, etp: int
) -> None:
    """V = 63 pads to 64 rows at tp2; the checkpoint holds the real [63, D] (the last TP
    shard's padded row left out), so tp2 -> tp1·dp2 -> tp2 continues like the uninterrupted
    run, tied LM head (with ep2) or untied (with etp2: expert hidden widths split too)."""
    model = replace(MODEL, vocab_size=63, tie_embeddings=tied)
    ref = rank_pool(2).run(_save_then_continue, ep, str(tmp_path / "tp2"), 2, 2, model, etp)[0]
    tp2 = latest_checkpoint(tmp_path / "tp2")
    tp1 = rank_pool(2).run(_load_then_continue, 1, str(tp2), str(tmp_path / "tp1"), 1, model)[0]
    assert tp1 == pytest.approx(ref, rel=TOL)
    tp1_ckpt = latest_checkpoint(tmp_path / "tp1")
    back = rank_pool(2).run(_load_then_continue, ep, str(tp1_ckpt), None, 2, model, etp)[0]
    assert back == pytest.approx(ref, rel=TOL)
    saved, resaved = (json.loads((p / MANIFEST_FILE).read_text()) for p in (tp2, tp1_ckpt))
    assert (saved["layout"]["etp"], resaved["layout"]["etp"]) == (etp, 1)
    assert len(saved["tensors"]["blocks.0.ffn.experts.w_in_EDF"]["shards"]) == 2
    vocab_keys = ["embed.weight"] + ([] if tied else ["lm_head.weight"])
    for key in vocab_keys:
        assert saved["tensors"][key]["global_shape"] == [63, MODEL.dim]
        assert [s["shape"][0] for s in saved["tensors"][key]["shards"]] == [32, 31]
    assert ("lm_head.weight" in saved["tensors"]) is not tied
    assert {k: t["content_hash"] for k, t in saved["tensors"].items()} == {
        k: t["content_hash"] for k, t in resaved["tensors"].items()}


@pytest.fixture(scope="module")
def saved_ep2(rank_pool: Callable[[int], RankPool], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint saved at ep2 x dp2 after two steps (saves cost seconds: shared)."""
    ckpt = tmp_path_factory.mktemp("saved") / "checkpoints"
    rank_pool(2).run(_save_then_continue, 2, str(ckpt), 2)
    found = latest_checkpoint(ckpt)
    assert found is not None
    return found


def _load_error(rank: int, world: int, path: str, config: dict) -> str:
    groups, net, engine = _setup(world, 1)
    try:
        load_dist_checkpoint(Path(path), engine, net, groups, config)
    except CheckpointError as err:
        return str(err)
    return "loaded"


def test_a_corrupted_shard_file_fails_clearly_on_every_rank(
    rank_pool: Callable[[int], RankPool], saved_ep2: Path, tmp_path: Path
) -> None:
    broken = tmp_path / saved_ep2.name
    shutil.copytree(saved_ep2, broken)
    shard = sorted(broken.glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensor data
    shard.write_bytes(bytes(data))
    errors = rank_pool(2).run(_load_error, str(broken), CONFIG)
    assert errors[0] == errors[1]
    assert f"checkpoint file '{shard}' does not match its recorded CRC-32" in errors[0]
    assert "delete this checkpoint to resume from the previous one" in errors[0]


def test_a_different_model_config_is_refused_naming_both_values(
    rank_pool: Callable[[int], RankPool], saved_ep2: Path
) -> None:
    other = {"model": CONFIG["model"], "moe": {"num_experts": 8}}
    errors = rank_pool(2).run(_load_error, str(saved_ep2), other)
    assert errors[0] == (
        f"checkpoint '{saved_ep2}' was saved with moe.num_experts=4 but the config has moe.num_experts=8; "
        "resume with the same model config (moe.num_experts=4)"
    )


def test_inspect_prints_layout_step_tensors_and_checksums(saved_ep2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "inspect", str(saved_ep2.parent), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "step 2; saved by 2 rank(s): tp=1, pp=1, ep=2, dp=2, etp=1, vpp=1" in out
    assert "verified: all" in out and "files match their CRC-32s" in out
    manifest = json.loads((saved_ep2 / MANIFEST_FILE).read_text())
    w_in = manifest["tensors"]["blocks.0.ffn.experts.w_in_EDF"]
    crcs = ",".join(f"{s['crc32']:08x}" for s in w_in["shards"])
    assert "blocks.0.ffn.experts.w_in_EDF" in out and str(w_in["global_shape"]) in out and crcs in out
    assert w_in["global_shape"][0] == MOE.num_experts
    assert w_in["shards"][0]["crc32"] != w_in["shards"][1]["crc32"]
    text = describe_dist_checkpoint(saved_ep2, verify=False)
    assert "verified" not in text and "optimizer.state.exp_avg.embed.weight" in text


def test_a_damaged_manifest_is_one_clear_error_on_load_and_inspect(
    rank_pool: Callable[[int], RankPool], saved_ep2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / saved_ep2.name
    shutil.copytree(saved_ep2, broken)
    manifest = broken / MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:100])  # truncated
    errors = rank_pool(2).run(_load_error, str(broken), CONFIG)
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"checkpoint file '{manifest}' is damaged (not valid JSON")
    assert f"delete '{broken}' to resume from the previous checkpoint" in errors[0]
    assert cli(["ckpt", "inspect", str(broken)]) == 2
    assert capsys.readouterr().err == f"error: {errors[0]}\n"


def test_damaged_megatron_metadata_fails_its_crc_on_load(
    rank_pool: Callable[[int], RankPool], saved_ep2: Path, tmp_path: Path
) -> None:
    broken = tmp_path / saved_ep2.name
    shutil.copytree(saved_ep2, broken)
    metadata = broken / "metadata.json"
    metadata.write_text(metadata.read_text()[:-5])
    errors = rank_pool(2).run(_load_error, str(broken), CONFIG)
    assert errors[0] == errors[1]
    assert f"checkpoint file '{metadata}' does not match its recorded CRC-32" in errors[0]
    assert "delete this checkpoint to resume from the previous one" in errors[0]


def _save_at(rank: int, world: int, ckpt: str, steps: list[int], keep: int) -> None:
    """Save the same state as the checkpoint of each of ``steps`` in turn."""
    groups, net, engine = _setup(world, 2)
    for step in steps:
        save_dist_checkpoint(Path(ckpt), step, engine, net, groups, {"step": step, "config": CONFIG}, keep=keep)


def test_keep_one_never_prunes_the_checkpoint_latest_names(rank_pool: Callable[[int], RankPool], tmp_path: Path) -> None:
    """A checkpoint of a later step already in the directory is pruned, not the one just
    published: ``latest`` never names a deleted checkpoint."""
    ckpt = tmp_path / "checkpoints"
    rank_pool(2).run(_save_at, str(ckpt), [5, 3], 1)
    assert (ckpt / "latest").read_text() == "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000003"]
    assert latest_checkpoint(ckpt) == ckpt / "step-00000003"


def _save_duplicated_experts(rank: int, world: int, ckpt: str) -> str:
    """Every EP rank holds the same expert values (the silent failure of Megatron-LM #5844,
    DeepSpeed #6589, megablocks #160): the save must refuse to publish."""
    groups, net, engine = _setup(world, 2)
    with torch.no_grad():
        for layer in net.moe_layers():
            for param in layer.experts.parameters():
                param.copy_(torch.ones_like(param))
    try:
        save_dist_checkpoint(Path(ckpt), 1, engine, net, groups, {"step": 1, "config": CONFIG}, keep=3)
    except CheckpointError as err:
        return str(err)
    return "published"


def test_duplicated_expert_shards_are_not_published(rank_pool: Callable[[int], RankPool], tmp_path: Path) -> None:
    errors = rank_pool(2).run(_save_duplicated_experts, str(tmp_path / "checkpoints"))
    assert errors[0] == errors[1]
    assert "is identical on expert-parallel ranks 0 and 1" in errors[0] and "was not published" in errors[0]
    assert latest_checkpoint(tmp_path / "checkpoints") is None


ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_dim=64",
    "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32", "moe.jitter_eps=0.0", "train.batch_size=8",
    "train.warmup_steps=2", "train.log_every=1", "train.eval_every=1000", "data.val_tokens=1024",
    "launch.threads=1", "launch.timeout_minutes=2", "launch.launcher=local", "parallel.dp=2",
]


def _train_losses(run_dir: Path) -> dict[int, float]:
    from launch.metrics import read_metrics

    return {r["step"]: r["lm_loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _train_command(corpus: Path) -> list[str]:
    """``moe train`` of the tiny model of ``RUN`` on ``corpus`` (a subprocess: its ranks are
    the local launcher's)."""
    return [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *RUN, f"data.path={corpus}"]


def _train_run(cmd: list[str], run_dir: Path, *overrides: str) -> None:
    done = subprocess.run([*cmd, *overrides, f"train.run_dir={run_dir}"], cwd=ROOT,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


def _cut_after(source: Path, target: Path, step: int) -> None:
    """A copy of run ``source`` as if it had been killed right after the checkpoint of ``step``."""
    shutil.copytree(source, target)
    for later in (target / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (target / "checkpoints" / "latest").unlink()


def test_a_save_killed_midway_leaves_the_previous_checkpoint_which_reshards(tmp_path: Path) -> None:
    """A 2-rank run (ep2) saving every step is SIGKILLed (driver, ranks, writer processes)
    while a save has shard files in its temp directory; the previous checkpoint verifies,
    and resuming from it at ep1 gives the killed run's next-step loss."""
    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:30], corpus, val_fraction=0.2)
    run = tmp_path / "run"
    cmd = [*_train_command(corpus), f"train.run_dir={run}"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.Popen([*cmd, "parallel.ep=2", "train.steps=60", "train.ckpt_every=1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts, midway = run / "checkpoints", None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and midway is None:
            tmp = [p for p in ckpts.glob("step-*.tmp") if any(p.glob("*.distcp"))] if ckpts.is_dir() else []
            if tmp and latest_checkpoint(ckpts) is not None:
                midway = tmp[0]
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert midway is not None, "no save was caught midway before the run ended or the deadline"
    previous = latest_checkpoint(ckpts)
    assert previous is not None and previous.name < midway.name
    assert midway.is_dir() and not (ckpts / midway.name.removesuffix(".tmp")).exists()
    assert cli(["ckpt", "inspect", str(run), "--verify"]) == 0
    step = int(previous.name.removeprefix("step-"))
    killed = _train_losses(run)
    assert step + 1 in killed  # the step whose save was killed had been logged
    resumed = subprocess.run([*cmd, "parallel.ep=1", f"train.steps={step + 1}", "train.resume=true"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _train_losses(run)[step + 1] == pytest.approx(killed[step + 1], rel=TOL)


def test_pp2_to_dp2_to_pp2_through_the_training_loop(tmp_path: Path) -> None:
    """A pipeline-parallel run checkpoints through ``launch.train``; resumed at pp1 x dp2 and
    then back at its own layout, each leg gives the uninterrupted run's next-step loss.

    The layout, pp2·vpp2·ep2·dp2 over 4 layers with MoE in layers 1 and 3
    (``model.moe_every=2``) and tied embeddings (each end stage holds a copy), has a pipeline
    rank without expert parameters: rank 0 runs layers 0 and 2, so its expert optimizer
    (megatron creates one on every rank) is empty, and megatron's ``state_dict`` of it
    asserted in the save and the load."""
    corpus = tmp_path / "corpus"
    prepare(stdlib_sources()[:30], corpus, val_fraction=0.2)
    full, cut, back = tmp_path / "full", tmp_path / "cut", tmp_path / "back"
    cmd = [*_train_command(corpus), "model.n_layers=4", "model.moe_every=2", "train.micro_batch_size=2",
           "train.steps=4", "model.tie_embeddings=true"]
    layout = ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2", "parallel.dp=2"]
    _train_run(cmd, full, *layout, "train.ckpt_every=2")
    manifest = json.loads((full / "checkpoints" / "step-00000002" / MANIFEST_FILE).read_text())
    assert {k: manifest["layout"][k] for k in ("pp", "vpp", "ep", "dp")} == {"pp": 2, "vpp": 2, "ep": 2, "dp": 2}
    experts = {k.split(".")[1] for k in manifest["tensors"] if k.startswith("blocks.") and ".experts." in k}
    assert experts == {"1", "3"}
    assert "optimizer.state.exp_avg.blocks.3.ffn.experts.w_in_EDF" in manifest["tensors"]
    _cut_after(full, cut, 2)
    _train_run(cmd, cut, "parallel.pp=1", "parallel.dp=2", "train.ckpt_every=1", "train.resume=true")
    assert _train_losses(cut)[3] == pytest.approx(_train_losses(full)[3], rel=TOL)
    _cut_after(cut, back, 3)
    _train_run(cmd, back, *layout, "train.ckpt_every=1", "train.resume=true")
    assert _train_losses(back)[4] == pytest.approx(_train_losses(full)[4], rel=TOL)


def test_content_hash_is_layout_independent() -> None:
    full = torch.randn(6, 4, 5)
    whole = content_hash(full, (6, 4, 5), (0, 0, 0))
    rows = sum(content_hash(full[i : i + 2], (6, 4, 5), (i, 0, 0)) for i in range(0, 6, 2)) % (1 << 64)
    cols = sum(content_hash(full[:, :, j : j + 1], (6, 4, 5), (0, 0, j)) for j in range(5)) % (1 << 64)
    assert whole == rows == cols
    altered = full.clone()
    altered[3, 2, 1] = torch.nextafter(altered[3, 2, 1], torch.tensor(1e9))
    assert content_hash(altered, (6, 4, 5), (0, 0, 0)) != whole
    swapped = full.clone()
    swapped[[0, 1]] = full[[1, 0]]
    assert content_hash(swapped, (6, 4, 5), (0, 0, 0)) != whole


def test_checkpoint_save_needs_its_cpu_patch() -> None:
    """megatron's writer synchronizes CUDA after its host copies and its finalize all-reduces
    on the current CUDA device; on CPU only the patch (applied with the others by
    ``apply_cpu_compat``) lets them run."""
    import importlib

    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    from parallel import megatron_compat

    if torch.cuda.is_available():
        pytest.skip("the patch is a no-op with CUDA")
    for module in (filesystem_async, state_dict_saver):
        importlib.reload(module)  # pristine: the module's own ``torch``
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        filesystem_async.FileSystemWriterAsync.preload_tensors([], True)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        state_dict_saver.torch.cuda.current_device()
    megatron_compat.patch_checkpoint_save_device()
    assert filesystem_async.FileSystemWriterAsync.preload_tensors([], True) == []
    assert state_dict_saver.torch.cuda.current_device() == torch.device("cpu")
