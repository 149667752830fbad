"""Training samplers and evaluation materialisation on a tiny in-memory dataset with known labels."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data.dataset import InMemoryDataset
from fewshot_proto.episodes.materialise import load_query, load_support
from fewshot_proto.episodes.protocol import build_eval_episodes, training_slices
from fewshot_proto.episodes.sampler import LabelledEpisodeSampler, MixedSampler, SuperpixelEpisodeSampler
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import Volume

S = 24  # in-plane size of the toy volumes


def toy_volume(i: int, n_slices: int = 12) -> Volume:
    """Class 1 (rows 2..9) on z 0..7, class 2 (rows 12..15) on z 3..5, class 3 (rows 12..15, other columns) on
    z 5..9 and class 4 (rows 18..21) on z 8..11. Image = label-dependent grey + noise."""
    rng = np.random.default_rng(100 + i)
    lab = np.zeros((n_slices, S, S), np.int16)
    lab[0:8, 2:10, 2:20] = 1
    lab[3:6, 12:16, 2:10] = 2
    lab[5:10, 12:16, 12:20] = 3
    lab[8:12, 18:22, 4:20] = 4
    img = (lab * 0.7 + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
    return Volume(id=str(i), image=img, label=lab)


@pytest.fixture(scope="module")
def ds():
    return InMemoryDataset([toy_volume(i) for i in range(1, 7)], name="toy")


def labelled(ds, setting=2, seed=0, **kw):
    index = ds.slice_index()
    kw.setdefault("augment", False)
    return LabelledEpisodeSampler(ds, index, ds.ids, [1, 4], setting=setting, test_classes=[2, 3], size=S,
                                  rng=np.random.default_rng(seed), **kw)


def test_labelled_setting2_never_sees_test_class(ds):
    index = ds.slice_index()
    sampler = labelled(ds, setting=2, augment=True, shots=2, n_query=2)
    for _ in range(60):
        ep = sampler.sample()
        m = ep.meta
        c = ep.class_id
        assert c in (1, 4)
        assert m["query_scan"] not in m["support_scans"]
        for scan, z in list(zip(m["support_scans"], m["support_z"])) + [(m["query_scan"], z) for z in m["query_z"]]:
            assert z not in index.slices_with_any([2, 3], scan)
            assert z in index.slices(c, scan)
            assert z in training_slices(index, scan, 2, [2, 3])
        assert ep.support_img.shape == (2, 3, S, S) and ep.support_img.dtype == np.float32
        assert ep.query_img.shape == (2, 3, S, S) and ep.query_mask.dtype == np.int64
        assert set(np.unique(ep.support_mask)) <= {0.0, 1.0}


def test_labelled_masks_and_matching_positions(ds):
    index = ds.slice_index()
    sampler = labelled(ds, setting=1)
    for _ in range(30):
        ep = sampler.sample()
        m, c = ep.meta, ep.class_id
        vol_s = ds.load(m["support_scan"])
        # binary mask of the class: test classes (2, 3) on the same slice are background
        np.testing.assert_array_equal(ep.support_mask[0], (vol_s.label[m["support_z"][0]] == c))
        np.testing.assert_array_equal(ep.query_mask[0], (ds.load(m["query_scan"]).label[m["query_z"][0]] == c))
        # identical organ extents in every toy scan -> matching relative positions give the same z
        assert m["support_z"][0] == m["query_z"][0]
        assert m["support_z"][0] in index.slices(c, m["support_scan"])


def test_setting1_uses_slices_with_test_classes(ds):
    zs = set()
    sampler = labelled(ds, setting=1)
    for _ in range(80):
        ep = sampler.sample()
        zs.update(ep.meta["query_z"])
    assert zs & {3, 4, 5, 8, 9}  # slices that also contain kidneys (2/3) are used in Setting 1


def test_labelled_determinism(ds):
    s1, s2 = labelled(ds, seed=5, augment=True), labelled(ds, seed=5, augment=True)
    s3 = labelled(ds, seed=6, augment=True)
    e1 = [s1.sample() for _ in range(5)]
    e2 = [s2.sample() for _ in range(5)]
    e3 = [s3.sample() for _ in range(5)]
    for x, y in zip(e1, e2):
        np.testing.assert_array_equal(x.support_img, y.support_img)
        np.testing.assert_array_equal(x.query_mask, y.query_mask)
        assert x.meta == y.meta
    assert any(not np.array_equal(x.support_img, y.support_img) for x, y in zip(e1, e3))


def test_labelled_errors(ds):
    index = ds.slice_index()
    with pytest.raises(ProtocolError, match="both training and test"):
        LabelledEpisodeSampler(ds, index, ds.ids, [1, 2], setting=2, test_classes=[2, 3],
                               rng=np.random.default_rng(0))
    with pytest.raises(ProtocolError, match="at least two"):
        LabelledEpisodeSampler(ds, index, ["1"], [1], setting=2, test_classes=[2, 3], rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        LabelledEpisodeSampler(ds, index, ds.ids, [1], setting=2, test_classes=[2, 3], rng=0)


def test_mixed_sampler_and_rng_swap(ds):
    a, b = labelled(ds, seed=1), labelled(ds, seed=2)
    mixed = MixedSampler([a, b], [0.0, 1.0], rng=np.random.default_rng(0))
    assert all(mixed.sample().meta["sampler"] == 1 for _ in range(5))
    with pytest.raises(ValueError):
        MixedSampler([a], [0.5, 0.5], rng=np.random.default_rng(0))
    # the engine swaps .rng per step: same rng state -> same episode
    a.rng = np.random.default_rng(42)
    e1 = a.sample()
    a.rng = np.random.default_rng(42)
    assert a.sample().meta == e1.meta


def test_superpixel_sampler(ds):
    pytest.importorskip("fewshot_proto.data.superpixel")
    index = ds.slice_index()
    allowed = {s: training_slices(index, s, 2, [2, 3]) for s in ds.ids}
    sp = SuperpixelEpisodeSampler(ds, ds.ids, allowed, size=S, rng=np.random.default_rng(0), augment=True)
    for _ in range(15):
        ep = sp.sample()
        assert ep.class_id == -1 and ep.meta["kind"] == "superpixel"
        assert ep.meta["query_z"][0] in allowed[ep.meta["query_scan"]]
        assert ep.support_mask.sum() > 0
    sp2 = SuperpixelEpisodeSampler(ds, ds.ids, allowed, size=S, rng=np.random.default_rng(0), augment=True)
    sp3 = SuperpixelEpisodeSampler(ds, ds.ids, allowed, size=S, rng=np.random.default_rng(0), augment=True)
    x, y = sp2.sample(), sp3.sample()
    np.testing.assert_array_equal(x.query_img, y.query_img)
    with pytest.raises(ProtocolError, match="no allowed slice"):
        SuperpixelEpisodeSampler(ds, ds.ids, {}, size=S, rng=np.random.default_rng(0))


def test_materialise_support_and_query(ds):
    index = ds.slice_index()
    spec = build_eval_episodes(index, "alpnet", fold=0, n_folds=3, shots=2, n_part=3, test_classes=[2, 3])[0]
    img, mask = load_support(spec, ds, S)
    assert img.shape == (2, 3, 3, S, S) and mask.shape == (2, 3, S, S)
    for k, (scan, zs) in enumerate(spec.support):
        for p, z in enumerate(zs):
            np.testing.assert_array_equal(mask[k, p], ds.load(scan).label[z] == spec.class_id)
            np.testing.assert_allclose(img[k, p, 1], ds.load(scan).image[z], atol=1e-5)
    q_img, q_mask, zs = load_query(spec, ds, S)
    assert zs == spec.query_z and q_img.shape == (len(zs), 3, S, S) and q_mask.dtype == np.int64
    np.testing.assert_array_equal(q_mask, ds.load(spec.query_scan).label[zs] == spec.class_id)
    bad = type(spec).from_dict({**spec.to_dict(), "support": [[spec.support[0][0], [0, 1, 2]]], "shots": 1})
    with pytest.raises(ProtocolError, match="no class"):
        load_support(bad, ds, S)


def test_slice_cache_fills_per_scan_and_is_bounded(ds):
    from fewshot_proto.episodes.sampler import SliceCache

    cache = SliceCache(ds, S, wanted={"1": [0, 1, 2, 3]}, max_mb=64)
    img, lab = cache.get("1", 2)
    np.testing.assert_allclose(img, ds.load("1").image[2], atol=1e-5)
    np.testing.assert_array_equal(lab, ds.load("1").label[2])
    for z in (0, 1, 3):
        cache.get("1", z)
    assert (cache.misses, cache.hits) == (1, 3)  # one decode filled every wanted slice of the scan
    per_slice = S * S * (4 + 1)  # float32 image + uint8 label (ids 0..4)
    assert lab.dtype == np.uint8
    assert cache.nbytes == 4 * per_slice
    tiny = SliceCache(ds, S, wanted={"1": list(range(12))}, max_mb=2.5 * per_slice / 2 ** 20)
    img, _ = tiny.get("1", 7)
    assert tiny.nbytes <= 2.5 * per_slice
    tiny.get("1", 7)
    assert tiny.hits == 1  # the requested slice survived eviction
    with pytest.raises(ProtocolError, match="12 slices"):
        tiny.get("1", 12)


def test_samplers_share_one_slice_cache_without_changing_episodes(ds):
    from fewshot_proto.episodes.sampler import SliceCache

    allowed = {s: training_slices(ds.slice_index(), s, 2, [2, 3]) for s in ds.ids}

    def pair(cache=None):
        return (labelled(ds, seed=3, augment=True, cache=cache),
                SuperpixelEpisodeSampler(ds, ds.ids, allowed, size=S, rng=np.random.default_rng(4), augment=True,
                                         cache=cache))

    shared = SliceCache(ds, S)
    lab_s, sp_s = pair(shared)
    lab_o, sp_o = pair()
    assert lab_s.cache is shared and sp_s.cache is shared and lab_o.cache is not sp_o.cache
    # the shared cache resizes, from one decode, every slice either sampler may draw
    assert set(shared.wanted["1"]) == set(lab_o.cache.wanted["1"]) | set(sp_o.cache.wanted["1"])
    for _ in range(12):
        for a, b in ((lab_s, lab_o), (sp_s, sp_o)):
            x, y = a.sample(), b.sample()
            np.testing.assert_array_equal(x.support_img, y.support_img)
            np.testing.assert_array_equal(x.query_mask, y.query_mask)
    assert shared.misses <= len(ds.ids)  # at most one decode per scan for both samplers together
    assert lab_o.cache.misses + sp_o.cache.misses > shared.misses
    with pytest.raises(ValueError, match="shared SliceCache must hold the sampler's dataset at size 24"):
        labelled(ds, cache=SliceCache(ds, 2 * S))


@pytest.mark.parametrize("values, dtype", [([0, 4], np.uint8), ([0, 255], np.uint8), ([0, 300], np.int16),
                                           ([-1, 2], np.int16), ([0, 70000], np.int64)])
def test_cached_labels_use_the_smallest_type_that_keeps_the_ids(values, dtype):
    from fewshot_proto.episodes.sampler import _compact_labels

    lab = np.array(values, dtype=np.int64)
    out = _compact_labels(lab)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, lab)
