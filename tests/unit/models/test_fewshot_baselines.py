"""PANet, ALPNet and fine-tune-on-support: registry/config, parameter counts, shapes for 1 and 5 shots, gradients,
hand-made prototype and score checks with known answers, empty masks, determinism, the evaluator's step API, the
engine's losses (alignment, cyclic, one ``episode_losses`` pass for every registered model), and the fine-tune
baseline's guarantees (base weights bit-identical, works under ``torch.inference_mode``, deterministic, cached)."""
from __future__ import annotations

import math
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F

from fewshot_proto import losses
from fewshot_proto.engine.checkpoint import save_checkpoint
from fewshot_proto.engine.episodic import episode_losses
from fewshot_proto.errors import CheckpointError
from fewshot_proto.losses import alignment_loss, cyclic_consistency_loss
from fewshot_proto.models import build_model, list_models
from fewshot_proto.models.fsbaselines import ALPNet, FineTuneOnSupport, PANet, adaptation_loss
from fewshot_proto.models.heads.alp import alpnet_prototypes, local_prototypes, mask_fraction, panet_prototypes
from fewshot_proto.models.heads.scores import ClassPrototypes, class_score
from fewshot_proto.types import SegOutput

# torchvision ResNet-34 without fc; ALPNet adds the bias-free 1x1 projection 512 -> 256.
ENCODER_PARAMS = 21_284_672
ALPNET_PARAMS = ENCODER_PARAMS + 512 * 256
# A narrow U-Net base keeps the fine-tune tests fast (BN on, so running statistics are checked too).
SMALL_UNET: Dict[str, Any] = {"base_channels": 4, "norm": "batch"}
FT_SMALL: Dict[str, Any] = {"base": "unet", "base_kwargs": SMALL_UNET, "steps": 3, "lr": 1e-2}


def _episode(s: int, q: int, size: int = 64, seed: int = 0):
    """Bright squares on noise; the mask is the square (a different position per slice)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        imgs, masks = [], []
        for _ in range(n):
            y, x = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
            m = torch.zeros(size, size)
            m[y:y + size // 2, x:x + size // 2] = 1.0
            img = 0.3 * torch.randn(size, size, generator=g) + m
            imgs.append(img.expand(3, size, size))
            masks.append(m)
        return torch.stack(imgs), torch.stack(masks)

    s_img, s_mask = make(s)
    q_img, q_mask = make(q)
    return s_img, s_mask, q_img, q_mask.long()


@pytest.fixture(scope="module")
def panet() -> PANet:
    torch.manual_seed(0)
    return build_model("panet")


@pytest.fixture(scope="module")
def alpnet() -> ALPNet:
    torch.manual_seed(0)
    return build_model("alpnet")


@pytest.fixture
def proto_models(panet, alpnet):
    return {"panet": panet, "alpnet": alpnet}


def _state_copy(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- registry, config, parameters ----------------------------------------------------------------------------
def test_registered_with_kind_and_config(panet, alpnet):
    names = list_models()
    assert {"panet", "alpnet", "finetune"} <= set(names)
    assert isinstance(panet, PANet) and panet.kind == "fewshot"
    assert isinstance(alpnet, ALPNet) and alpnet.kind == "fewshot"
    assert panet.config == {"encoder": "resnet34", "weights": None, "in_channels": 3, "proj_dim": None, "scaler": 20.0}
    assert alpnet.config == {
        "encoder": "resnet34", "weights": None, "in_channels": 3, "proj_dim": 256, "scaler": 20.0,
        "window": 2, "eval_window": 1, "fg_thresh": 0.95, "bg_thresh": 0.95,
    }
    ft = build_model("finetune", **FT_SMALL)
    assert isinstance(ft, FineTuneOnSupport) and ft.kind == "fewshot" and ft.feature_losses is False
    assert panet.feature_losses is True and alpnet.feature_losses is True
    assert ft.config["base"] == "unet" and ft.config["checkpoint"] is None
    assert ft.config["base_kwargs"] == build_model("unet", **SMALL_UNET).config
    rebuilt = build_model("finetune", **ft.config)
    assert rebuilt.config == ft.config


def test_parameter_counts(panet, alpnet):
    assert sum(p.numel() for p in panet.parameters()) == ENCODER_PARAMS
    assert sum(p.numel() for p in alpnet.parameters()) == ALPNET_PARAMS == 21_415_744
    assert sum(p.numel() for p in build_model("panet", proj_dim=64).parameters()) == ENCODER_PARAMS + 512 * 64
    ft = build_model("finetune", **FT_SMALL)
    base = build_model("unet", **SMALL_UNET)
    assert sum(p.numel() for p in ft.parameters()) == sum(p.numel() for p in base.parameters())
    assert [n for n, _ in ft.named_parameters()] == ["base." + n for n, _ in base.named_parameters()]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="proj_dim"):
        build_model("panet", proj_dim=0)
    with pytest.raises(ValueError, match="scaler"):
        build_model("panet", scaler=-1.0)
    with pytest.raises(ValueError, match="window"):
        build_model("alpnet", window=0)
    with pytest.raises(ValueError, match="fg_thresh"):
        build_model("alpnet", fg_thresh=1.5)
    with pytest.raises(ValueError, match="loss"):
        build_model("finetune", **dict(FT_SMALL, loss="focal"))
    with pytest.raises(ValueError, match="lr"):
        build_model("finetune", **dict(FT_SMALL, lr=0.0))
    with pytest.raises(ValueError, match="steps"):
        build_model("finetune", **dict(FT_SMALL, steps=-1))
    with pytest.raises(ValueError, match="base"):
        build_model("finetune", base="finetune")
    with pytest.raises(KeyError, match="valid names"):
        build_model("finetune", base="no_such_model")


# ---- shapes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["panet", "alpnet"])
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("train", [True, False])
def test_prototype_model_shapes(proto_models, name, shots, train):
    model = proto_models[name].train(train)
    s_img, s_mask, q_img, _ = _episode(shots, 2, 64)
    with torch.no_grad():
        out = model(s_img, s_mask, q_img)
    d = model.feature_dim
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 2, 64, 64) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert len(out.query_feats) == len(out.support_feats) == 1  # the projected bottleneck only
    assert out.query_feats[-1].shape == (2, d, 4, 4)
    assert out.support_feats[-1].shape == (shots, d, 4, 4)
    protos = out.prototypes
    assert isinstance(protos, ClassPrototypes)
    n_bg, n_fg = protos.counts
    assert n_bg >= 1 and n_fg >= 1 and protos.bg.shape == (n_bg, d) and protos.fg.shape == (n_fg, d)
    if name == "panet":
        assert protos.counts == (1, 1)
    with torch.no_grad():  # the bundle is what ``prototypes`` gives for the support features
        again = model.prototypes(out.support_feats, s_mask)
    assert torch.equal(again.bg, protos.bg) and torch.equal(again.fg, protos.fg)


def test_prototype_model_shape_at_128_and_size_check(panet):
    s_img, s_mask, q_img, _ = _episode(1, 1, 128)
    panet.eval()
    with torch.no_grad():
        assert panet(s_img, s_mask, q_img).logits.shape == (1, 2, 128, 128)
        with pytest.raises(ValueError, match="multiples of 16"):
            panet(s_img[..., :72, :72], s_mask[..., :72, :72], q_img[..., :72, :72])
        with pytest.raises(ValueError, match="support_mask"):
            panet(s_img, s_mask[:, :64], q_img)
        with pytest.raises(ValueError, match="differ"):
            panet(s_img, s_mask, q_img[..., :64, :64])


@pytest.mark.parametrize("shots", [1, 5])
def test_finetune_shapes(shots):
    torch.manual_seed(0)
    model = build_model("finetune", **FT_SMALL).eval()
    s_img, s_mask, q_img, _ = _episode(shots, 3, 64)
    with torch.no_grad():
        out = model(s_img, s_mask, q_img)
    assert out.logits.shape == (3, 2, 64, 64)
    assert out.support_feats is None and out.query_feats is None and out.prototypes is None
    assert torch.isfinite(out.logits).all()


# ---- hand-made prototype / cosine checks ---------------------------------------------------------------------
def _onehot_feat(pattern):
    """``pattern[h][w]`` channel indices -> one-hot features ``[1, D=4, h, w]``."""
    idx = torch.tensor(pattern)
    return F.one_hot(idx, 4).permute(2, 0, 1).float().unsqueeze(0)


def test_panet_prototypes_and_scores_on_onehot_features():
    # 2x2 features: e0 at the top row (foreground), e1 bottom-left, e2 bottom-right; mask at feature resolution
    feat = _onehot_feat([[0, 0], [1, 2]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    p = panet_prototypes(feat, mask)
    assert torch.allclose(p.fg, torch.tensor([[1.0, 0, 0, 0]]), atol=1e-4)
    assert torch.allclose(p.bg, torch.tensor([[0, 0.5, 0.5, 0]]), atol=1e-4)
    # query: e0, e1, e3, 0 -> fg 20*cos = 20, 0, 0, 0; bg 20*cos = 0, 20/sqrt2, 0, 0
    q = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[3], torch.zeros(4)]).T.reshape(1, 4, 2, 2)
    fg = class_score(q, p.fg)
    bg = class_score(q, p.bg)
    assert torch.allclose(fg, torch.tensor([[[20.0, 0.0], [0.0, 0.0]]]), atol=1e-3)
    assert torch.allclose(bg, torch.tensor([[[0.0, 20 / math.sqrt(2)], [0.0, 0.0]]]), atol=1e-3)


def test_panet_k_shot_averages_per_shot_prototypes():
    feat = torch.cat([_onehot_feat([[0, 0], [3, 3]]), _onehot_feat([[1, 3], [3, 3]])])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    p = panet_prototypes(feat, mask)
    # per-shot fg: e0 and e1 (the shot sizes do not matter: PANet averages the shot prototypes)
    assert torch.allclose(p.fg, torch.tensor([[0.5, 0.5, 0.0, 0.0]]), atol=1e-4)
    assert torch.allclose(p.bg, torch.tensor([[0.0, 0.0, 0.0, 1.0]]), atol=1e-4)


def test_panet_prototypes_upsample_features_to_the_mask():
    # a constant feature map pools to that constant under any mask; a mask at 4x the feature size works
    feat = torch.randn(1, 8, 1, 1).expand(1, 8, 2, 2).contiguous()
    mask = torch.zeros(1, 8, 8)
    mask[0, 1:3, 5:8] = 1.0
    p = panet_prototypes(feat, mask)
    assert torch.allclose(p.fg[0], feat[0, :, 0, 0], atol=1e-4)
    assert torch.allclose(p.bg[0], feat[0, :, 0, 0], atol=1e-4)


def test_class_score_soft_maximum_over_prototypes():
    q = torch.eye(4)[0].reshape(1, 4, 1, 1)
    protos = torch.stack([torch.eye(4)[0], torch.eye(4)[1]])  # cos = 1 and 0 -> d = 20, 0
    expected = 20 * math.exp(20) / (math.exp(20) + 1)
    assert class_score(q, protos).item() == pytest.approx(expected, rel=1e-6)
    # three prototypes at cos 1, 1/sqrt2, 0: d = 20, 20/sqrt2, 0
    protos3 = torch.stack([torch.eye(4)[0], torch.eye(4)[0] + torch.eye(4)[2], torch.eye(4)[1]])
    d = torch.tensor([20.0, 20 / math.sqrt(2), 0.0])
    assert class_score(q, protos3).item() == pytest.approx(float((torch.softmax(d, 0) * d).sum()), rel=1e-5)
    # one prototype: PANet's 20 * cos; a zero prototype scores 0, never NaN
    assert class_score(q, protos[1:2]).item() == pytest.approx(0.0, abs=1e-6)
    assert class_score(q, torch.zeros(1, 4)).item() == 0.0
    with pytest.raises(ValueError, match="at least one prototype"):
        class_score(q, torch.zeros(0, 4))


def _alp_case():
    """4x4 features (cell (i, j) holds the vector i*4+j+1 on channel 0 and 1 on channel 1) and an 8x8 mask (2x2
    pixels per cell). With window 2 the four windows have foreground fractions: top-left 1, top-right 15/16,
    bottom-left 0, bottom-right 0."""
    vals = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    feat = torch.stack([vals, torch.ones(4, 4)]).unsqueeze(0)  # [1, 2, 4, 4]
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :] = 1.0  # top half: windows top-left and top-right full...
    mask[0, 0, 4:8] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # ...except one pixel of the top-right window (15/16)
    mask[0, 0, 7] = 0.0
    return feat, mask


def test_alpnet_local_prototype_threshold():
    feat, mask = _alp_case()
    frac = mask_fraction(mask, (4, 4))
    assert frac.shape == (1, 1, 4, 4)
    assert frac[0, 0, 0, 3].item() == pytest.approx(0.75) and frac[0, 0, 1, 3].item() == 1.0
    fg = local_prototypes(feat, frac, window=2, thresh=0.95)
    # only the top-left window (cells 1, 2, 5, 6: mean 3.5) passes 0.95; the top-right one (15/16) does not
    assert fg.shape == (1, 2) and torch.allclose(fg, torch.tensor([[3.5, 1.0]]))
    fg_low = local_prototypes(feat, frac, window=2, thresh=0.9)
    assert torch.allclose(fg_low, torch.tensor([[3.5, 1.0], [5.5, 1.0]]))
    bg = local_prototypes(feat, 1.0 - frac, window=2, thresh=0.95)
    assert torch.allclose(bg, torch.tensor([[11.5, 1.0], [13.5, 1.0]]))
    # window 1: every fully-covered cell is a prototype (row-major); 0.95 is strict
    assert local_prototypes(feat, frac, window=1, thresh=0.95)[:, 0].tolist() == [1, 2, 3, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="does not fit"):
        local_prototypes(feat, frac, window=5, thresh=0.5)


def test_alpnet_bags_gate_global_and_fallbacks():
    feat, mask = _alp_case()
    p = alpnet_prototypes(feat, mask, window=2, gate_window=2)
    # gate passes (top-left window = 1.0): local fg + one global fg (masked average over the mask fraction)
    frac = mask_fraction(mask, (4, 4))[0, 0]
    glob = (feat[0] * frac).sum(dim=(1, 2)) / (frac.sum() + 1e-5)
    assert p.counts == (2, 2)
    assert torch.allclose(p.fg[0], torch.tensor([3.5, 1.0])) and torch.allclose(p.fg[1], glob, atol=1e-5)
    # no window reaches the threshold -> "mask" mode: one global fg prototype (PANet-like)
    small = torch.zeros(1, 8, 8)
    small[0, 2:5, 2:5] = 1.0
    q = alpnet_prototypes(feat, small, window=2, gate_window=2)
    assert q.counts[1] == 1
    # empty mask: zero fg prototype, full local bg bag, finite scores
    e = alpnet_prototypes(feat, torch.zeros(1, 8, 8), window=2, gate_window=2)
    assert e.counts == (4, 1) and torch.equal(e.fg, torch.zeros(1, 2))
    # full mask: no local bg window -> global bg fallback (a zero vector), never an empty bag
    f = alpnet_prototypes(feat, torch.ones(1, 8, 8), window=2, gate_window=2)
    assert f.counts == (1, 4 + 1) and torch.equal(f.bg, torch.zeros(1, 2))
    # k-shot: an empty shot contributes no global prototype to the gridconv+ bag
    k = alpnet_prototypes(torch.cat([feat, feat]), torch.cat([mask, torch.zeros(1, 8, 8)]), window=2, gate_window=2)
    assert k.counts == (2 + 4, 1 + 1)


def test_alpnet_window_follows_train_eval_mode(alpnet):
    s_img, s_mask, q_img, _ = _episode(1, 1, 64)
    mask = torch.zeros_like(s_mask)
    mask[:, :32, :32] = 1.0  # exactly the top-left 2x2 feature cells
    with torch.no_grad():
        feats = alpnet.train().encode(s_img)
        p_train = alpnet.prototypes(feats, mask)
        p_eval = alpnet.eval().prototypes(feats, mask)
    assert alpnet.window == 2 and alpnet.eval_window == 1
    assert p_train.counts == (3, 1 + 1)  # windows of 2x2 cells: 3 background, 1 foreground (+ global)
    assert p_eval.counts == (12, 4 + 1)  # single cells: 12 background, 4 foreground (+ global)


# ---- gradients, losses, engine -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["panet", "alpnet"])
def test_gradients_reach_every_parameter_through_ce_and_alignment(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    s_img, s_mask, q_img, q_mask = _episode(2, 2, 64)
    out = model(s_img, s_mask, q_img)
    ce = F.cross_entropy(out.logits, q_mask)
    al = alignment_loss(out.query_feats[-1], out.logits, out.support_feats[-1], s_mask)
    (ce + al).backward()
    for pname, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["panet", "alpnet"])
def test_cyclic_loss_works_with_the_prototype_bundle(proto_models, name):
    model = proto_models[name].train()
    model.zero_grad(set_to_none=True)
    s_img, s_mask, q_img, _ = _episode(1, 2, 64)
    out = model(s_img, s_mask, q_img)
    cy = cyclic_consistency_loss(model, s_img, s_mask, q_img, out.logits,
                                 query_feats=out.query_feats, support_feats=out.support_feats)
    assert cy.ndim == 0 and torch.isfinite(cy)
    cy.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


_EPISODE_KWARGS: Dict[str, Dict[str, Any]] = {
    "finetune": FT_SMALL,
    "unet": {"base_channels": 8},
    "resupnet": {"base_channels": 4},
    "mobilenet_aspp_se_unet": {"aspp_channels": 8, "aspp_out_channels": 16, "decoder_channels": (16, 8, 8, 8, 8)},
}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_one_engine_episode(name):
    torch.manual_seed(0)
    model = build_model(name, **_EPISODE_KWARGS.get(name, {})).train()
    s_img, s_mask, q_img, q_mask = _episode(1, 2, 64)
    terms = episode_losses(model, s_img, s_mask, q_img, q_mask, lambda_align=1.0, lambda_cyc=1.0)
    assert torch.isfinite(terms["loss"]) and terms["loss"].ndim == 0
    terms["loss"].backward()
    if name in ("panet", "alpnet"):
        assert "align" in terms and "cyc" in terms
        assert all(p.grad is not None for p in model.parameters())


def test_finetune_episode_never_updates_the_base():
    torch.manual_seed(0)
    model = build_model("finetune", **FT_SMALL).train()
    before = _state_copy(model)
    s_img, s_mask, q_img, q_mask = _episode(1, 2, 64)
    terms = episode_losses(model, s_img, s_mask, q_img, q_mask, lambda_align=1.0, lambda_cyc=1.0)
    assert set(terms) == {"ce", "loss"}  # no features, no prototypes: CE only
    terms["loss"].backward()
    assert all(p.grad is None for p in model.parameters())  # gradients end in the discarded copy
    _assert_same_state(before, model.state_dict())


# ---- edge cases, determinism, step API -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["panet", "alpnet", "finetune"])
@pytest.mark.parametrize("train", [True, False])
def test_empty_support_mask_gives_finite_output(proto_models, name, train):
    model = proto_models[name] if name in proto_models else build_model("finetune", **FT_SMALL)
    model.train(train)
    s_img, _, q_img, _ = _episode(2, 2, 64)
    with torch.no_grad():
        out = model(s_img, torch.zeros(2, 64, 64), q_img)
    assert torch.isfinite(out.logits).all()
    if name != "finetune":
        assert torch.all(out.logits[:, 1] == 0)  # zero foreground prototype -> foreground logit 0


@pytest.mark.parametrize("name", ["panet", "alpnet", "finetune"])
def test_eval_is_deterministic(proto_models, name):
    if name in proto_models:
        model = proto_models[name]
    else:
        model = build_model("finetune", **dict(FT_SMALL, cache_support=False))
    model.eval()
    s_img, s_mask, q_img, _ = _episode(2, 2, 64, seed=3)
    with torch.no_grad():
        a = model(s_img, s_mask, q_img).logits
        b = model(s_img, s_mask, q_img).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["panet", "alpnet"])
def test_step_api_matches_forward_and_state_round_trip(proto_models, name):
    model = proto_models[name].eval()
    s_img, s_mask, q_img, _ = _episode(5, 2, 64, seed=1)
    with torch.no_grad():
        ref = model(s_img, s_mask, q_img).logits
        protos = model.prototypes(model.encode(s_img), s_mask)
        fast = model.segment(model.encode(q_img), protos)
        assert isinstance(protos, ClassPrototypes)
        assert torch.allclose(ref, fast, atol=1e-4)
        twin = build_model(name, **model.config).eval()
        twin.load_state_dict(model.state_dict())
        assert torch.equal(twin(s_img, s_mask, q_img).logits, ref)


def test_bf16_autocast_forward_is_finite(alpnet):
    s_img, s_mask, q_img, _ = _episode(1, 1, 64)
    alpnet.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = alpnet(s_img, s_mask, q_img)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


# ---- fine-tune on support ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_finetune_never_touches_the_base(train, mode):
    torch.manual_seed(0)
    model = build_model("finetune", **FT_SMALL).train(train)
    before = _state_copy(model)
    s_img, s_mask, q_img, _ = _episode(2, 2, 64)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        if mode == "inference_mode":  # the evaluator's tensors are inference tensors
            s_img, s_mask, q_img = s_img.clone(), s_mask.clone(), q_img.clone()
            assert s_img.is_inference()
        out = model(s_img, s_mask, q_img)
    assert torch.isfinite(out.logits).all()
    assert out.logits.requires_grad == (mode == "grad")
    _assert_same_state(before, model.state_dict())
    assert all(p.grad is None for p in model.parameters())
    assert model.adaptations == 1


def test_finetune_under_inference_mode_equals_no_grad_and_adapts():
    torch.manual_seed(0)
    model = build_model("finetune", **dict(FT_SMALL, cache_support=False)).eval()
    s_img, s_mask, q_img, _ = _episode(2, 2, 64)
    with torch.no_grad():
        ref = model(s_img, s_mask, q_img).logits
        base_only = model.base.segment_image(q_img)
        zero_steps = build_model("finetune", **dict(FT_SMALL, steps=0))
        zero_steps.load_state_dict(model.state_dict())
        assert torch.equal(zero_steps.eval()(s_img, s_mask, q_img).logits, base_only)
    with torch.inference_mode():
        inf = model(s_img.clone(), s_mask.clone(), q_img.clone()).logits
    assert torch.equal(ref, inf)
    assert not torch.allclose(ref, base_only)  # the adapted copy differs from the base


def test_finetune_adaptation_lowers_the_support_loss():
    torch.manual_seed(0)
    # lr 3e-2 oscillates on some CPUs (the loss ended above where it started); 1e-2 falls to about a third
    model = build_model("finetune", **dict(FT_SMALL, steps=15, lr=1e-2, loss="ce")).eval()
    s_img, s_mask, _, _ = _episode(1, 1, 64)
    target = s_mask.long()
    with torch.no_grad():
        before = F.cross_entropy(model.base.segment_image(s_img), target)
        net = model.adapt(s_img, s_mask)
        after = F.cross_entropy(net.segment_image(s_img), target)
    assert after < 0.5 * before
    assert all(not p.requires_grad for p in net.parameters())


def test_finetune_caches_recent_supports_in_eval():
    torch.manual_seed(0)
    model = build_model("finetune", **FT_SMALL).eval()
    s_img, s_mask, q_img, _ = _episode(1, 3, 64)
    with torch.inference_mode():
        a = model(s_img, s_mask, q_img[:2]).logits
        b = model(s_img, s_mask, q_img[2:]).logits
        assert model.adaptations == 1  # two query batches, one support: one adaptation
        model(s_img, 1.0 - s_mask, q_img[:1])
        assert model.adaptations == 2  # another support
        model(s_img, s_mask, q_img[:1])
        assert model.adaptations == 2  # the first support is still cached
    original = _state_copy(model.base)
    with torch.no_grad():
        model.base.head.conv.bias.add_(1.0)  # the base changed: the cached copy is stale
    with torch.inference_mode():
        c = model(s_img, s_mask, q_img[:2]).logits
    assert model.adaptations == 3 and not torch.equal(a, c)
    fresh = build_model("finetune", **dict(FT_SMALL, cache_support=False)).eval()
    fresh.base.load_state_dict(original)
    with torch.no_grad():
        ref = fresh(s_img, s_mask, q_img).logits
    assert torch.allclose(torch.cat([a, b]), ref, atol=1e-5)


@pytest.mark.parametrize("loss", ["dice_bce", "ce", "dice"])
def test_finetune_losses_and_sgd(loss):
    model = build_model("finetune", **dict(FT_SMALL, loss=loss, optimizer="sgd", steps=2)).eval()
    s_img, s_mask, q_img, _ = _episode(1, 1, 64)
    with torch.no_grad():
        assert torch.isfinite(model(s_img, s_mask, q_img).logits).all()


# the support losses of fine-tune and MAML are written in the models (which never import ``fewshot_proto.losses``):
# they must equal the training losses
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptation_loss_equals_the_training_losses(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(3, 2, 16, 16, generator=g)
    target = (torch.rand(3, 16, 16, generator=g) > 0.6).long()
    target[2] = 0  # an item without foreground
    torch.testing.assert_close(adaptation_loss(logits, target, "ce"), losses.weighted_cross_entropy(logits, target))
    torch.testing.assert_close(adaptation_loss(logits, target, "dice"),
                               losses.dice_loss(logits, target, softmax=True, include_background=False))
    torch.testing.assert_close(adaptation_loss(logits, target, "dice_bce"),
                               losses.dice_bce_loss(logits[:, 1] - logits[:, 0], target.float()))
    for name in ("ce", "dice", "dice_bce"):
        assert adaptation_loss(logits.bfloat16(), target, name).dtype == torch.float32


def test_adaptation_loss_known_answers_on_2x2():
    # z = fg - bg = [[ln3, ln3], [-ln3, 0]] -> p_fg = [[3/4, 3/4], [1/4, 1/2]]; target [[1, 1], [0, 0]]
    ln3 = math.log(3.0)
    bg = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    z = torch.tensor([[ln3, ln3], [-ln3, 0.0]])
    logits = torch.stack([bg, bg + z]).unsqueeze(0)  # [1, 2, 2, 2]
    target = torch.tensor([[[1, 1], [0, 0]]])
    ce = (3 * math.log(4 / 3) + math.log(2)) / 4  # -log 3/4 three times, -log 1/2 once
    # Dice of the foreground: sum(p g) = 3/2, sum(p) = 9/4, sum(g) = 2, smoothing 1e-5
    dice = 1 - (2 * 1.5 + 1e-5) / (2.25 + 2 + 1e-5)
    assert adaptation_loss(logits, target, "ce").item() == pytest.approx(ce, rel=1e-6)
    assert adaptation_loss(logits, target, "dice").item() == pytest.approx(dice, rel=1e-6)
    assert adaptation_loss(logits, target, "dice_bce").item() == pytest.approx(0.8 * dice + 0.2 * ce, rel=1e-6)


def test_finetune_few_shot_base():
    torch.manual_seed(0)
    model = build_model("finetune", base="panet", steps=1, lr=1e-4).eval()
    before = _state_copy(model)
    s_img, s_mask, q_img, _ = _episode(2, 1, 64)
    with torch.inference_mode():
        out = model(s_img, s_mask, q_img)
    assert out.logits.shape == (1, 2, 64, 64) and torch.isfinite(out.logits).all()
    _assert_same_state(before, model.state_dict())


def test_finetune_loads_a_pretrained_base(tmp_path):
    torch.manual_seed(1)
    trained = build_model("unet", **SMALL_UNET)
    path = save_checkpoint(tmp_path / "unet.pt", model=trained, model_name="unet", model_config=trained.config, step=7)
    model = build_model("finetune", base="unet", checkpoint=str(path), steps=1)  # base_kwargs from the checkpoint
    _assert_same_state(trained.state_dict(), model.base.state_dict())
    assert model.config["base_kwargs"] == trained.config and model.config["checkpoint"] is None
    assert model.init_checkpoint == str(path)
    bare = tmp_path / "bare.pt"
    torch.save(trained.state_dict(), bare)
    model2 = build_model("finetune", base="unet", base_kwargs=SMALL_UNET, checkpoint=bare)
    _assert_same_state(trained.state_dict(), model2.base.state_dict())
    with pytest.raises(CheckpointError, match="not the base"):
        build_model("finetune", base="resupnet", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model("finetune", base="unet", base_kwargs={"base_channels": 8}, checkpoint=bare)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("finetune", checkpoint=tmp_path / "missing.pt")
    # a rebuilt model (config has checkpoint=None) takes the weights from its own state dict
    twin = build_model("finetune", **model.config)
    twin.load_state_dict(model.state_dict())
    _assert_same_state(model.state_dict(), twin.state_dict())


def test_finetune_keeps_frozen_base_parameters_frozen():
    torch.manual_seed(0)
    model = build_model("finetune", **FT_SMALL)
    frozen = model.base.encoders[0]
    frozen.requires_grad_(False)
    s_img, s_mask, _, _ = _episode(1, 1, 64)
    net = model.adapt(s_img, s_mask)
    for (name, p), (_, q) in zip(model.base.named_parameters(), net.named_parameters()):
        if name.startswith("encoders.0."):
            assert torch.equal(p, q) and not q.requires_grad, name
    assert not torch.equal(model.base.head.conv.weight, net.head.conv.weight)
    assert net.head.conv.weight.requires_grad  # grad mode was on at the call


def test_finetune_reinit_head_takes_everything_but_the_output_layer(tmp_path):
    torch.manual_seed(2)
    trained = build_model("unet", **SMALL_UNET)  # softmax head: 2 output channels
    path = tmp_path / "unet_softmax.pt"
    torch.save(trained.state_dict(), path)
    kwargs = dict(SMALL_UNET, out_mode="sigmoid")  # sigmoid head: 1 output channel -> shapes differ
    with pytest.raises(CheckpointError, match="reinit_head"):
        build_model("finetune", base="unet", base_kwargs=kwargs, checkpoint=path)
    model = build_model("finetune", base="unet", base_kwargs=kwargs, checkpoint=path, reinit_head=True)
    assert model.reinitialised == ["head.conv.weight", "head.conv.bias"]
    own = model.base.state_dict()
    for k, v in trained.state_dict().items():
        if k not in model.reinitialised:
            assert torch.equal(own[k], v), k
    assert own["head.conv.weight"].shape == (1, 4, 1, 1)
    assert model.config["reinit_head"] is True


def test_finetune_multiclass_base_needs_reinit_head(tmp_path):
    import inspect

    from fewshot_proto.models.baselines import UNet

    if "classes" not in inspect.signature(UNet.__init__).parameters:
        pytest.skip("supervised baselines without multi-class support")
    torch.manual_seed(3)
    multi = build_model("unet", **dict(SMALL_UNET, classes=[1, 4]))
    path = save_checkpoint(tmp_path / "multi.pt", model=multi, model_name="unet", model_config=multi.config, step=1)
    with pytest.raises(ValueError, match="binary base"):
        build_model("finetune", base="unet", checkpoint=str(path))
    model = build_model("finetune", base="unet", checkpoint=str(path), reinit_head=True, steps=1)
    assert model.base.classes is None and model.config["base_kwargs"]["classes"] is None
    assert set(model.reinitialised) == {"head.conv.weight", "head.conv.bias"}
    s_img, s_mask, q_img, _ = _episode(1, 1, 64)
    with torch.inference_mode():
        assert model(s_img, s_mask, q_img).logits.shape == (1, 2, 64, 64)


def test_adaptation_cache_is_lru_and_keyed_by_weights_and_support():
    from fewshot_proto.models.fsbaselines import AdaptationCache

    owner = torch.nn.Linear(2, 2)
    cache = AdaptationCache(2)
    imgs = [torch.full((1, 3, 4, 4), float(i)) for i in range(3)]
    mask = torch.zeros(1, 4, 4)
    nets = [torch.nn.Identity() for _ in range(3)]
    for img, net in zip(imgs[:2], nets[:2]):
        cache.put(owner, img, mask, net)
    assert cache.get(owner, imgs[0], mask) is nets[0]  # now the most recent
    cache.put(owner, imgs[2], mask, nets[2])  # evicts imgs[1], the least recently used
    assert len(cache) == 2
    assert cache.get(owner, imgs[1], mask) is None
    assert cache.get(owner, imgs[0], mask) is nets[0] and cache.get(owner, imgs[2], mask) is nets[2]
    assert cache.get(owner, imgs[0], mask + 1) is None  # another mask
    with torch.no_grad():
        owner.weight.add_(0.0)  # a weight update (version counter) invalidates every entry
    assert cache.get(owner, imgs[0], mask) is None
    with pytest.raises(ValueError, match="cache size"):
        AdaptationCache(-1)
