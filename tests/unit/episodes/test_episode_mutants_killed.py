"""Known-answer tests that kill mutants which survived mutation testing (mutmut 3.8.1) of
``episodes/protocol.py``. Expected values are worked out by hand in the comments."""
from __future__ import annotations

import pytest

from fewshot_proto.episodes.protocol import (
    allowed_training_slices,
    alpnet_folds,
    build_eval_episodes,
    fold_split,
    query_chunks,
    support_slice_positions,
)
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import SliceIndex

SIX = ["1", "2", "3", "4", "5", "6"]


def make_index(ids=SIX, n_slices=40, classes=(1, 2, 3, 4), dataset="toy"):
    """Every scan has ``n_slices``; class c occupies slices [5c, 5c + 12)."""
    index = {c: {s: list(range(5 * c, 5 * c + 12)) for s in ids} for c in classes}
    return SliceIndex(index=index, n_slices={s: n_slices for s in ids}, dataset=dataset)


# ---------------------------------------------------------------------------------------------- folds
def test_alpnet_folds_defaults_and_boundaries():
    # 10 scans, default 5 folds -> 5 folds of 2
    ids = [str(i) for i in range(1, 11)]
    assert alpnet_folds(ids) == [ids[0:2], ids[2:4], ids[4:6], ids[6:8], ids[8:10]]
    # n_folds = 2 is the smallest legal value; as many scans as folds is legal (one scan per fold)
    assert alpnet_folds(["1", "2"], 2) == [["1"], ["2"]]
    with pytest.raises(ProtocolError, match="duplicate scan ids"):
        alpnet_folds(["1", "1", "2"], 2)


def test_fold_split_defaults():
    # 6 scans, 5 folds -> sizes 2,1,1,1,1: fold 0 = {1,2}; 1 shot from fold 1 = {3}; the rest train
    sp = fold_split(make_index(), 0)
    assert (sp.query_scans, sp.support_scans) == (["1", "2"], ["3"])


def test_fold_split_shots_equal_to_available():
    # 4 scans, 2 folds: fold 0 = {1,2}, outside = {3,4}: 2 shots use both, nothing left to train on
    sp = fold_split(make_index(ids=["1", "2", "3", "4"]), 0, n_folds=2, shots=2)
    assert (sp.query_scans, sp.support_scans) == (["1", "2"], ["3", "4"])


def test_fold_split_fold_out_of_range_message():
    with pytest.raises(ProtocolError, match=r"fold 5 out of range 0\.\.4"):
        fold_split(make_index(), 5, n_folds=5)
    with pytest.raises(ProtocolError, match="shots must be >= 1"):
        fold_split(make_index(), 0, shots=0)


# ------------------------------------------------------------------------------------- support and query
def test_support_slice_positions_rejects_duplicates():
    with pytest.raises(ProtocolError, match="sorted and unique"):
        support_slice_positions([1, 1, 2], 1)
    with pytest.raises(ProtocolError, match="support organ has no slices"):
        support_slice_positions([], 1)


def test_query_chunks_default_protocol_is_alpnet():
    # alpnet: zmin 0, zmax 3, width 3/2 = 1.5: z=0 -> 0, z=1 -> 1//1.5 = 0, z=2 -> 2//1.5 = 1, z=3 -> 2 -> clamp 1
    assert query_chunks([0, 1, 2, 3], 2) == ([0, 1, 2, 3], [0, 0, 1, 1])
    with pytest.raises(ProtocolError, match="query organ has no slices"):
        query_chunks([], 2)
    with pytest.raises(ProtocolError, match="n_part must be >= 1"):
        query_chunks([0], 0)


def test_full_volume_slice_count_boundaries():
    # a 1-slice scan is legal: zs = [0], one chunk
    assert query_chunks([0], 1, "full-volume", n_slices=1) == ([0], [0])
    # organ slice 3 in a 3-slice scan (slices 0..2) is outside the scan
    with pytest.raises(ProtocolError, match="query organ slice 3 is outside a scan of 3 slices"):
        query_chunks([3], 1, "full-volume", n_slices=3)


# ---------------------------------------------------------------------------------------------- training
def test_allowed_training_slices_known():
    idx = make_index(ids=["1", "2"])
    # train classes 1 (5..16) and 4 (20..31); setting 2 drops any slice of test classes 2 (10..21) or 3 (15..26)
    # -> 5..9 and 27..31
    want = list(range(5, 10)) + list(range(27, 32))
    assert allowed_training_slices(idx, ["1", "2"], 2, [2, 3], [1, 4]) == {"1": want, "2": want}
    # exclusion "all": drop only slices holding both 2 and 3 (15..21) -> 5..14 and 22..31
    want_all = list(range(5, 15)) + list(range(22, 32))
    assert allowed_training_slices(idx, ["1"], 2, [2, 3], [1, 4], exclusion="all") == {"1": want_all}
    # setting 1 keeps every slice; train_classes None keeps background slices: 0..39
    assert allowed_training_slices(idx, ["2"], 1, [2, 3]) == {"2": list(range(40))}
    # train class 2 only, test class 2 -> nothing left -> scan dropped
    assert allowed_training_slices(idx, ["1"], 2, [2], [2]) == {}


# ---------------------------------------------------------------------------------------------- episodes
def test_build_eval_episodes_defaults():
    specs = build_eval_episodes(make_index())
    # defaults: alpnet, fold 0 of 5 (query scans 1, 2), 1 shot (scan 3), 3 parts, test classes (2, 3)
    assert [(s.class_id, s.query_scan) for s in specs] == [(2, "1"), (2, "2"), (3, "1"), (3, "2")]
    for s in specs:
        assert (s.protocol, s.fold, s.shots, s.n_part, s.setting) == ("alpnet", 0, 1, 3, 2)
        assert [scan for scan, _ in s.support] == ["3"]
        assert len(s.query_z) == 12  # the organ spans 12 slices


def test_build_eval_episodes_single_part():
    specs = build_eval_episodes(make_index(), n_part=1)
    # n_part 1: support position 0.5 -> index int(0.5 * 12) = 6 of class 2's slices 10..21 -> slice 16
    assert specs[0].support == [("3", [16])]
    assert set(specs[0].query_chunk) == {0}


def test_build_eval_episodes_error_messages():
    idx = make_index()
    with pytest.raises(ProtocolError, match="on_missing must be 'skip' or 'error'"):
        build_eval_episodes(idx, on_missing="bogus")
    with pytest.raises(ProtocolError, match="no test classes given"):
        build_eval_episodes(idx, test_classes=())
    with pytest.raises(ProtocolError, match="duplicate test classes"):
        build_eval_episodes(idx, test_classes=(2, 2))
    with pytest.raises(ProtocolError, match="n_part must be >= 1"):
        build_eval_episodes(idx, n_part=0)
    # support scan 3 lacks class 2 -> the message names it as a support of the evaluated fold 0
    index = {c: {s: list(range(5 * c, 5 * c + 12)) for s in SIX if not (c == 2 and s == "3")} for c in (1, 2, 3, 4)}
    holes = SliceIndex(index=index, n_slices={s: 40 for s in SIX}, dataset="toy")
    with pytest.raises(ProtocolError, match=r"support scan '3' \(a support of fold 0\) has no slice with class 2"):
        build_eval_episodes(holes)


# ------------------------------------------------------------------------------ second round (after re-run)
def test_protocol_error_messages():
    from fewshot_proto.episodes.protocol import EpisodeSpec, support_percentages, training_slices

    base = dict(dataset="toy", protocol="alpnet", fold=0, setting=2, shots=1, class_id=2,
                support=[("3", [1, 2, 3])], query_scan="1", query_z=[1, 2], query_chunk=[0, 1], n_part=3)
    cases = [
        (lambda: EpisodeSpec(**{**base, "query_chunk": [0]}), r"query_z has 2 slices but query_chunk has 1$"),
        (lambda: EpisodeSpec(**{**base, "shots": 2}), r"2-shot but 1 support scans$"),
        (lambda: EpisodeSpec(**{**base, "support": [("3", [1])]}), r"support scan '3' has 1 slices, expected n_part=3$"),
        (lambda: support_percentages(0), r"^n_part must be >= 1, got 0$"),
        (lambda: support_slice_positions([], 1), r"^support organ has no slices$"),
        (lambda: query_chunks([0], 1, "full-volume"), r"^protocol 'full-volume' needs the query scan's slice count"),
        (lambda: query_chunks([0], 1, "bogus"), r"valid protocols: .*alpnet, "),
        (lambda: query_chunks([], 1), r"^query organ has no slices$"),
        (lambda: training_slices(make_index(), "1", 3, [2]), r"^setting must be 1 or 2, got 3$"),
        (lambda: training_slices(make_index(), "1", 2, [2], exclusion="x"), r"^exclusion must be 'any' or 'all'"),
    ]
    for call, message in cases:
        with pytest.raises(ProtocolError, match=message):
            call()
