"""Episodes: evaluation protocols (pure functions over a SliceIndex), frozen manifests, training samplers.

    from fewshot_proto.episodes import build_eval_episodes, fold_split, freeze, save_manifest, load_manifest
    specs = build_eval_episodes(ds.slice_index(), "alpnet", fold=0, shots=1, n_part=3, test_classes=[2, 3])

Submodules: ``protocol`` (folds, support/query rules, settings, ``EpisodeSpec``), ``manifest`` (JSON files in
the repository's ``episodes/`` folder), ``sampler`` (training episodes), ``materialise`` (spec -> arrays),
``__main__`` (the ``freeze`` / ``verify`` / ``list`` command line). Importing this package does not import torch.
"""
from __future__ import annotations

from typing import Any

from .manifest import Manifest, fingerprint, freeze, load_manifest, save_manifest, verify_manifest
from .protocol import (
    ABDOMEN_TEST_GROUPS,
    GENERATOR_VERSION,
    PROTOCOLS,
    EpisodeSpec,
    FoldSplit,
    alpnet_folds,
    build_eval_episodes,
    fold_split,
    group_by_query,
    query_chunks,
    support_slice_positions,
    training_slices,
)

__all__ = [
    "ABDOMEN_TEST_GROUPS", "GENERATOR_VERSION", "PROTOCOLS", "EpisodeSpec", "FoldSplit", "alpnet_folds",
    "build_eval_episodes", "fold_split", "group_by_query", "query_chunks", "support_slice_positions",
    "training_slices", "Manifest", "fingerprint", "freeze", "load_manifest", "save_manifest", "verify_manifest",
    "LabelledEpisodeSampler", "SuperpixelEpisodeSampler", "MixedSampler", "load_support", "load_query",
]

_LAZY = {
    "LabelledEpisodeSampler": "sampler", "SuperpixelEpisodeSampler": "sampler", "MixedSampler": "sampler",
    "load_support": "materialise", "load_query": "materialise",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
