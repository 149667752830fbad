"""Evaluation protocols on constructed SliceIndexes whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.episodes.protocol import (
    ABDOMEN_TEST_GROUPS,
    PROTOCOLS,
    EpisodeSpec,
    alpnet_folds,
    build_eval_episodes,
    fold_split,
    group_by_query,
    part_assign,
    query_chunks,
    support_percentages,
    support_slice_positions,
    train_classes_for,
    training_slices,
)
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import SliceIndex

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37",
             "38", "39"]


def make_index(ids=CHAOS_IDS, n_slices=40, classes=(1, 2, 3, 4), dataset="toy"):
    """Every scan has ``n_slices``; class c occupies slices [5c, 5c + 12) (overlapping neighbours)."""
    index = {c: {s: list(range(5 * c, 5 * c + 12)) for s in ids} for c in classes}
    return SliceIndex(index=index, n_slices={s: n_slices for s in ids}, dataset=dataset)


# ---------------------------------------------------------------------------------------------- folds
def test_folds_are_contiguous_natural_order():
    folds = alpnet_folds(list(reversed(CHAOS_IDS)), 5)
    assert folds == [CHAOS_IDS[0:4], CHAOS_IDS[4:8], CHAOS_IDS[8:12], CHAOS_IDS[12:16], CHAOS_IDS[16:20]]
    # uneven: larger folds first
    assert [len(f) for f in alpnet_folds([str(i) for i in range(11)], 3)] == [4, 4, 3]
    with pytest.raises(ProtocolError, match="cannot be cut"):
        alpnet_folds(["1", "2"], 3)
    with pytest.raises(ProtocolError, match="n_folds"):
        alpnet_folds(["1", "2"], 1)


def test_fold_split_matches_alpnet_rule():
    idx = make_index()
    sp = fold_split(idx, 0, 5, shots=1)
    assert sp.query_scans == ["1", "2", "3", "5"]
    assert sp.support_scans == ["8"]  # first scan of the next fold
    assert set(sp.train_scans) == set(CHAOS_IDS) - {"1", "2", "3", "5", "8"}
    last = fold_split(idx, 4, 5, shots=2)
    assert last.support_scans == ["1", "2"]  # circular
    assert last.query_scans == ["36", "37", "38", "39"]


@pytest.mark.parametrize("shots", [1, 2, 3, 4])
def test_fold_sweep_invariants(shots):
    idx = make_index()
    seen = []
    for f in range(5):
        sp = fold_split(idx, f, 5, shots)
        seen += sp.query_scans
        assert not set(sp.support_scans) & set(sp.query_scans)
        assert not set(sp.support_scans) & set(sp.train_scans)
        assert not set(sp.query_scans) & set(sp.train_scans)
        assert len(sp.support_scans) == shots
        assert sorted(sp.query_scans + sp.support_scans + sp.train_scans) == sorted(CHAOS_IDS)
    assert sorted(seen) == sorted(CHAOS_IDS) and len(seen) == len(set(seen))  # each scan queried once


def test_five_shot_spills_into_the_fold_after_next():
    idx = make_index()
    folds = alpnet_folds(idx.scan_ids, 5)
    for f in range(5):
        sp = fold_split(idx, f, 5, shots=5)
        assert sp.support_scans == folds[(f + 1) % 5] + folds[(f + 2) % 5][:1]
        assert not set(sp.support_scans) & (set(sp.query_scans) | set(sp.train_scans))
    with pytest.raises(ProtocolError, match="17-shot.*only 16"):
        fold_split(idx, 0, 5, shots=17)


# -------------------------------------------------------------------------------------- support slices
def test_support_slices_known_answers():
    zs = list(range(10, 22))  # 12 slices
    assert support_slice_positions(zs, 1) == [16]  # index 6
    assert support_slice_positions(zs, 3) == [12, 16, 20]  # indices int(12/6)=2, 6, int(12*5/6)=10
    assert support_slice_positions([7], 3) == [7, 7, 7]
    assert support_slice_positions([3, 9], 3) == [3, 9, 9]  # int(2/6)=0, int(1)=1, int(10/6)=1
    assert support_slice_positions(list(range(5)), 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ProtocolError):
        support_slice_positions([], 3)
    with pytest.raises(ProtocolError):
        support_slice_positions([3, 2], 1)


def test_support_percentages_equal_exact_rule():
    assert support_percentages(1) == [0.5]
    assert np.allclose(support_percentages(3), [1 / 6, 1 / 2, 5 / 6])
    for n in range(1, 8):
        for length in range(1, 200):
            got = support_slice_positions(list(range(length)), n)
            assert got == [((2 * p + 1) * length) // (2 * n) for p in range(n)]


# ------------------------------------------------------------------------------------------ query chunks
def test_alpnet_chunks_known_slab():
    # organ present at 10..21 with a gap; slab includes the gap
    zs, ch = query_chunks([10, 11, 15, 21], 3, "alpnet")
    assert zs == list(range(10, 22))
    # (z-10) // (11/3): 0..3 -> 0, 4..7 -> 1, 8..10 -> 2, 11 -> 3 clamped to 2
    assert ch == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert query_chunks([4], 3, "alpnet") == ([4], [0])
    assert query_chunks([4, 5, 6], 1, "alpnet") == ([4, 5, 6], [0, 0, 0])


def test_part_assign_reference_float_rule():
    assert [part_assign(z, 0, 10, 6) for z in range(11)] == [0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5]
    # exact arithmetic would give chunk 3 for z=5 (5*6/10 = 3); SSL-ALPNet's float division gives 2
    assert part_assign(5, 0, 10, 6) == 2
    assert part_assign(-3, 0, 10, 3) == 0 and part_assign(30, 0, 10, 3) == 2


def test_adnet_ep1_chunks():
    zs, ch = query_chunks([3, 4, 8, 9, 10, 11, 12], 3, "adnet-ep1")
    assert zs == [3, 4, 8, 9, 10, 11, 12]  # only GT-positive slices
    assert ch == [0, 0, 1, 1, 2, 2, 2]  # linspace(0, 7, 4).astype(int) = [0, 2, 4, 7]
    zs, ch = query_chunks([5, 6], 3, "adnet-ep1")
    assert ch == [1, 2]  # edges [0, 0, 1, 2]: chunk 0 empty


def test_full_volume_chunks_clamped_outside_slab():
    zs, ch = query_chunks([10, 11, 15, 21], 3, "full-volume", n_slices=25)
    assert zs == list(range(25))
    assert ch[:10] == [0] * 10  # below the slab
    assert ch[10:22] == query_chunks([10, 21], 3, "alpnet")[1]
    assert ch[22:] == [2, 2, 2]  # above
    with pytest.raises(ProtocolError, match="n_slices"):
        query_chunks([1], 3, "full-volume")


def test_unknown_protocol_lists_names():
    assert PROTOCOLS.names() == ["adnet-ep1", "alpnet", "full-volume"]
    with pytest.raises(ProtocolError, match="alpnet"):
        query_chunks([1], 3, "nope")


# ----------------------------------------------------------------------------------------------- settings
def settings_index():
    # one scan, 10 slices: class 1 on 0..5, class 2 on 2..3, class 3 on 3..4, class 4 on 6..9
    return SliceIndex(index={1: {"a": [0, 1, 2, 3, 4, 5]}, 2: {"a": [2, 3]}, 3: {"a": [3, 4]},
                             4: {"a": [6, 7, 8, 9]}}, n_slices={"a": 10}, dataset="set")


def test_setting1_keeps_every_slice():
    idx = settings_index()
    assert training_slices(idx, "a", 1, [2, 3]) == list(range(10))
    assert training_slices(idx, "a", 1, [2, 3], train_classes=[1, 4]) == list(range(10))


def test_setting2_any_vs_all():
    idx = settings_index()
    assert training_slices(idx, "a", 2, [2, 3]) == [0, 1, 5, 6, 7, 8, 9]  # ANY test class removed
    # peers' code: only slices with BOTH kidneys (z=3) removed -> z=2 (class 2 only) and z=4 (class 3) leak
    assert training_slices(idx, "a", 2, [2, 3], exclusion="all") == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert training_slices(idx, "a", 2, [2, 3], train_classes=[1]) == [0, 1, 5]
    with pytest.raises(ProtocolError):
        training_slices(idx, "a", 3, [2, 3])
    with pytest.raises(ProtocolError, match="no scan"):
        training_slices(idx, "b", 2, [2, 3])


def test_setting2_never_yields_test_class_on_random_indexes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lab = rng.integers(0, 5, size=(3, 12, 4, 4)) * (rng.random((3, 12, 4, 4)) < 0.05)
        from fewshot_proto.data.dataset import slice_index_from_labels

        idx = slice_index_from_labels([(str(i), lab[i]) for i in range(3)])
        for s in idx.scan_ids:
            for z in training_slices(idx, s, 2, [2, 3]):
                assert not np.isin(lab[int(s), z], [2, 3]).any()


def test_test_groups_and_train_classes():
    assert ABDOMEN_TEST_GROUPS == {"kidneys": (2, 3), "liver_spleen": (1, 4)}
    assert train_classes_for(make_index(), [2, 3]) == [1, 4]


# ----------------------------------------------------------------------------------------------- episodes
@pytest.mark.parametrize("protocol", ["alpnet", "adnet-ep1", "full-volume"])
def test_build_eval_episodes_fold_sweep(protocol):
    idx = make_index()
    queried = {2: [], 3: []}
    for f in range(5):
        specs = build_eval_episodes(idx, protocol, fold=f, n_folds=5, shots=1, n_part=3, test_classes=[2, 3],
                                    setting=2)
        sp = fold_split(idx, f, 5, 1)
        assert len(specs) == 2 * 4
        for s in specs:
            assert s.protocol == protocol and s.fold == f and s.setting == 2 and s.n_part == 3
            assert s.support_scans == sp.support_scans
            assert s.query_scan not in s.support_scans
            assert len(s.query_z) == len(s.query_chunk)
            queried[s.class_id].append(s.query_scan)
    for c in (2, 3):
        assert sorted(queried[c]) == sorted(CHAOS_IDS)


def test_episode_contents_known():
    idx = make_index()
    specs = build_eval_episodes(idx, "alpnet", fold=0, test_classes=[2], shots=2)
    s = specs[0]
    # class 2 at 10..21 in every scan -> support slices 12, 16, 20
    assert s.support == [("8", [12, 16, 20]), ("10", [12, 16, 20])]
    assert s.query_scan == "1" and s.query_z == list(range(10, 22))
    assert s.chunk_slices(0) == [10, 11, 12, 13]
    assert EpisodeSpec.from_dict(s.to_dict()) == s


def test_nway_grouping_shares_query_scans():
    specs = build_eval_episodes(make_index(), "alpnet", fold=1, test_classes=[1, 4])
    groups = group_by_query(specs)
    assert list(groups) == [(1, q) for q in ["8", "10", "13", "15"]]
    assert all(sorted(s.class_id for s in g) == [1, 4] for g in groups.values())


def test_errors_name_dataset_class_and_scan():
    idx = make_index(classes=(1, 2))
    with pytest.raises(ProtocolError, match=r"'toy'.*class 3"):
        build_eval_episodes(idx, "alpnet", fold=0, test_classes=[3])
    # support scan '8' lacks class 2
    del idx.index[2]["8"]
    with pytest.raises(ProtocolError, match=r"support scan '8'.*class 2"):
        build_eval_episodes(idx, "alpnet", fold=0, test_classes=[2])
    with pytest.raises(ProtocolError, match="fold 7"):
        build_eval_episodes(idx, "alpnet", fold=7, test_classes=[1])
    with pytest.raises(ProtocolError, match="cannot be cut"):
        build_eval_episodes(make_index(ids=["1", "2", "3"]), "alpnet", fold=0, test_classes=[1])


def test_query_scan_without_class_skipped_or_error():
    idx = make_index()
    del idx.index[2]["2"]
    specs = build_eval_episodes(idx, "alpnet", fold=0, test_classes=[2])
    assert [s.query_scan for s in specs] == ["1", "3", "5"]
    with pytest.raises(ProtocolError, match=r"query scan '2'"):
        build_eval_episodes(idx, "alpnet", fold=0, test_classes=[2], on_missing="error")


def test_setting1_and_kshot_expressible():
    idx = make_index()
    for setting in (1, 2):
        for k in (1, 2, 3, 4):
            specs = build_eval_episodes(idx, "alpnet", fold=2, shots=k, setting=setting, test_classes=[1, 4])
            assert all(len(s.support) == k and s.setting == setting for s in specs)
