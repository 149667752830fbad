"""Prototype operations shared by the models (and by the alignment loss): pooling, prototype bags, scores, CWPA and
the matcher head. Importing this package registers nothing.

* ``pooling``: ``masked_average_pool``, ``bilinear_adjoint``
* ``scores``: ``SCALER``, ``ClassPrototypes``, ``class_score``, ``class_scores``, ``cosine_logits``
* ``alp``: ``panet_prototypes``, ``alpnet_prototypes``
* ``cwpa``: correlation-weighted prototype aggregation (``CWPA``), DESIGN.md section 3
* ``matcher``: ``MatcherHead``, the ALPNet-style matcher of ``cwpa_unet_matcher``
"""
from __future__ import annotations

from fewshot_proto.models.heads.alp import alpnet_prototypes, panet_prototypes
from fewshot_proto.models.heads.cwpa import CWPA
from fewshot_proto.models.heads.matcher import MatcherHead
from fewshot_proto.models.heads.pooling import bilinear_adjoint, masked_average_pool
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes, class_score, class_scores, cosine_logits

__all__ = ["SCALER", "ClassPrototypes", "CWPA", "MatcherHead", "alpnet_prototypes", "bilinear_adjoint", "class_score",
           "class_scores", "cosine_logits", "masked_average_pool", "panet_prototypes"]
