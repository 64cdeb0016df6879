"""Bad inputs to every ``moe`` command, through the real command line in subprocesses.

Each row is one input: the command's arguments, the exit status it must end with and a
phrase its one ``error:`` line must contain (the value and the fix). A refused input must
fail before any work starts, so no row trains, benchmarks or emulates: a command that
accepted its input would run into the timeout, or leave files in its working directory.
No row may print a traceback, and no row may change a file it was given.

Rows run two at a time (each subprocess imports torch); ``-k`` runs only the rows it
selects. To cover a new input, add a ``Row`` to ``ROWS``; placeholders in its arguments:
``{fx}`` the shared fixture directory (``_make_fixtures``), ``{configs}`` the shipped
configs, ``{scratch}`` an empty directory of the row's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TIMEOUT_S = 120


@dataclass(frozen=True)
class Row:
    """One bad input: ``argv`` after ``moe``, the exit status, a phrase of the message."""

    id: str
    argv: tuple[str, ...]
    code: int
    phrase: str


def row(id: str, argv: str, code: int, phrase: str) -> Row:
    """``argv`` is split on spaces (no argument below contains one)."""
    return Row(id, tuple(argv.split(" ")), code, phrase)


TINY = "{configs}/tiny.yaml"
H100 = "--cluster {configs}/hardware/h100-ib.yaml"
ROWS = (
    # config files (moe train fails in load_config, before any data or model)
    row("config-empty", "train {fx}/empty.yaml", 2, "empty.yaml' is empty (or only comments)"),
    row("config-only-comments", "train {fx}/comments.yaml", 2, "is empty (or only comments)"),
    row("config-not-utf8", "train {fx}/latin1.yaml", 2, "is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
    row("config-binary", "train {fx}/binary.yaml", 2, "is not UTF-8 text"),
    row("config-duplicate-section", "train {fx}/dup-section.yaml", 2, "key 'train' is given twice (lines 1 and 5)"),
    row("config-duplicate-key", "train {fx}/dup-key.yaml", 2, "key 'steps' is given twice (lines 2 and 3)"),
    row("config-directory", "train {configs}", 2, "is a directory; give a YAML file in it"),
    row("config-yaml-error-one-line", "train {fx}/tab.yaml", 2, "not valid YAML: line 2, column 1: found character"),
    row("config-not-found-says-where", "train nope.yaml", 2, "not found (looked in: "),
    row("config-relative-name-from-any-cwd", "train configs/tiny.yaml train.lr=-1", 2, "train.lr=-1.0: must be > 0"),
    row("config-yaml-nan", "train {fx}/nan.yaml", 2, "train.lr=nan: must be a finite number"),
    row("override-inf-lr", f"train {TINY} train.lr=.inf", 2, "train.lr=inf: must be a finite number"),
    row("override-inf-capacity", f"train {TINY} moe.capacity_factor=inf", 2, "moe.capacity_factor=inf: must be a finite"),
    row("override-inf-rope", f"train {TINY} model.rope_theta=.inf", 2, "model.rope_theta=inf: must be a finite"),
    row("override-inf-cpus", f"train {TINY} launch.cpus_per_rank=.inf", 2, "launch.cpus_per_rank=inf: must be a finite"),
    row("override-into-empty-section", "train {fx}/empty-section.yaml model.dim=64 model.n_heads=5", 2,
        "model.n_heads=5: must divide model.dim=64"),
    row("layout-etp-fix", f"train {TINY} parallel.etp=2", 2, "set parallel.etp=1 or parallel.dp=2"),
    row("cache-dir-under-a-file", f"train {TINY} data.cache_dir={{fx}}/a-file/cache", 2,
        "a-file is a file, not a directory; set data.cache_dir"),
    # moe data prepare
    row("prepare-over-a-dataset", "data prepare {fx}/src --out {fx}/dataset --val-fraction 0.3", 2,
        "already holds a prepared dataset; pass --overwrite"),
    row("prepare-out-under-a-file", "data prepare {fx}/src --out {fx}/a-file/ds", 2, "a-file is a file, not a directory"),
    row("prepare-out-read-only", "data prepare {fx}/src --out /sys/moe-dataset", 2, "choose a writable output directory"),
    Row("prepare-out-empty", ("data", "prepare", "{fx}/src", "--out", ""), 2, "argument --out: empty"),
    row("prepare-binary-named", "data prepare {fx}/blob.bin {fx}/src --out {scratch}/ds", 2,
        "blob.bin: binary, a NUL byte at offset 4; only text is tokenized"),
    row("prepare-not-utf8-named", "data prepare {fx}/latin1.txt {fx}/src --out {scratch}/ds", 2,
        "latin1.txt: not UTF-8 text, byte 0xe9"),
    row("prepare-binary-in-a-directory", "data prepare {fx}/src-with-blob --out {scratch}/ds --val-fraction 0.3", 0,
        "warning: skipped 1 file(s) that are not text: "),
    # moe sweep, moe sweep report
    row("report-not-a-sweep", "sweep report {fx}/notes", 2, "notes: not a sweep directory"),
    row("report-missing-dir", "sweep report {fx}/no-such-sweep", 2, "no-such-sweep: no such directory"),
    row("report-a-file", "sweep report {fx}/a-file", 2, "is a file, not a sweep directory"),
    row("report-corrupt-trial", "sweep report {fx}/corrupt-sweep", 2, "trials/t1: unreadable trial files (JSONDecodeError"),
    row("sweep-duplicate-grid", "sweep {fx}/sweep-dup.yaml", 2, "key 'grid' is given twice (lines 2 and 4)"),
    row("sweep-not-utf8", "sweep {fx}/latin1.yaml", 2, "latin1.yaml' is not UTF-8 text"),
    row("sweep-nan", "sweep {fx}/sweep-nan.yaml", 2, "fit.huber_delta=nan: must be a finite number"),
    row("sweep-out-dir-of-other-files", "sweep {fx}/sweep-user-dir.yaml", 2,
        "is not a sweep directory (it holds precious.txt"),
    # moe simulate
    row("cluster-not-yaml", f"simulate {TINY} --no-emulate --cluster {{fx}}/hw-garbage.yaml", 2,
        "is not valid YAML: line 2, column 6"),
    row("cluster-not-utf8", f"simulate {TINY} --no-emulate --cluster {{fx}}/latin1.yaml", 2, "is not UTF-8 text"),
    row("cluster-duplicate-key", f"simulate {TINY} --no-emulate --cluster {{fx}}/hw-dup.yaml", 2,
        "key 'kind' is given twice"),
    row("cluster-nan", f"simulate {TINY} --no-emulate --cluster {{fx}}/hw-nan.yaml", 2,
        "matmul_efficiency=nan must be a finite number"),
    row("cluster-directory", f"simulate {TINY} --no-emulate --cluster {{configs}}/hardware", 2, "is a directory"),
    row("cluster-unknown-name", f"simulate {TINY} --no-emulate --cluster h100", 2, "--cluster 'h100' not found (looked in: "),
    row("cluster-shipped-name-from-any-cwd", f"simulate {TINY} --no-emulate --cluster h100-ib --out {{scratch}}/sim", 0,
        "outputs in "),
    row("simulate-negative-steps", f"simulate {TINY} --steps -1 {H100}", 2, "--steps -1: an emulation needs at least 3"),
    row("simulate-routing-missing", f"simulate {TINY} --no-emulate --routing {{fx}}/no-routing {H100}", 2,
        "no-routing': no such directory"),
    row("simulate-routing-empty", f"simulate {TINY} --no-emulate --routing {{fx}}/notes {H100}", 2,
        "holds no routing-rank-K.jsonl files"),
    row("simulate-routing-while-emulating", f"simulate {TINY} --routing {{fx}}/notes {H100}", 2, "add --no-emulate"),
    row("simulate-out-of-other-files", f"simulate {TINY} --no-emulate --out {{fx}}/notes {H100}", 2,
        "which `moe simulate` did not write"),
    row("simulate-out-a-file", f"simulate {TINY} --no-emulate --out {{fx}}/a-file {H100}", 2, "is a file; give a directory"),
    row("calibrate-out-under-a-file", "simulate calibrate --out {fx}/a-file/hw.yaml", 2, "a-file is a file, not a directory"),
    row("calibrate-over-another-file", "simulate calibrate --out {fx}/nan.yaml", 2,
        "exists and was not written by `moe simulate calibrate`"),
    row("validate-run-steps-1", f"simulate validate {TINY} --layouts dp=1 --run-steps 1", 2,
        "--run-steps 1: 0 for no timed run, or at least 2"),
    # moe bench kernels, moe bench layer
    row("bench-shapes-garbage", "bench kernels --shapes garbage", 2, "--shapes item 'garbage': expected T,H,E,K"),
    row("bench-shapes-none", "bench kernels --shapes ;", 2, "no shape given"),
    row("bench-layer-negative-tokens", "bench layer --tokens -1", 2, "--tokens -1: must be >= 1"),
    row("bench-layer-top-k-above-experts", "bench layer --experts 2 --top-k 3", 2, "--top-k 3: must be in [1, --experts=2]"),
    row("bench-layer-nan-capacity", "bench layer --capacity-factor nan", 2, "--capacity-factor nan: must be a finite"),
    row("bench-out-over-another-file", "bench kernels --shapes 16,8,4,1 --out {fx}/a-file", 2,
        "exists and was not written by `moe bench`"),
    row("bench-out-under-a-file", "bench kernels --shapes 16,8,4,1 --out {fx}/a-file/k.json", 2, "a-file is a file"),
    # moe ckpt inspect
    row("ckpt-missing", "ckpt inspect {fx}/no-checkpoint", 2, "no-checkpoint': no such file or directory"),
    row("ckpt-corrupt-manifest", "ckpt inspect {fx}/old-run/checkpoints/step-00000001", 2, "manifest.json"),
    # run directories, resuming, what fits (launch/local_launcher.py start, launch/preflight.py)
    row("run-dir-holds-another-run", f"train {TINY} train.run_dir={{fx}}/old-run", 2,
        "already holds a run (config.yaml, metrics.jsonl, checkpoints); a run directory holds one run: continue that run "
        "with train.resume=true, or start this one in another train.run_dir"),
    row("run-dir-a-file", f"train {TINY} train.run_dir={{fx}}/a-file", 2, "cannot hold a run ("),
    row("run-dir-under-a-file", f"train {TINY} train.run_dir={{fx}}/a-file/run", 2, "a-file' is a file); set train.run_dir"),
    row("resume-without-checkpoint", f"train {TINY} train.resume=true train.run_dir={{scratch}}/run", 2,
        "holds no complete checkpoint; name the run that has one with train.run_dir"),
    row("resume-corrupt-manifest", f"train {TINY} train.resume=true train.run_dir={{fx}}/old-run", 2,
        "manifest.json"),
    row("model-states-do-not-fit", f"train {TINY} moe.num_experts=1000000", 2,
        "the model does not fit: rank 0's model states alone need"),
    row("nonfinite-skips-with-deepspeed", f"train {TINY} parallel.dp=2 parallel.engine=deepspeed "
        "train.max_nonfinite_steps=1", 2, "train.max_nonfinite_steps=1 with parallel.engine=deepspeed"),
    row("recompute-layers-above-the-blocks", f"train {TINY} train.recompute=full train.recompute_layers=9", 2,
        "train.recompute_layers=9: the model holds 4 block(s)"),
    # moe check-layouts
    row("check-layouts-negative-rtol", f"check-layouts {TINY} --layouts dp=1;dp=2 --rtol -1", 2,
        "--rtol -1: must be a finite number >= 0"),
    row("check-layouts-zero-steps", f"check-layouts {TINY} --layouts dp=1;dp=2 --steps 0", 2, "--steps 0: must be >= 1"),
    row("check-layouts-unknown-key", f"check-layouts {TINY} --layouts dp=1;sequence_paralel=true", 2,
        "(did you mean 'sequence_parallel'?)"),
    row("check-layouts-bad-config", f"check-layouts {TINY} moe.granularity=5 --layouts dp=1;dp=2", 2,
        "moe.granularity=5: must divide moe.expert_ffn_dim=384"),  # and no temporary run directory left
    # the routing menu: sigmoid scores, bias balancing, group-limited routing, fine-grained experts
    row("topk-groups-above-n-groups", f"train {TINY} moe.score=sigmoid moe.n_groups=2 moe.topk_groups=3", 2,
        "moe.topk_groups=3: must be in [1, moe.n_groups=2]"),
    row("n-groups-not-dividing-experts", f"train {TINY} moe.score=sigmoid moe.n_groups=3", 2,
        "moe.n_groups=3: must be >= 1 and divide the routed experts moe.num_experts*moe.granularity=4"),
    row("top-k-above-eligible-groups", f"train {TINY} moe.score=sigmoid moe.top_k=3 moe.n_groups=2 moe.topk_groups=1",
        2, "moe.top_k=3: the 1 eligible group(s) (moe.topk_groups) of 2 experts hold 2 experts"),
    row("granularity-not-dividing-ffn", f"train {TINY} moe.granularity=5", 2,
        "moe.granularity=5: must divide moe.expert_ffn_dim=384"),
    row("negative-bias-update-rate", f"train {TINY} moe.score=sigmoid moe.expert_bias_update_rate=-0.001", 2,
        "moe.expert_bias_update_rate=-0.001: must be >= 0"),
    row("bias-balancing-with-softmax", f"train {TINY} moe.expert_bias_update_rate=0.001", 2,
        "moe.expert_bias_update_rate=0.001: needs moe.score=sigmoid"),
    # moe simulate plan (the GPU cluster model)
    row("plan-gpus-no-layout", "simulate plan {configs}/qwen3-235b-a22b.yaml --gpus 255", 2,
        "--gpus 255: no layout of this model uses 255 GPUs"),
    row("plan-unknown-dispatcher", "simulate plan {configs}/qwen3-30b-a3b.yaml --gpus 16 --dispatcher hybridep", 2,
        "dispatcher 'hybridep' is not a profile of hardware 'h100-ib'; known: ['alltoall', 'deepep']"),
    row("plan-hardware-missing-field", "simulate plan {configs}/qwen3-30b-a3b.yaml --gpus 16 --cluster {fx}/hw-no-dispatchers.yaml",
        2, "missing field 'dispatchers' (the all-to-all profiles) that the cluster model needs"),
    row("plan-cpu-cluster", "simulate plan {configs}/qwen3-30b-a3b.yaml --gpus 2 --cluster this-machine", 2,
        "is kind cpu; the cluster model predicts GPU clusters"),
    # subword tokenizers and moe eval ({fx}/bpe-dataset: 300 ids, prepared with {fx}/tokenizer.json)
    row("tokenizer-vocab-above-model", f"train {TINY} data.path={{fx}}/bpe-dataset", 2,
        "model.vocab_size=257 is smaller than the dataset's vocabulary (300 ids); set model.vocab_size=300"),
    row("tokenizer-hash-mismatch", f"train {TINY} data.path={{fx}}/bpe-dataset model.vocab_size=300 "
        "data.tokenizer={fx}/other-tokenizer.json", 2, "is not the tokenizer"),
    row("tokenizer-not-found", "data prepare {fx}/src --tokenizer {fx}/nowhere.json --out {scratch}/ds", 2,
        "nowhere.json: not found; give a Hugging Face tokenizer.json or a model directory"),
    row("tokenizer-not-a-tokenizer", "data prepare {fx}/src --tokenizer {fx}/a-file --out {scratch}/ds", 2,
        "a-file: not a Hugging Face tokenizer ("),
    row("tokenizer-dir-without-one", "data prepare {fx}/src --tokenizer {fx}/src --out {scratch}/ds", 2,
        "no tokenizer.json in this directory"),
    row("tokenizer-train-small-vocab", "data tokenizer train {fx}/src --vocab-size 100 --out {scratch}/t.json", 2,
        "--vocab-size=100: must be >= 258"),
    row("tokenizer-train-over-a-file", "data tokenizer train {fx}/src --vocab-size 300 --out {fx}/a-file", 2,
        "exists; choose another path (a tokenizer is never overwritten)"),
    row("eval-not-a-checkpoint", "eval {fx}/src", 2, "is not a checkpoint, a checkpoints directory or a run directory"),
    # moe ckpt import / export / upcycle and train.init_from (nothing is written at --out, which lies in {fx})
    row("ckpt-import-not-a-model", "ckpt import {fx}/src --out {fx}/imported", 2,
        "is not a Hugging Face model directory: it has no config.json"),
    row("ckpt-import-unsupported-arch", "ckpt import {fx}/hf-gpt2 --out {fx}/imported", 2,
        "architectures=['GPT2LMHeadModel'] is not supported; moe ckpt import reads MixtralForCausalLM"),
    row("ckpt-import-shape-disagrees", "ckpt import {fx}/hf-bad-shape --out {fx}/imported", 2,
        "tensor 'model.layers.0.mlp.gate_proj.weight' in model.safetensors is [24, 16] but config.json implies [32, 16]"),
    row("ckpt-import-missing-shard", "ckpt import {fx}/hf-missing-shard --out {fx}/imported", 2,
        "-00002-of-00007.safetensors' is missing: model.safetensors.index.json names it for"),
    row("ckpt-import-truncated", "ckpt import {fx}/hf-truncated --out {fx}/imported", 2,
        "is not a readable safetensors file (Error while deserializing header"),
    row("ckpt-import-out-exists", "ckpt import {fx}/hf-llama --out {fx}/src", 2,
        "src' already exists; give a new directory (nothing is overwritten)"),
    row("ckpt-export-inexpressible", "ckpt export {fx}/gelu-run --out {fx}/exported", 2,
        "MixtralForCausalLM cannot express this checkpoint's model.activation='gelu' (dense MLPs are SwiGLU); "
        "model.moe_every=2 (Mixtral has experts in every layer"),
    row("ckpt-export-capacity-to-qwen3", "ckpt export {fx}/gelu-run --out {fx}/exported --arch Qwen3MoeForCausalLM", 2,
        "moe.capacity_factor=1.5 (only None)"),
    row("ckpt-export-not-a-checkpoint", "ckpt export {fx}/src --out {fx}/exported", 2,
        "is not a checkpoint, a checkpoints directory or a run directory"),
    row("ckpt-upcycle-granularity", "ckpt upcycle {fx}/hf-llama --experts 4 --top-k 2 --granularity 5 --out {fx}/up", 2,
        "--granularity 5 must be >= 1 and divide the dense MLP's width model.ffn_dim=24"),
    row("ckpt-upcycle-top-k", "ckpt upcycle {fx}/hf-llama --experts 2 --top-k 3 --out {fx}/up", 2,
        "moe.top_k=3: must be in [1, moe.num_experts=2]"),
    row("train-init-from-missing", f"train {TINY} train.init_from={{fx}}/nowhere", 2,
        "nowhere': no such file or directory; name a checkpoint"),
    row("train-init-from-other-model", f"train {TINY} train.init_from={{fx}}/gelu-run", 2,
        "does not fit the model/moe config: 'embed.weight' is [11, 8] there but [257, 192] here"),
    # moe simulate (this machine's predictor) and simulate validate
    row("cluster-missing-field", f"simulate {TINY} --no-emulate --cluster {{fx}}/hw-no-bandwidth.yaml", 2,
        "hw-no-bandwidth.yaml: missing field 'memory_bandwidth'; every hardware file needs it"),
    row("validate-pipeline-one-micro-batch", f"simulate validate {TINY} model.n_layers=2 train.batch_size=8 "
        "--layouts dp=1;dp=2;pp=2", 2, "layout 'pp=2': 1 micro-batches per data-parallel rank"),
    # issue 18 items 5-7: expert choice, noisy top-k, the collapse alarm (moe.router is one key: expert choice and
    # hash cannot both be set)
    row("expert-choice-and-hash-at-once", f"train {TINY} moe.router=[expert_choice,hash]", 2,
        "moe.router=['expert_choice', 'hash']: expected one of"),
    row("expert-choice-without-capacity", f"train {TINY} moe.router=expert_choice moe.aux_loss_coeff=0", 2,
        "moe.capacity_factor=None: moe.router=expert_choice needs a capacity factor"),
    row("expert-choice-with-aux-loss", f"train {TINY} moe.router=expert_choice moe.capacity_factor=2", 2,
        "moe.aux_loss_coeff=0.01: moe.router=expert_choice balances by construction"),
    row("expert-choice-top-k-above-experts", f"train {TINY} moe.router=expert_choice moe.capacity_factor=2 "
        "moe.aux_loss_coeff=0 moe.top_k=5", 2, "moe.top_k=5: must be in [1, moe.num_experts=4]"),
    row("expert-choice-tp-splits-sequences", f"train {TINY} moe.router=expert_choice moe.capacity_factor=2 "
        "moe.aux_loss_coeff=0 parallel.tp=2 train.micro_batch_size=1", 2,
        "make train.micro_batch_size a multiple of parallel.tp=2"),
    row("noisy-topk-every-expert", f"train {TINY} moe.router=noisy_topk moe.top_k=4 moe.normalize_weights=true", 2,
        "moe.top_k=4: moe.router=noisy_topk needs moe.top_k < moe.num_experts=4"),
    row("importance-loss-without-noisy-topk", f"train {TINY} moe.importance_loss_coeff=0.1", 2,
        "moe.importance_loss_coeff=0.1: is a loss of moe.router=noisy_topk"),
    row("noisy-topk-negative-load-loss", f"train {TINY} moe.router=noisy_topk moe.load_loss_coeff=-0.1", 2,
        "moe.load_loss_coeff=-0.1: must be >= 0"),
    row("collapse-share-above-one", f"train {TINY} train.collapse_share=1.5", 2, "train.collapse_share=1.5: must be in (0, 1)"),
    row("collapse-intervals-zero", f"train {TINY} train.collapse_intervals=0", 2, "train.collapse_intervals=0: must be >= 1"),
    # issue 17: the data against the model before any rank starts (launch/preflight.py check_data), multi-rank too
    row("tokenizer-vocab-above-model-dp2", f"train {TINY} data.path={{fx}}/bpe-dataset parallel.dp=2", 2,
        "model.vocab_size=257 is smaller than the dataset's vocabulary (300 ids); set model.vocab_size=300"),
    row("tokenizer-hash-mismatch-dp2", f"train {TINY} data.path={{fx}}/bpe-dataset model.vocab_size=300 "
        "data.tokenizer={fx}/other-tokenizer.json parallel.dp=2 parallel.ep=2", 2, "is not the tokenizer"),
    # moe bench layouts: --out and --runs refused before the first layout trains
    row("bench-layouts-out-over-another-file", f"bench layouts {TINY} --layouts dp=1 --out {{fx}}/a-file", 2,
        "exists and was not written by `moe bench`"),
    row("bench-layouts-out-a-directory", f"bench layouts {TINY} --layouts dp=1 --out {{fx}}/notes", 2,
        "is a directory; give a file path"),
    row("bench-layouts-bad-config", f"bench layouts {TINY} moe.granularity=5 --layouts dp=1 --out {{scratch}}/l.json", 2,
        "moe.granularity=5: must divide moe.expert_ffn_dim=384"),
    row("bench-layouts-runs-a-file", f"bench layouts {TINY} --layouts dp=1 --runs {{fx}}/a-file --out {{scratch}}/l.json",
        2, "a-file' is a file; give a directory"),
)


def _make_fixtures(fx: Path) -> None:
    """The files the rows name; none of them may change (``test_no_input_file_changed``)."""
    fx.mkdir()
    (fx / "empty.yaml").write_text("")
    (fx / "comments.yaml").write_text("# nothing but a comment\n")
    (fx / "latin1.yaml").write_bytes(b"train:\n  steps: 1  # caf\xe9\n")
    (fx / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (fx / "binary.yaml").write_bytes(bytes(range(256)))
    (fx / "dup-section.yaml").write_text("train:\n  steps: 1\nmodel:\n  dim: 64\ntrain:\n  lr: 0.1\n")
    (fx / "dup-key.yaml").write_text("train:\n  steps: 1\n  steps: 2\n")
    (fx / "tab.yaml").write_text("train:\n\tsteps: 1\n")
    (fx / "nan.yaml").write_text("train:\n  lr: .nan\n")
    (fx / "empty-section.yaml").write_text("model:\ntrain:\n  steps: 1\n")
    (fx / "a-file").write_text("not a directory\n")
    old_run = fx / "old-run"  # another run's outputs, with a checkpoint whose manifest is damaged
    (old_run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (old_run / "config.yaml").write_text("train:\n  steps: 1\n")
    (old_run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (old_run / "checkpoints" / "step-00000001" / "COMPLETE").write_text("")
    (old_run / "checkpoints" / "step-00000001" / "manifest.json").write_text('{"step": 1, "files": {')
    (old_run / "checkpoints" / "latest").write_text("step-00000001\n")
    (fx / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02\x03" * 8)
    for source in ("src", "src-with-blob"):
        (fx / source).mkdir()
        for i in range(12):
            (fx / source / f"doc{i}.txt").write_text(f"document {i} " * 40)
    (fx / "src-with-blob" / "blob.txt").write_bytes(b"\x00\x01\x02" * 10)
    (fx / "dataset").mkdir()
    for name in ("meta.json", "train.bin", "train.idx", "val.bin", "val.idx"):
        (fx / "dataset" / name).write_text("an earlier dataset\n")
    (fx / "notes").mkdir()
    (fx / "notes" / "results.md").write_text("my own results, not a sweep's\n")
    (fx / "user-dir").mkdir()
    (fx / "user-dir" / "precious.txt").write_text("keep me\n")
    trial = fx / "corrupt-sweep" / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text('{"key": "t1", "overrides": {}}\n')
    (trial / "summary.json").write_text('{"steps": 1,\n')
    sweep = "base: configs/tiny.yaml\ngrid:\n  moe.num_experts: [1, 2]\n"
    (fx / "sweep-dup.yaml").write_text(sweep + "grid:\n  moe.num_experts: [4]\n")
    (fx / "sweep-nan.yaml").write_text(sweep + "fit:\n  huber_delta: .nan\n")
    (fx / "sweep-user-dir.yaml").write_text(sweep + f"out_dir: {fx / 'user-dir'}\n")
    hardware = (CONFIGS / "hardware" / "h100-ib.yaml").read_text()
    (fx / "hw-garbage.yaml").write_text("kind: gpu\n  bad: [\n")
    (fx / "hw-dup.yaml").write_text(hardware + "\nkind: cpu\n")
    (fx / "hw-nan.yaml").write_text(hardware.replace("matmul_efficiency:", "matmul_efficiency: .nan #", 1))
    (fx / "hw-no-dispatchers.yaml").write_text(hardware.split("\ndispatchers:")[0] + "\n")
    (fx / "hw-no-bandwidth.yaml").write_text("".join(line for line in hardware.splitlines(keepends=True)
                                                     if not line.startswith("memory_bandwidth:")))
    _make_tokenizer_fixtures(fx)
    _make_hf_fixtures(fx)


def _make_hf_fixtures(fx: Path) -> None:
    """Hugging Face directories (a dense Llama; GPT-2's config; one whose config.json disagrees
    with its weights; sharded with a shard gone; truncated) and a checkpoint of ours with
    gelu MLPs, dense layers and a capacity factor."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from launch.config import Config, to_dict
    from moe.config import ModelConfig, MoEConfig
    from moe.model import Transformer
    from parallel.checkpoint import save_checkpoint

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16))
    llama.save_pretrained(fx / "hf-llama")
    llama.save_pretrained(fx / "hf-missing-shard", max_shard_size="4KB")
    shards = sorted((fx / "hf-missing-shard").glob("model-*.safetensors"))
    assert len(shards) > 2, shards
    shards[1].unlink()
    shutil.copytree(fx / "hf-llama", fx / "hf-truncated")
    data = (fx / "hf-truncated" / "model.safetensors").read_bytes()
    (fx / "hf-truncated" / "model.safetensors").write_bytes(data[: len(data) - 100])
    shutil.copytree(fx / "hf-llama", fx / "hf-bad-shape")
    config = json.loads((fx / "hf-llama" / "config.json").read_text())
    (fx / "hf-bad-shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    (fx / "hf-gpt2").mkdir()
    (fx / "hf-gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 16}))
    model = ModelConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, seq_len=8, ffn_dim=8, moe_every=2)
    moe = MoEConfig(num_experts=2, top_k=1, normalize_weights=False, expert_ffn_dim=8, activation="swiglu",
                    capacity_factor=1.5)
    state = {"step": 1, "engine": {"model": Transformer(model, moe).state_dict()},
             "config": to_dict(Config(model=model, moe=moe))}
    save_checkpoint(fx / "gelu-run" / "checkpoints", 1, state, keep=1)


def _make_tokenizer_fixtures(fx: Path) -> None:
    """A 300-id BPE tokenizer, a dataset prepared with it, and another tokenizer."""
    from launch.data import load_hf_tokenizer, prepare
    from launch.data.bpe import main as tokenizer_main

    code = str(ROOT / "launch" / "data")  # varied text: enough pairs for every merge asked for
    assert tokenizer_main(["train", code, "--vocab-size", "300", "--out", str(fx / "tokenizer.json")]) == 0
    assert tokenizer_main(["train", code, "--vocab-size", "270", "--out", str(fx / "other-tokenizer.json")]) == 0
    prepare(sorted((fx / "src").iterdir()), fx / "bpe-dataset", 0.3, tokenizer=load_hf_tokenizer(fx / "tokenizer.json"))


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@dataclass(frozen=True)
class Outcome:
    code: int | None
    output: str
    cwd_left: list[str]
    tmp_left: list[str]  # what it left in its own TMPDIR


def _run(r: Row, fx: Path, base: Path) -> Outcome:
    """``moe`` with ``r``'s arguments in an empty working directory of its own."""
    cwd, scratch, tmp = base / r.id / "cwd", base / r.id / "scratch", base / r.id / "tmp"
    cwd.mkdir(parents=True)
    scratch.mkdir()
    tmp.mkdir()
    argv = [a.format(fx=fx, configs=CONFIGS, scratch=scratch) for a in r.argv]
    try:
        proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=cwd, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env={**os.environ, "TMPDIR": str(tmp)})
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = None, f"still running after {TIMEOUT_S} s: the input was accepted and work started ({exc})"
    return Outcome(code, output, sorted(p.name for p in cwd.iterdir()), sorted(p.name for p in tmp.iterdir()))


@pytest.fixture(scope="module")
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], Path, dict]:
    """The selected rows' outcomes, run two at a time, with the fixture directory and
    its snapshot from before they ran."""
    selected = {item.callspec.params["r"].id for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input"}
    base = tmp_path_factory.mktemp("bad-inputs")
    fx = base / "fx"
    _make_fixtures(fx)
    before = _snapshot(fx)
    rows = [r for r in ROWS if r.id in selected]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = dict(zip((r.id for r in rows), pool.map(lambda r: _run(r, fx, base / "rows"), rows)))
    return outcomes, fx, before


def _command(r: Row) -> str:
    """``train``, ``sweep report``, ...: the command a row exercises."""
    two = " ".join(r.argv[:2])
    return two if two in SUBCOMMANDS else r.argv[0]


SUBCOMMANDS = ("data prepare", "sweep report", "simulate calibrate", "simulate validate", "simulate plan", "bench kernels",
               "bench layer", "bench layouts", "ckpt inspect", "ckpt import", "ckpt export", "ckpt upcycle", "data tokenizer")


def test_rows_are_unique_and_cover_every_command() -> None:
    assert len({r.id for r in ROWS}) == len(ROWS) >= 40
    assert {_command(r) for r in ROWS} == {"train", "sweep", "simulate", "check-layouts", "eval", *SUBCOMMANDS}


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(r: Row, ran: tuple[dict[str, Outcome], Path, dict]) -> None:
    outcome = ran[0][r.id]
    shown = f"moe {' '.join(r.argv)}\n{outcome.output}"
    assert "Traceback" not in outcome.output, shown
    assert outcome.code == r.code, shown
    if r.code == 0:
        assert r.phrase in outcome.output, shown
        return
    errors = [line for line in outcome.output.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1 and r.phrase in errors[0], shown
    assert outcome.cwd_left == [], f"{shown}\nwrote {outcome.cwd_left} into its working directory"
    assert outcome.tmp_left == [], f"{shown}\nleft {outcome.tmp_left} in its temporary directory"


def test_no_input_file_changed(ran: tuple[dict[str, Outcome], Path, dict]) -> None:
    """Refusing must not write: no overwritten report, replaced dataset or created directory."""
    _, fx, before = ran
    after = _snapshot(fx)
    assert sorted(set(after) ^ set(before)) == []
    assert [name for name in before if before[name] != after[name]] == []
