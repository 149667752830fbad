"""The model contract (``models.base``): recorded configs, the one ``forward``, the engine's calls, registration."""
from __future__ import annotations

import subprocess
import sys
from typing import List

import numpy as np
import pytest
import torch

from fewshot_proto.models import MODELS, ZOO, build_model, register_model
from fewshot_proto.models.base import FewShotSegmenter, SupervisedSegmenter
from fewshot_proto.types import SegOutput


class MeanMatcher(FewShotSegmenter):
    """Foreground where a pixel is closer to the support's masked mean than to its unmasked mean (scale ``gain``)."""

    def __init__(self, gain: float = 4.0, weights=None, sizes=(1, 2), **extra) -> None:
        super().__init__()
        self.gain = gain
        self.calls: List[str] = []

    @property
    def input_multiple(self) -> int:
        return 1

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.calls.append(f"encode {x.shape[0]}")
        return [x[:, :1] * 0.5, x[:, :1]]

    def prototypes(self, feats: List[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        f = feats[-1][:, 0]
        fg = (f * mask).sum() / mask.sum()
        bg = (f * (1 - mask)).sum() / (1 - mask).sum()
        return torch.stack([bg, fg])

    def segment(self, feats: List[torch.Tensor], protos: torch.Tensor) -> torch.Tensor:
        f = feats[-1][:, 0]
        return -self.gain * torch.stack([(f - protos[0]).abs(), (f - protos[1]).abs()], dim=1)


class Outer(MeanMatcher):
    def __init__(self, depth: int = 2, gain: float = 1.0) -> None:
        super().__init__(gain=gain, sizes=(depth,))


def test_config_is_the_outermost_constructors_arguments_with_defaults():
    m = MeanMatcher(2.0, weights="path/to.pt", extra_key=3)
    assert m.config == {"gain": 2.0, "weights": None, "sizes": [1, 2], "extra_key": 3}  # tuples become lists
    assert m.init_weights == "path/to.pt"
    assert Outer(depth=5).config == {"depth": 5, "gain": 1.0}  # the inner __init__ records nothing
    assert type(m)(**m.config).config == m.config
    assert "_recording_config" not in m.__dict__


def test_config_is_not_recorded_when_the_constructor_fails():
    class Fails(MeanMatcher):
        def __init__(self, gain: float = 1.0) -> None:
            super().__init__(gain)
            raise ValueError("bad gain")

    with pytest.raises(ValueError, match="bad gain"):
        Fails()


def test_forward_is_one_batched_encode_and_carries_features_and_prototypes():
    m = MeanMatcher()
    s_img = torch.zeros(2, 3, 4, 4)
    s_img[:, :, :2] = 1.0
    s_mask = (s_img[:, 0] > 0).float()
    q_img = torch.zeros(1, 3, 4, 4)
    q_img[:, :, :, :1] = 1.0
    out = m(s_img, s_mask, q_img)
    assert m.calls == ["encode 3"]
    assert isinstance(out, SegOutput) and out.logits.shape == (1, 2, 4, 4)
    assert torch.equal(out.prototypes, torch.tensor([0.0, 1.0]))
    assert [f.shape[0] for f in out.support_feats] == [2, 2] and [f.shape[0] for f in out.query_feats] == [1, 1]
    # the query's left column is 1 (the support's foreground value): foreground there, background elsewhere
    assert torch.equal(out.logits.argmax(1)[0], (q_img[0, 0] > 0).long())
    with pytest.raises(ValueError, match="MeanMatcher: support_mask"):
        m(s_img, s_mask[:1], q_img)


def test_the_engine_calls_give_the_softmax_foreground_of_forward():
    m = MeanMatcher()
    s_img, q_img = torch.rand(1, 3, 4, 4), torch.rand(2, 3, 4, 4)
    s_mask = (s_img[:, 0] > 0.5).float()
    prob = m.predict(m.encode_query(q_img), m.encode_support(s_img, s_mask, class_id=5))
    torch.testing.assert_close(prob, torch.softmax(m(s_img, s_mask, q_img).logits, 1)[:, 1])
    assert prob.dtype == torch.float32 and m.needs_support


def test_feature_losses_off_gives_logits_only():
    class NoFeatures(MeanMatcher):
        feature_losses = False

    out = NoFeatures()(torch.rand(1, 3, 4, 4), torch.ones(1, 4, 4) * (torch.rand(1, 4, 4) > 0.5), torch.rand(1, 3, 4, 4))
    assert out.support_feats is None and out.query_feats is None and out.prototypes is None


def test_supervised_engine_calls_ignore_the_support():
    unet = build_model("unet", base_channels=4, classes=[2, 3]).eval()
    x = torch.randn(2, 3, 16, 16)
    assert not unet.needs_support and unet.encode_support(None, None, 3) == 3
    with pytest.raises(ValueError, match=r"class 4 is not one of the classes this model segments \[2, 3\]"):
        unet.encode_support(None, None, 4)
    with torch.no_grad():
        prob = unet.predict(unet.encode_query(x), 3)
        expect = torch.softmax(unet.binary_logits(x, 3), 1)[:, 1]
    torch.testing.assert_close(prob, expect)


def test_register_model_checks_the_base_class_and_the_name():
    with pytest.raises(TypeError, match="model 'mine': Linear must subclass fewshot_proto.models.base"):
        register_model("mine", torch.nn.Linear)
    register_model("mean_matcher_test", MeanMatcher)
    try:
        assert build_model("mean_matcher_test", gain=3.0).config["gain"] == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_model("mean_matcher_test", MeanMatcher)
    finally:
        MODELS._items.pop("mean_matcher_test")


def test_every_zoo_entry_is_one_of_the_two_kinds():
    from fewshot_proto.models import get_model_class

    kinds = {name: get_model_class(name).kind for name, _, _ in ZOO}
    assert set(kinds.values()) == {"fewshot", "supervised"}
    assert all(issubclass(get_model_class(n), FewShotSegmenter if k == "fewshot" else SupervisedSegmenter)
               for n, k in kinds.items())


def test_importing_a_model_module_registers_nothing():
    code = ("import fewshot_proto.models.fewshot, fewshot_proto.models.baselines, fewshot_proto.models.fsbaselines\n"
            "import fewshot_proto.models.encoders.resnet\n"
            "from fewshot_proto.models import MODELS\nfrom fewshot_proto.models.encoders.base import ENCODERS\n"
            "print(len(MODELS), len(ENCODERS))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"]


def test_models_never_import_the_losses():
    code = ("import sys\nimport fewshot_proto.models as m\nm.list_models()\n"
            "print(sorted(k for k in sys.modules if k.startswith('fewshot_proto.losses')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_known_answer_through_evaluate(tmp_path):
    """MeanMatcher through the engine's inference path: a query whose organ has the support organ's grey value is
    segmented exactly (Dice 1)."""
    from fewshot_proto.config import ProtocolConfig
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.engine import evaluate
    from fewshot_proto.engine.evaluator import protocol_specs
    from fewshot_proto.types import Volume

    vols = []
    for i in range(4):
        lab = np.zeros((6, 8, 8), np.int16)
        lab[1:5, 2:5, 2 + (i % 2):5 + (i % 2)] = 1
        vols.append(Volume(id=str(i + 1), image=lab.astype(np.float32) * 3.0, label=lab))
    ds = InMemoryDataset(vols, name="toy")
    specs = protocol_specs(ds, ProtocolConfig(test_classes=[1], n_folds=2, fold=0))
    s = evaluate(MeanMatcher(), ds, specs, size=8, distances=False)
    assert s["mean_dice"] == 1.0 and len(s["rows"]) == 2
