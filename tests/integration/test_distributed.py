"""Scale-out: ``torchrun --nproc_per_node=2`` trains with DistributedDataParallel (gloo on CPU, loopback).

Two ranks train a tiny model for a few steps. Checked:

* the ranks end with the same parameters, bit for bit (DDP averages the gradients; every rank applies the same
  update). BatchNorm running statistics are *not* compared: DDP broadcasts buffers from rank 0 at the start of
  each forward, so after the last step each rank holds the statistics of its own last episode. Rank 0's are
  the ones in the checkpoint;
* the ranks drew different episodes at every step (``EpisodeSource`` seeds each step with ``(seed, rank, i)``);
* only rank 0 writes the checkpoint and the CSV log;
* the real CLI (``torchrun -m fewshot_proto.train``) runs end to end and exits 0.

Each launch starts two Python processes that import torch, so each test takes ~15-30 s on a 2-core machine.
"""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fewshot_proto.config import apply_overrides, default_config, save_config

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = textwrap.dedent('''
    """One rank: join the group, train, save this rank's weights and the inputs of every step."""
    import sys

    import torch
    import torch.distributed as dist

    from fewshot_proto.config import load_config
    from fewshot_proto.engine import episodic, train
    from fewshot_proto.train import init_distributed

    cfg_path, out = sys.argv[1], sys.argv[2]
    seen = []
    initial = {}
    real = episodic.episode_losses

    def recording(model, s_img, s_mask, q_img, q_mask, **kw):
        if not initial:  # the weights before the first update
            core = model.module if hasattr(model, "module") else model
            initial.update({k: v.detach().clone() for k, v in core.named_parameters()})
        # a fingerprint of the episode this rank trains on at this step
        seen.append([float(s_img.double().sum()), float(s_mask.double().sum()), float(q_img.double().sum())])
        return real(model, s_img, s_mask, q_img, q_mask, **kw)

    episodic.episode_losses = recording
    cfg = load_config(cfg_path)
    rank, world = init_distributed(cfg.train.device)
    cfg.train.out = f"{out}/rank{rank}"  # one folder per rank: shows which rank wrote what
    res = train(cfg, progress=False, rank=rank, world_size=world)
    torch.save({"rank": rank, "world": world, "steps": res.steps, "losses": res.losses, "seen": seen,
                "initial": initial,
                "params": {k: v.detach().clone() for k, v in res.model.named_parameters()},
                "buffers": {k: v.detach().clone() for k, v in res.model.named_buffers()}},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_config(path: Path, out: Path, iters: int) -> Path:
    cfg = apply_overrides(default_config(), {
        "data.size": 32, "train.iters": iters, "train.out": str(out), "train.device": "cpu", "train.threads": 1,
        "train.prefetch": 1, "train.ckpt_every": 0, "train.log_every": 1, "train.seed": 5,
        "train.precision": "fp32", "train.num_workers": 0})
    save_config(cfg, path)
    return path


def _torchrun(args, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n" \
                                 f"stderr:\n{proc.stderr[-5000:]}"
    return proc


def test_two_ranks_agree_on_weights_and_draw_different_episodes(tmp_path, phantom_cache):
    steps = 3
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    cfg = _tiny_config(tmp_path / "cfg.yaml", tmp_path / "unused", steps)
    _torchrun([str(script), str(cfg), str(tmp_path)], cwd=tmp_path)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == steps

    # same weights, bit for bit
    assert r0["params"].keys() == r1["params"].keys() and len(r0["params"]) > 0
    differ = [k for k in r0["params"] if not torch.equal(r0["params"][k], r1["params"][k])]
    assert not differ, f"parameters differ between ranks: {differ[:5]}"
    # only BatchNorm running statistics may differ (see the module docstring); counters agree
    buf_differ = {k.rsplit(".", 1)[-1] for k in r0["buffers"] if not torch.equal(r0["buffers"][k], r1["buffers"][k])}
    assert buf_differ <= {"running_mean", "running_var"}, buf_differ

    # both ranks started from the same weights, and training moved them
    assert r0["initial"].keys() == r0["params"].keys()
    assert all(torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    assert any(not torch.equal(r0["initial"][k], r0["params"][k]) for k in r0["params"])

    # different episodes on every step, and therefore different losses
    assert len(r0["seen"]) == len(r1["seen"]) == steps
    for i, (a, b) in enumerate(zip(r0["seen"], r1["seen"])):
        assert a != b, f"both ranks trained on the same episode at step {i}: {a}"
    assert r0["losses"] != r1["losses"]

    # rank 0 alone writes the checkpoint and the log; the checkpoint holds rank 0's (= every rank's) weights
    assert (tmp_path / "rank0" / "checkpoint.pt").is_file()
    assert not (tmp_path / "rank1" / "checkpoint.pt").exists()
    assert not (tmp_path / "rank1" / "train_log.csv").exists()
    ck = torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == steps
    for k, v in r0["params"].items():
        assert torch.equal(ck["model"][k], v), k


def test_torchrun_cli_trains_and_writes_one_checkpoint(tmp_path, phantom_cache):
    out = tmp_path / "run"
    cfg = _tiny_config(tmp_path / "cfg.yaml", out, iters=2)
    proc = _torchrun(["-m", "fewshot_proto.train", "--config", str(cfg), "--iters", "2", "--no-eval",
                      "--no-progress", "--out", str(out)], cwd=tmp_path)
    assert "2 ranks" in proc.stdout
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]  # one writer: rank 0
