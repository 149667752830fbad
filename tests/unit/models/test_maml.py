"""First-order MAML on the U-Net (``maml_unet``): optional learn2learn with an actionable error, registry and
config, shapes, the first-order meta-gradient reaching the base (one step changes it, the loss on a fixed episode
falls), the base bit-identical after adaptation under ``inference_mode`` and after the evaluator, caching,
normalisation options, and one run of the trainer + checkpoint round trip."""
from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict

import numpy as np
import pytest
import torch

from fewshot_proto.engine.episodic import episode_losses
from fewshot_proto.models import MODELS, build_model, list_models
from fewshot_proto.models.fsbaselines import Adapted, AdaptingSegmenter, MAMLSegmenter

SMALL: Dict[str, Any] = {"base_channels": 4, "inner_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _episode(s: int, q: int, size: int = 32, seed: int = 0):
    """Bright disks on noise; the mask is the disk (a different position per slice)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def make(n):
        imgs, masks = [], []
        for _ in range(n):
            cy, cx = (torch.randint(size // 4, 3 * size // 4, (2,), generator=g)).tolist()
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size // 5) ** 2).float()
            imgs.append((m + 0.3 * torch.randn(size, size, generator=g)).expand(3, size, size))
            masks.append(m)
        return torch.stack(imgs), torch.stack(masks)

    s_img, s_mask = make(s)
    q_img, q_mask = make(q)
    return s_img, s_mask, q_img, q_mask.long()


def _state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- optional dependency --------------------------------------------------------------------------------------
def test_without_learn2learn_models_import_and_building_names_the_recipe():
    """A fresh interpreter where ``import learn2learn`` fails: the registry works, building raises the recipe."""
    code = (
        "import sys; sys.modules['learn2learn'] = None\n"
        "from fewshot_proto.models import build_model, list_models\n"
        "assert 'maml_unet' in list_models()\n"
        "from fewshot_proto.models.fsbaselines import Learn2LearnMissing\n"
        "try:\n"
        "    build_model('maml_unet')\n"
        "except ImportError as e:\n"
        "    assert isinstance(e, Learn2LearnMissing)\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "pip install cython wheel gym requests" in r.stdout
    assert ("pip install --no-deps --no-build-isolation --use-pep517 --no-cache-dir "
            "--config-settings=--global-option=build_ext learn2learn==0.2.0") in r.stdout
    assert "learn2learn" not in r.stderr  # nothing imported it behind our back


def test_missing_learn2learn_error_in_process(monkeypatch):
    from fewshot_proto.errors import FewShotError
    from fewshot_proto.models.fsbaselines.maml import INSTALL_RECIPE, Learn2LearnMissing, import_learn2learn

    monkeypatch.setitem(sys.modules, "learn2learn", None)
    with pytest.raises(Learn2LearnMissing) as info:
        build_model("maml_unet", **SMALL)
    assert isinstance(info.value, ImportError) and isinstance(info.value, FewShotError)  # the CLIs report it
    assert INSTALL_RECIPE in str(info.value) and "maml_unet" in str(info.value)
    with pytest.raises(ImportError):
        import_learn2learn()


# ---- everything below needs learn2learn (the ``l2l`` fixture skips without it; CI installs it) ----------------
@pytest.fixture
def l2l():
    return pytest.importorskip("learn2learn")


@pytest.fixture
def model(l2l):
    torch.manual_seed(0)
    return build_model("maml_unet", **SMALL)


def test_registered_with_kind_config_and_learn2learn_wrapper(l2l, model):
    assert "maml_unet" in list_models() and MODELS.get("maml_unet") is MAMLSegmenter
    assert isinstance(model, MAMLSegmenter) and model.kind == "fewshot" and model.feature_losses is False
    assert isinstance(model, AdaptingSegmenter) and model.needs_support is True
    assert isinstance(model.maml, l2l.algorithms.MAML) and model.maml.first_order is True
    assert model.maml.lr == model.inner_lr == 0.1
    assert model.config == {"in_channels": 3, "base_channels": 4, "depth": 4, "norm": "instance",
                            "out_mode": "softmax", "inner_steps": 2, "inner_lr": 0.1, "loss": "dice_bce",
                            "first_order": True, "cache_support": True, "cache_size": 8}
    rebuilt = build_model("maml_unet", **model.config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # same keys and shapes
    # not a supervised model: no support-free segmentation (the support matters)
    assert not any(hasattr(model, m) for m in ("segment_image", "to_binary"))


def test_step_api_adapts_on_the_support_image_and_matches_forward(model):
    """``encode`` is the image, ``prototypes`` the clone adapted on the support, ``segment`` that clone on the
    query: the steps (what the evaluator calls) give the logits of ``forward``."""
    s_img, s_mask, q_img, _ = _episode(2, 2)
    model.eval()
    with torch.no_grad():
        ref = model(s_img, s_mask, q_img).logits
        feats = model.encode(s_img)
        assert len(feats) == 1 and torch.equal(feats[0], s_img)
        adapted = model.prototypes(feats, s_mask)
        assert isinstance(adapted, Adapted) and torch.equal(adapted.support_img, s_img)
        assert torch.equal(adapted.support_mask, s_mask)
        fast = model.segment(model.encode(q_img), adapted)
        assert torch.equal(fast, ref)
        prob = model.predict(model.encode_query(q_img), model.encode_support(s_img, s_mask, class_id=1))
        assert torch.allclose(prob, torch.softmax(ref, dim=1)[:, 1], atol=1e-6)
        with pytest.raises(ValueError, match="Adapted"):
            model.segment([q_img], s_mask)


def test_default_norm_is_per_slice_and_keeps_no_buffers(model):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 18 and all(m.affine and not m.track_running_stats for m in norms)  # one per 3x3 conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert list(model.buffers()) == []
    plain = build_model("maml_unet", norm="none", **SMALL)
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)) for m in plain.modules())
    batch = build_model("maml_unet", norm="batch", **SMALL)
    bns = [m for m in batch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 18 and all(m.running_mean is None and not m.track_running_stats for m in bns)


@pytest.mark.parametrize("kwargs, match", [
    ({"inner_steps": -1}, "inner_steps"), ({"inner_steps": 1.5}, "inner_steps"), ({"inner_lr": 0}, "inner_lr"),
    ({"loss": "focal"}, "loss"), ({"norm": "group"}, "norm"), ({"out_mode": "tanh"}, "out_mode"),
    ({"base_channels": 0}, "base_channels"),
])
def test_bad_arguments_raise(l2l, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("maml_unet", **{**SMALL, **kwargs})


def test_bad_episodes_raise(model):
    s_img, s_mask, q_img, _ = _episode(1, 1)
    with pytest.raises(ValueError, match="support_mask"):
        model(s_img, s_mask[:, :16], q_img)
    with pytest.raises(ValueError, match="differ"):
        model(s_img, s_mask, q_img[:, :1])
    with pytest.raises(ValueError, match="multiple of the network's total stride 16"):
        model(s_img[..., :24, :24], s_mask[..., :24, :24], q_img[..., :24, :24])


@pytest.mark.parametrize("shots", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_shapes(model, shots, train):
    s_img, s_mask, q_img, _ = _episode(shots, 3)
    model.train(train)
    out = model(s_img, s_mask, q_img)
    assert out.logits.shape == (3, 2, 32, 32)
    assert out.support_feats is None and out.query_feats is None and out.prototypes is None
    assert torch.isfinite(out.logits).all()
    assert out.logits.requires_grad  # grad mode on: the logits hang on the base weights


# ---- meta-training --------------------------------------------------------------------------------------------
def test_query_loss_gives_the_base_the_first_order_meta_gradient(model):
    """FOMAML: d(query loss)/d(base) equals d(query loss)/d(adapted weights), for every parameter."""
    s_img, s_mask, q_img, q_mask = _episode(1, 1)
    model.train()
    learner = model.adapt(s_img, s_mask)
    adapted = list(learner.module.parameters())
    base = list(model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(adapted, base))  # the inner steps moved every tensor
    loss = torch.nn.functional.cross_entropy(learner.module.segment_image(q_img), q_mask)
    g_adapted = torch.autograd.grad(loss, adapted, retain_graph=True)
    loss.backward()
    for p, g in zip(base, g_adapted):
        assert p.grad is not None and torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)
    assert sum(float(p.grad.abs().sum()) for p in base) > 0


def test_second_order_gradient_differs_from_first_order(l2l):
    s_img, s_mask, q_img, q_mask = _episode(1, 1)
    grads = {}
    for fo in (True, False):
        torch.manual_seed(0)
        m = build_model("maml_unet", first_order=fo, **SMALL).train()
        episode_losses(m, s_img, s_mask, q_img, q_mask, lambda_align=1.0, lambda_cyc=1.0)["loss"].backward()
        grads[fo] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert torch.isfinite(grads[False]).all()
    assert not torch.allclose(grads[True], grads[False])


def test_one_optimiser_step_changes_the_base_and_loss_falls_on_a_fixed_episode(l2l):
    torch.manual_seed(0)
    model = build_model("maml_unet", base_channels=8, inner_steps=3).train()
    s_img, s_mask, q_img, q_mask = _episode(1, 1, size=32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    before = _state(model)
    losses = []
    for step in range(20):
        terms = episode_losses(model, s_img, s_mask, q_img, q_mask, lambda_align=1.0, lambda_cyc=1.0,
                               ce_weights=[0.1, 1.0])
        assert set(terms) == {"ce", "loss"}
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
        if step == 0:
            after = model.state_dict()
            assert all(not torch.equal(before[k], after[k]) for k in before)  # every base tensor moved
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses


# ---- evaluation: the base never changes -----------------------------------------------------------------------
def test_inference_mode_adapts_a_detached_clone_and_never_touches_the_base(model):
    s_img, s_mask, q_img, _ = _episode(2, 2)
    model.eval()
    before = _state(model)
    with torch.inference_mode():
        out_inf = model(s_img, s_mask, q_img).logits
    _assert_same_state(before, model.state_dict())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model._cache.clear()
        out_ng = model(s_img, s_mask, q_img).logits
    assert torch.equal(out_inf, out_ng)  # deterministic, same path
    with torch.no_grad():
        no_adapt = build_model("maml_unet", **{**SMALL, "inner_steps": 0})
        no_adapt.load_state_dict(model.state_dict())
        out0 = no_adapt.eval()(s_img, s_mask, q_img).logits
    assert (out_inf - out0).abs().max() > 1e-4  # the adaptation did change the prediction
    _assert_same_state(before, model.state_dict())


def test_inner_steps_lower_the_support_loss(model):
    s_img, s_mask, _, _ = _episode(1, 1)
    model.eval()
    m = (s_mask > 0.5).long()
    with torch.no_grad():
        before = float(model._inner_loss(model.base.segment_image(s_img), m))
        learner = model.adapt(s_img, s_mask)
        after = float(model._inner_loss(learner.module.segment_image(s_img), m))
    assert after < before


def test_eval_caches_recent_supports_and_training_drops_them(model):
    s_img, s_mask, q_img, _ = _episode(1, 4)
    model.eval()
    with torch.inference_mode():
        a = model(s_img, s_mask, q_img[:2]).logits
        b = model(s_img, s_mask, q_img[2:]).logits
        assert model.adaptations == 1
        full = model(s_img, s_mask, q_img).logits
        assert model.adaptations == 1
        assert torch.allclose(torch.cat([a, b]), full, atol=1e-5)  # per-slice norm: batch-independent
        model(s_img, 1 - s_mask, q_img[:1])
        assert model.adaptations == 2  # another support set
        model(s_img, s_mask, q_img[:1])
        assert model.adaptations == 2  # the first support set is still cached (LRU of cache_size entries)
    with torch.no_grad():
        p = next(model.parameters())
        p.add_(0.0)  # a weight update (version counter) invalidates the cached clone
        model(s_img, 1 - s_mask, q_img[:1])
    assert model.adaptations == 3
    model.train()
    assert len(model._cache) == 0


def test_evaluator_leaves_the_base_bit_identical(l2l):
    from fewshot_proto.config import ProtocolConfig
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import make_phantom_dataset
    from fewshot_proto.engine import evaluate
    from fewshot_proto.engine.evaluator import protocol_specs

    ds = InMemoryDataset(make_phantom_dataset(n_scans=5, size=32, n_slices_range=(12, 12)), name="phantom-32")
    specs = protocol_specs(ds, ProtocolConfig(name="alpnet", test_classes=[2, 3], fold=0, shots=1))[:2]
    torch.manual_seed(0)
    model = build_model("maml_unet", **SMALL)
    before = _state(model)
    summary = evaluate(model, ds, specs, size=32, distances=False, batch_size=4)
    assert len(summary["rows"]) == 2 and np.isfinite(summary["mean_dice"])
    assert model.adaptations >= 1
    _assert_same_state(before, model.state_dict())
    assert all(p.grad is None for p in model.parameters())


# ---- the trainer, unchanged, meta-trains it; checkpoints rebuild it --------------------------------------------
def test_trainer_meta_trains_and_checkpoint_round_trips(l2l, tmp_path):
    from fewshot_proto.config import apply_overrides, default_config
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import make_phantom_dataset
    from fewshot_proto.engine import train
    from fewshot_proto.engine.checkpoint import model_from_checkpoint

    ds = InMemoryDataset(make_phantom_dataset(n_scans=6, size=32, n_slices_range=(12, 12)), name="phantom-32")
    cfg = apply_overrides(default_config(), {
        "data.size": 32, "train.out": str(tmp_path), "train.iters": 4, "train.ckpt_every": 0, "train.prefetch": 0,
        "train.device": "cpu", "train.seed": 1, "train.warmup_iters": 0, "train.precision": "fp32",
        "train.num_workers": 0,
        "model.name": "maml_unet",
        "model.kwargs": dict(SMALL)})
    torch.manual_seed(cfg.train.seed)
    init = _state(build_model("maml_unet", **SMALL))
    res = train(cfg, progress=False, dataset=ds)
    assert res.steps == 4 and np.isfinite(res.losses).all()
    trained = res.model.state_dict()
    assert all(not torch.equal(init[k], trained[k]) for k in init)  # meta-training moved the base
    rebuilt, ckpt = model_from_checkpoint(res.checkpoint)
    assert ckpt["model_name"] == "maml_unet" and rebuilt.config == res.model.config
    _assert_same_state({k: v.contiguous() for k, v in trained.items()},
                       {k: v.contiguous() for k, v in rebuilt.state_dict().items()})
    s_img, s_mask, q_img, _ = _episode(1, 1)
    res.model.eval().to(memory_format=torch.contiguous_format)  # the trainer made it channels_last
    with torch.inference_mode():
        assert torch.allclose(res.model(s_img, s_mask, q_img).logits, rebuilt.eval()(s_img, s_mask, q_img).logits,
                              atol=1e-5)
