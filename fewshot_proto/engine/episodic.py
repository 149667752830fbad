"""Episodic (few-shot) training: the sampler of ``cfg.episodes``, the episode loss and the trainer's task.

One step draws one training episode (:func:`build_training_sampler`: labelled, superpixel or mixed episodes
from the fold's training scans under the protocol's setting; item ``i`` drawn by
:class:`~fewshot_proto.engine.stream.EpisodeSource`) and computes :func:`episode_losses` (weighted CE, plus
Dice, alignment and cyclic terms when their weights are positive). :class:`EpisodicTask` is what
:func:`fewshot_proto.engine.trainer.train` runs for models of ``kind == "fewshot"``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from fewshot_proto.config import ExperimentConfig
from fewshot_proto.engine.stream import EpisodeSource, episode_to_tensors
from fewshot_proto.episodes.protocol import training_slices
from fewshot_proto.episodes.sampler import (LabelledEpisodeSampler, MixedSampler, SliceCache,
                                            SuperpixelEpisodeSampler)
from fewshot_proto.errors import ConfigError
from fewshot_proto.losses import alignment_loss, cyclic_consistency_loss, dice_loss, weighted_cross_entropy

__all__ = ["build_training_sampler", "episode_losses", "EpisodicTask"]


def build_training_sampler(cfg: ExperimentConfig, dataset, index, train_scans: List[str]):
    """The training episode sampler the config asks for (labelled, superpixel or a mix)."""
    p, e = cfg.protocol, cfg.episodes
    test = [int(c) for c in p.test_classes]
    train_classes = [c for c in index.classes if c not in test]
    rng = np.random.default_rng(cfg.train.seed)
    cache = SliceCache(dataset, cfg.data.size)  # one for both parts of a mixed sampler: each slice resized once

    def labelled():
        if not train_classes:
            raise ConfigError(f"no training classes left in dataset {index.dataset!r} once test classes {test} are "
                              f"held out (classes: {index.classes})")
        return LabelledEpisodeSampler(dataset, index, train_scans, train_classes, setting=p.setting,
                                      test_classes=test, shots=e.shots, n_query=e.n_query, size=cfg.data.size,
                                      augment=e.augment, rng=rng, min_fg_pixels=e.min_fg_pixels, cache=cache)

    def superpixel():
        allowed = {s: training_slices(index, s, p.setting, test) for s in train_scans}
        return SuperpixelEpisodeSampler(dataset, train_scans, allowed, size=cfg.data.size, rng=rng,
                                        shots=e.shots, n_query=e.n_query, augment=e.augment,
                                        superpixel_kwargs={"scale": e.superpixel_scale}, cache=cache)

    if e.mode == "labelled":
        return labelled()
    if e.mode == "superpixel":
        return superpixel()
    if e.mode == "mixed":
        return MixedSampler([superpixel(), labelled()], [e.superpixel_prob, 1 - e.superpixel_prob], rng=rng)
    raise ConfigError(f"episodes.mode must be labelled, superpixel or mixed, not {e.mode!r}")


def episode_losses(model, s_img, s_mask, q_img, q_mask, *, lambda_align: float, lambda_cyc: float,
                   ce_weights: Optional[List[float]] = None, lambda_dice: float = 0.0) -> Dict[str, torch.Tensor]:
    """Forward one episode and return the loss terms ({"loss", "ce", "dice", "align", "cyc"}; a term whose weight
    is 0 is not computed, nor are the alignment and cyclic terms for a model whose outputs carry no features).

    ``model``: a ``FewShotSegmenter`` (or DDP around one)."""
    core = model.module if hasattr(model, "module") else model
    out = model(s_img, s_mask, q_img)
    weight = torch.tensor(ce_weights, device=out.logits.device, dtype=torch.float32) if ce_weights else None
    ce = weighted_cross_entropy(out.logits.float(), q_mask, weight=weight)
    terms = {"ce": ce}
    loss = ce
    if lambda_dice > 0:
        dl = dice_loss(out.logits.float(), q_mask, softmax=True, include_background=False)
        terms["dice"] = dl
        loss = loss + lambda_dice * dl
    has_feats = out.query_feats is not None and out.support_feats is not None
    if lambda_align > 0 and has_feats:
        al = alignment_loss(out.query_feats[-1], out.logits, out.support_feats[-1], s_mask)
        terms["align"] = al
        loss = loss + lambda_align * al
    if lambda_cyc > 0 and has_feats and core.feature_losses:
        cy = cyclic_consistency_loss(core, s_img, s_mask, q_img, out.logits, query_feats=out.query_feats,
                                     support_feats=out.support_feats)
        terms["cyc"] = cy
        loss = loss + lambda_cyc * cy
    terms["loss"] = loss
    return terms


class EpisodicTask:
    """Few-shot training: one episode per step, CE (+ Dice, + alignment, + cyclic) loss (:func:`episode_losses`)."""

    kind = "fewshot"

    def __init__(self, cfg: ExperimentConfig, sampler, device: torch.device, rank: int) -> None:
        self.t = cfg.train
        # the log's columns; "dice" only when it is trained, so runs (and resumed logs) without it keep their columns
        self.loss_fields = ["loss", "ce", *(["dice"] if self.t.lambda_dice > 0 else []), "align", "cyc"]
        self.device = device
        self.source = EpisodeSource(sampler, seed=cfg.train.seed, rank=rank)
        self.labelled_scans: Optional[List[str]] = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward the step calls (DDP wraps this)."""
        return model

    def losses(self, train_model: torch.nn.Module, ep) -> Dict[str, torch.Tensor]:
        s_img, s_mask, q_img, q_mask = episode_to_tensors(ep, self.device, self.t.channels_last)
        return episode_losses(train_model, s_img, s_mask, q_img, q_mask, lambda_align=self.t.lambda_align,
                              lambda_cyc=self.t.lambda_cyc, ce_weights=self.t.ce_weights,
                              lambda_dice=self.t.lambda_dice)

    @staticmethod
    def describe(ep) -> str:
        return f"episode {ep.meta}"
