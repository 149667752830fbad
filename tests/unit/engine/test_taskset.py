"""``EpisodeTaskset``: our episode samplers as a learn2learn-style task set (deterministic tasks, the trainer's
episodes, torch tensors, the ``sample`` / ``len`` / iteration interface), without learn2learn, and driving a
learn2learn MAML loop when it is installed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fewshot_proto.config import apply_overrides, default_config
from fewshot_proto.engine.taskset import EpisodeTaskset, SegTask, training_taskset


@pytest.fixture(scope="module")
def phantoms():
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import make_phantom_dataset

    return InMemoryDataset(make_phantom_dataset(n_scans=6, size=32, n_slices_range=(12, 12)), name="phantom-32")


def _cfg(**over):
    base = {"data.size": 32, "train.seed": 5, "episodes.mode": "mixed", "episodes.shots": 1, "protocol.shots": 1}
    base.update(over)
    return apply_overrides(default_config(), base)


def _equal(a: SegTask, b: SegTask) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_tasks_are_deterministic_typed_and_the_trainers_episodes(phantoms):
    from fewshot_proto.engine.episodic import build_training_sampler
    from fewshot_proto.engine.stream import EpisodeSource, episode_to_tensors
    from fewshot_proto.episodes.protocol import fold_split

    cfg = _cfg()
    tasks = training_taskset(cfg, num_tasks=6, dataset=phantoms)
    assert len(tasks) == 6 and tasks.seed == 5
    t2 = tasks[2]
    assert isinstance(t2, SegTask)
    s_img, s_mask, q_img, q_mask = t2
    assert s_img.shape == (1, 3, 32, 32) and q_img.shape == (1, 3, 32, 32)
    assert s_mask.shape == (1, 32, 32) and q_mask.shape == (1, 32, 32)
    assert (s_img.dtype, s_mask.dtype, q_img.dtype, q_mask.dtype) == (torch.float32,) * 3 + (torch.int64,)
    assert set(torch.unique(s_mask).tolist()) <= {0.0, 1.0} and set(torch.unique(q_mask).tolist()) <= {0, 1}
    assert _equal(tasks[2], t2) and _equal(tasks[-4], t2)  # same task whatever happened in between
    tasks[0], tasks.sample()
    assert _equal(tasks[2], t2)
    assert not _equal(tasks[3], t2)

    # task i is the trainer's episode of step i (same sampler, same seed, rank 0)
    index = phantoms.slice_index()
    split = fold_split(index, cfg.protocol.fold, cfg.protocol.n_folds, cfg.protocol.shots)
    source = EpisodeSource(build_training_sampler(cfg, phantoms, index, list(split.train_scans)), seed=5)
    ref = episode_to_tensors(source.episode(2), torch.device("cpu"), channels_last=False)
    assert _equal(SegTask(*ref), t2)


def test_len_iteration_sample_and_index_errors(phantoms):
    tasks = training_taskset(_cfg(), num_tasks=3, dataset=phantoms)
    listed = list(tasks)
    assert len(listed) == 3 and all(_equal(a, tasks[i]) for i, a in enumerate(listed))
    drawn = [tasks.sample() for _ in range(6)]
    assert all(any(_equal(d, t) for t in listed) for d in drawn)  # sample() picks one of the num_tasks
    again = training_taskset(_cfg(), num_tasks=3, dataset=phantoms)
    assert all(_equal(a, b) for a, b in zip(drawn, [again.sample() for _ in range(6)]))  # seeded, not `random`
    with pytest.raises(IndexError, match="out of range"):
        tasks[3]
    with pytest.raises(IndexError):
        tasks[-4]
    with pytest.raises(TypeError, match="integer"):
        tasks["1"]


def test_endless_taskset_streams_fresh_tasks(phantoms):
    tasks = training_taskset(_cfg(), num_tasks=-1, dataset=phantoms)
    assert len(tasks) == 1  # learn2learn's convention for an endless set
    a, b = tasks.sample(), tasks.sample()
    assert _equal(a, tasks[0]) and _equal(b, tasks[1]) and not _equal(a, b)
    assert _equal(tasks[1000], tasks[1000])
    it = iter(tasks)
    assert [_equal(next(it), tasks[i]) for i in range(3)] == [True] * 3
    with pytest.raises(IndexError, match="endless"):
        tasks[-1]


def test_seed_changes_tasks_and_bad_arguments_raise(phantoms):
    a = training_taskset(_cfg(), num_tasks=2, dataset=phantoms)
    b = training_taskset(_cfg(**{"train.seed": 6}), num_tasks=2, dataset=phantoms)
    assert not _equal(a[0], b[0])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_tasks"):
            EpisodeTaskset(a.sampler, num_tasks=bad)
    with pytest.raises(ValueError, match="seed"):
        EpisodeTaskset(a.sampler, num_tasks=2, seed=-1)
    with pytest.raises(ValueError, match="sample"):
        EpisodeTaskset(object(), num_tasks=2)


def test_works_with_a_dataloader(phantoms):
    from torch.utils.data import DataLoader

    tasks = training_taskset(_cfg(), num_tasks=3, dataset=phantoms)
    got = list(DataLoader(tasks, batch_size=None, shuffle=False, num_workers=0))
    assert len(got) == 3 and all(_equal(SegTask(*g), tasks[i]) for i, g in enumerate(got))


def test_module_imports_without_learn2learn():
    code = ("import sys; sys.modules['learn2learn'] = None\n"
            "import fewshot_proto.engine.taskset as t\n"
            "print(t.EpisodeTaskset.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "EpisodeTaskset", r.stderr


def test_drives_a_learn2learn_maml_loop(phantoms):
    """The module docstring's recipe: a learn2learn MAML learner meta-trained on our tasks."""
    l2l = pytest.importorskip("learn2learn")
    from fewshot_proto.models import build_model

    torch.manual_seed(0)
    net = build_model("unet", base_channels=4, norm="none")
    maml = l2l.algorithms.MAML(net, lr=0.01, first_order=True)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in maml.parameters()]
    tasks = training_taskset(_cfg(), num_tasks=4, dataset=phantoms)
    losses = []
    for X_s, y_s, X_q, y_q in tasks:
        learner = maml.clone()
        learner.adapt(torch.nn.functional.cross_entropy(learner.module.segment_image(X_s), (y_s > 0.5).long()))
        loss = torch.nn.functional.cross_entropy(learner.module.segment_image(X_q), y_q)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, maml.parameters()))
