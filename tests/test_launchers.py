"""Stages 4, 5 and 7 through the real launchers on CPU (gloo): ``deepspeed --num_gpus 2`` and
``torchrun --nproc_per_node 2`` against plain ``python`` with doubled accumulation; and what several ranks
must agree on: the stage folder (--force resets once, every rank sees the same outcome), the world size,
and a folder every rank can see.

The inputs are built once per module with the real writers (a throwaway tokenizer, stage 3 shards from the
held-out sample, stage 6 through 6_build_sft.py); each launch copies them into its own run.root, then runs
4 -> 5 -> 7 as subprocesses, exactly as README documents the commands. Rank processes that must differ
per rank (a node-local run.root) are started the way a launcher starts them: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in the environment.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dante.artifacts import Stage, release_all_stage_locks, stage_dir
from dante.config import RunConfig, ShardsStageConfig
from dante.metrics import read_metrics
from dante.tokenizer import train_tokenizer
from tests.helpers import sft_sample_texts, write_text_shards, write_tokenizer_stage

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's launchers: deepspeed, torchrun
G = 2  # accumulation per rank of the 2-rank launches; the 1-rank run accumulates 2 * G
SHORT = 64  # stage 4 length; stage 5 doubles it (YaRN x2) and stage 7 trains at the doubled length
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SHORT, multiple_of=32)
COMMON = dict(precision="fp32", backend="deepspeed", log_every=1, keep_last=1, lr=3e-3, min_lr=3e-4,
              warmup_steps=1, loss_chunk_size=64)
PRETRAIN = dict(COMMON, seq_len=SHORT, micro_batch=2, max_steps=3, checkpoint_every=3, eval_every=3, eval_batches=2,
                tier_weights={1: 2.0, 2: 1.0})
EXTEND = dict(COMMON, seq_len=2 * SHORT, micro_batch=1, max_steps=2, checkpoint_every=2, eval_every=2, eval_batches=2,
              weight_decay=0.0, tier_weights={1: 2.0, 2: 1.0})
SFT = dict(COMMON, seq_len=2 * SHORT, micro_batch=1, max_steps=2, checkpoint_every=2, eval_every=2, eval_batches=2,
           weight_decay=0.0)
LONG_EVAL = dict(lengths=[2 * SHORT], depths=[0.5], trials=1, bucket_size=32, max_docs=1, distractors=1)
STAGES = (("4_pretrain.py", "04_pretrain", "pretrain"), ("5_extend_context.py", "05_extend", "extend"),
          ("7_sft.py", "07_sft", "sft"))
# Loss, gradient norm and validation loss of a 2-rank run vs the 1-rank run with doubled accumulation: fp32
# sums in another order (gloo all-reduce vs accumulation in one buffer) move results by a few ulps, which
# Adam carries along; measured max relative difference 4e-8 (stages 5 and 7; stage 4 identical).
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **extra)
    return env


def _texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_configs(run: RunConfig, where: Path, vocab: int) -> dict[str, Path]:
    """One YAML per training stage for ``run`` (JSON is YAML)."""
    r = {"name": run.name, "root": run.root, "seed": run.seed}
    docs = {
        "pretrain": {"run": r, "model": {**MODEL, "vocab_size": vocab}, "train": PRETRAIN},
        "extend": {"run": r, "extend": {"mode": "yarn", "factor": 2.0}, "train": EXTEND, "long_eval": LONG_EVAL},
        "sft": {"run": r, "sft": {"epochs": 1}, "train": SFT},
    }
    out = {}
    for key, doc in docs.items():
        out[key] = where / f"{run.name}-{key}.yaml"
        out[key].write_text(yaml.safe_dump(doc))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """02_tokenizer, 03_shards and 06_sft_data of run 'l' under base/, by the real writers (built once)."""
    import runpy

    from dante.cli import run_stage

    root = tmp_path_factory.mktemp("launch")
    heldout = REPO / "data" / "sample" / "heldout"
    it, code = _texts(heldout / "it.jsonl.gz"), _texts(heldout / "code.jsonl.gz")
    tokenizer = train_tokenizer(it + code + sft_sample_texts(), vocab_size=512, n_reserved=8, pinned_chars=[])
    run = RunConfig(name="l", root=str(root / "base"), seed=3)
    write_tokenizer_stage(run, tokenizer)
    st = Stage.open(ShardsStageConfig(run=run), "03_shards")
    write_text_shards(st, tokenizer, stage_dir(run, "02_tokenizer") / "tokenizer.json",
                      {(1, "train"): it[:-6], (2, "train"): code[:-1], (1, "val"): it[-6:] + code[-1:]})
    sources = [("it-msg", "it_messages.jsonl", "messages", "it"), ("en-pr", "en_prompt_response.jsonl",
                                                                    "prompt_response", "en")]
    lines = "".join(f"    - {{name: {n}, kind: local, path: {REPO / 'data' / 'sft_sample' / f}, format: {fmt}, "
                    f"lang: {lang}}}\n" for n, f, fmt, lang in sources)
    sft_cfg = root / "sft_data.yaml"
    sft_cfg.write_text(f"run: {{name: l, root: {run.root}, seed: 3}}\nsft_data:\n  block_size: {2 * SHORT}\n"
                       f"  overlong: truncate\n  heldout_fraction: 0.2\n  sources:\n{lines}")
    from dante import sft_data as sft

    ns = runpy.run_path(str(REPO / "6_build_sft.py"), run_name="build_sft")
    assert run_stage("06_sft_data", "stage 6", ns["main"], format_version=sft.FORMAT_VERSION,
                     argv=["--config", str(sft_cfg)]) == 0
    return {"root": root, "run": run, "vocab": tokenizer.get_vocab_size()}


def copy_inputs(inputs: dict, name: str) -> tuple[RunConfig, dict[str, Path]]:
    run = RunConfig(name="l", root=str(inputs["root"] / name), seed=3)
    shutil.copytree(Path(inputs["run"].root), run.root)
    return run, write_configs(run, Path(run.root), inputs["vocab"])


def launch_command(launcher: str, script: str) -> list[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), script]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", script]
    return [sys.executable, script]


def run_chain(inputs: dict, launcher: str) -> dict:
    """Stages 4, 5, 7 of one run folder through ``launcher`` (2 ranks x G, or python: 1 rank x 2G)."""
    run, configs = copy_inputs(inputs, launcher)
    ranks, accum = (1, 2 * G) if launcher == "python" else (2, G)
    seconds, outputs = {}, {}
    for script, stage, key in STAGES:
        cmd = launch_command(launcher, script) + ["--config", str(configs[key]), "--set",
                                                  f"train.expected_world_size={ranks}", "--set", f"train.grad_accum={accum}"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        seconds[stage] = round(time.time() - t0, 1)
        outputs[stage] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{launcher} {script} failed:\n{outputs[stage][-6000:]}"
    return {"run": run, "seconds": seconds, "output": outputs, "ranks": ranks}


@pytest.fixture(scope="module")
def chains(inputs) -> dict:
    """The three launches; the two launcher chains and the python chain run side by side."""
    t0 = time.time()
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run_chain, inputs, name) for name in ("deepspeed", "torchrun", "python")}
        out = {name: f.result() for name, f in futures.items()}
    out["wall_s"] = round(time.time() - t0, 1)
    print(f"\nlauncher chains: {out['wall_s']} s wall; per stage: "
          + "; ".join(f"{n} {out[n]['seconds']}" for n in ("deepspeed", "torchrun", "python")))
    return out


def curve(stage_path: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(stage_path)]


def max_rel_diff(a: list[tuple], b: list[tuple]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for u, v in zip(x[2:], y[2:]):
            if u is not None and v is not None:
                worst = max(worst, abs(u - v) / max(abs(v), 1e-30))
    return worst


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_ranks_through_the_launcher_equal_one_rank_with_double_accumulation(chains, launcher):
    two, one = chains[launcher], chains["python"]
    for _, stage, _ in STAGES:
        a, b = curve(stage_dir(two["run"], stage)), curve(stage_dir(one["run"], stage))
        assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) >= 3, (stage, a, b)
        assert all(r[2] is not None for r in a if r[0] == "train") and any(r[4] is not None for r in a), stage
        print(f"{launcher} {stage}: max relative difference to the 1-rank curve {max_rel_diff(a, b):.2e}")
        for x, y in zip(a, b):
            for u, v in zip(x[2:], y[2:]):
                assert (u is None and v is None) or u == pytest.approx(v, rel=RTOL), (stage, x, y)
        manifest = json.loads((stage_dir(two["run"], stage) / "manifest.json").read_text())
        ckpt = Path(manifest["outputs"]["checkpoint"])
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == manifest["counts"]["steps"], stage
        shards = list((ckpt / "train_state" / "deepspeed").glob("*optim_states.pt"))
        assert len(shards) == 2, (stage, shards)  # each rank saved its ZeRO partition into the one folder
        assert sorted(p.name for p in (ckpt / "train_state").glob("rng-rank*.safetensors")) == [
            "rng-rank0.safetensors", "rng-rank1.safetensors"]
        engine = manifest["training"] if stage == "04_pretrain" else manifest["engine"]  # TrainResult.extra
        assert engine["world_size"] == 2 and engine["precision"]["grad_accumulation"] == "fp32", stage
        assert engine["precision"]["grad_reduction"] == "fp32" and engine["precision"]["zero_stage"] == 1, stage
    out = two["output"]["04_pretrain"]
    assert out.count("[04_pretrain] done:") == 1 and out.count("precision: compute fp32") == 1  # rank 0 alone reports


# ---------------------------------------------------------------------------------------------------
# Ranks started by hand, as a launcher starts them: a per-rank run.root, a wrong world size
# ---------------------------------------------------------------------------------------------------


def start_ranks_by_hand(argv_of_rank, world_size: int = 2) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = [subprocess.Popen(argv_of_rank(r), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(world_size)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return results


def test_a_stage_folder_not_shared_by_all_ranks_is_refused(inputs):
    """Rank 1's run.root is another folder holding a copy of the inputs (and a stale 04_pretrain folder), as
    a node-local disk would: its marker is invisible to rank 0, and both ranks stop with the same error."""
    run0, configs = copy_inputs(inputs, "node0")
    run1, _ = copy_inputs(inputs, "node1")
    stage_dir(run1, "04_pretrain").mkdir(parents=True)
    roots = [run0.root, run1.root]
    results = start_ranks_by_hand(lambda r: [sys.executable, "4_pretrain.py", "--config", str(configs["pretrain"]),
                                             "--set", "train.expected_world_size=2", "--set", f"run.root={roots[r]}"])
    for r, res in enumerate(results):
        assert res.returncode == 2, (r, res.stdout[-3000:])
        assert "is not shared by all ranks" in res.stdout and "wrote a marker into its" in res.stdout, res.stdout[-3000:]
        assert "--set run.root=" in res.stdout
    for run in (run0, run1):
        folder = stage_dir(run, "04_pretrain")
        assert not (folder / "manifest.json").exists() and not (folder / "checkpoints").exists()
        assert not list(folder.glob(".rank-*")), list(folder.iterdir())  # markers cleaned up


@pytest.mark.parametrize("script,stage,key", STAGES)
def test_a_world_size_other_than_expected_is_refused_before_anything_is_written(inputs, script, stage, key):
    """The configs plan for 1 rank; 2 are started. The check runs before the stage folder is opened (so
    stages 5 and 7 refuse it even before looking for their input stages)."""
    run, configs = copy_inputs(inputs, f"ws-{key}")
    results = start_ranks_by_hand(lambda r: [sys.executable, script, "--config", str(configs[key])])
    for res in results:
        assert res.returncode == 2, res.stdout[-3000:]
        assert "started 2 rank(s) but train.expected_world_size=1" in res.stdout, res.stdout[-3000:]
        assert "--set train.expected_world_size=2" in res.stdout
    assert not stage_dir(run, stage).exists()


# ---------------------------------------------------------------------------------------------------
# Stage.open with several ranks: one decision, taken by rank 0, seen by all (--force cannot race)
# ---------------------------------------------------------------------------------------------------


def open_driver(spec: dict) -> dict:
    """One rank of the Stage.open scenarios (run as ``python tests/test_launchers.py '<json>'``)."""
    import torch.distributed as td

    from dante.artifacts import StageAlreadyDone
    from dante.config import PretrainStageConfig, TrainConfig
    from dante.errors import StageError

    td.init_process_group("gloo")
    out = {}
    for case, (name, force, lr) in spec["cases"].items():
        cfg = PretrainStageConfig(run=RunConfig(name="o", root=spec["root"]), train=TrainConfig(lr=lr))
        try:
            st = Stage.open(cfg, name, force=force)
            td.barrier()  # every rank looks at the folder only after every rank has opened it
            out[case] = {"resumed": st.resumed, "files": sorted(p.name for p in st.dir.iterdir()),
                         "state": st.load_progress()}
        except (StageAlreadyDone, StageError) as e:
            out[case] = {"error": type(e).__name__, "message": str(e)}
        td.barrier()
    td.destroy_process_group()
    return out


def test_several_ranks_open_a_stage_folder_as_one(tmp_path):
    """Complete -> every rank is done; --force on an unfinished run with work -> rank 0 resets it once and
    no rank resumes; an unfinished run -> every rank resumes; another config -> every rank refuses."""
    from dante.config import PretrainStageConfig, TrainConfig

    root = tmp_path / "runs"
    run = RunConfig(name="o", root=str(root))
    for name, lr, finish in (("04_pretrain", 3e-4, True), ("05_extend", 3e-4, False), ("07_sft", 3e-4, False)):
        st = Stage.open(PretrainStageConfig(run=run, train=TrainConfig(lr=lr)), name)
        (st.dir / "partial.bin").write_bytes(b"x")
        st.save_progress({"step": 5})
        if finish:
            st.finish()
    spec = {"root": str(root), "cases": {"done": ("04_pretrain", False, 3e-4), "force": ("05_extend", True, 3e-4),
                                         "resume": ("07_sft", False, 3e-4), "other_config": ("07_sft", False, 1e-3)}}
    release_all_stage_locks()  # this process opened 05/07 by hand; the ranks must be able to lock them
    results = start_ranks_by_hand(lambda r: [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)])
    outs = []
    for res in results:
        assert res.returncode == 0, res.stdout[-3000:]
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]  # the same outcome on both ranks, case by case
    o = outs[0]
    assert o["done"]["error"] == "StageAlreadyDone"
    assert o["force"] == {"resumed": False, "files": ["progress.json"], "state": {}}  # reset once, fresh
    assert o["resume"]["resumed"] is True and o["resume"]["state"] == {"step": 5} and "partial.bin" in o["resume"]["files"]
    assert o["other_config"]["error"] == "StageError" and "differs at: train.lr" in o["other_config"]["message"]


if __name__ == "__main__":
    print(json.dumps(open_driver(json.loads(sys.argv[1]))))
