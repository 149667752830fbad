"""Frozen evaluation episodes: JSON manifests that make every method see the same episodes.

A manifest file holds the episodes of one (dataset, protocol, setting, test classes, shots, n_part) for one or
more folds::

    {
      "format": 1,
      "generator_version": 1,
      "created_by": "fewshot_proto 0.1.0",
      "dataset": "chaos_t2",
      "dataset_fingerprint": "sha256:...",      # hash of the dataset's SliceIndex (labels only)
      "protocol": "alpnet",
      "folds": [0, 1, 2, 3, 4],
      "n_folds": 5,
      "setting": 2,
      "shots": 1,
      "n_part": 3,
      "test_classes": [2, 3],
      "seed": null,                              # the protocols are deterministic: no randomness is used
      "episodes": [{...EpisodeSpec.to_dict()...}, ...]   # one line per episode
    }

``verify_manifest`` regenerates the episodes from the current data and fails, listing every difference, when
the data changed (fingerprint) or the generator would now produce different episodes.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fewshot_proto import __version__
from fewshot_proto.config import N_PART
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import SliceIndex

from .protocol import GENERATOR_VERSION, EpisodeSpec, build_eval_episodes

__all__ = ["MANIFEST_FORMAT", "Manifest", "fingerprint", "freeze", "save_manifest", "load_manifest",
           "verify_manifest", "manifest_mismatches"]

MANIFEST_FORMAT = 1

_KEYS = ("format", "generator_version", "created_by", "dataset", "dataset_fingerprint", "protocol", "folds",
         "n_folds", "setting", "shots", "n_part", "test_classes", "seed", "episodes")


def fingerprint(index: SliceIndex) -> str:
    """``"sha256:<hex>"`` of the SliceIndex's canonical JSON (sorted keys): changes whenever a label does."""
    blob = json.dumps(index.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _created_by() -> str:
    return f"fewshot_proto {__version__}"


@dataclass
class Manifest:
    """The contents of a manifest file (see the module docstring)."""

    dataset: str
    dataset_fingerprint: str
    protocol: str
    folds: List[int]
    n_folds: int
    setting: int
    shots: int
    n_part: int
    test_classes: List[int]
    episodes: List[EpisodeSpec]
    seed: Optional[int] = None
    generator_version: int = GENERATOR_VERSION
    created_by: str = field(default_factory=_created_by)
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "format": int(self.format),
            "generator_version": int(self.generator_version),
            "created_by": self.created_by,
            "dataset": self.dataset,
            "dataset_fingerprint": self.dataset_fingerprint,
            "protocol": self.protocol,
            "folds": [int(f) for f in self.folds],
            "n_folds": int(self.n_folds),
            "setting": int(self.setting),
            "shots": int(self.shots),
            "n_part": int(self.n_part),
            "test_classes": [int(c) for c in self.test_classes],
            "seed": self.seed,
            "episodes": [e.to_dict() for e in self.episodes],
        }
        return d

    def episodes_of(self, fold: Optional[int] = None, class_id: Optional[int] = None) -> List[EpisodeSpec]:
        """The episodes of one fold and/or class."""
        return [e for e in self.episodes
                if (fold is None or e.fold == fold) and (class_id is None or e.class_id == class_id)]

    def summary(self) -> str:
        tc = ",".join(map(str, self.test_classes))
        return (f"{self.dataset} {self.protocol} setting {self.setting} test classes {tc} {self.shots}-shot "
                f"n_part {self.n_part} folds {self.folds}/{self.n_folds}: {len(self.episodes)} episodes")


def freeze(index: SliceIndex, protocol: str = "alpnet", folds: Sequence[int] = (0, 1, 2, 3, 4), n_folds: int = 5,
           setting: int = 2, test_classes: Sequence[int] = (2, 3), shots: int = 1, n_part: int = N_PART) -> Manifest:
    """Build the episodes of ``folds`` and wrap them with their provenance in a :class:`Manifest`."""
    folds = [int(f) for f in folds]
    if not folds:
        raise ProtocolError("freeze: no folds given")
    if len(set(folds)) != len(folds):
        raise ProtocolError(f"freeze: duplicate folds {folds}")
    episodes: List[EpisodeSpec] = []
    for f in folds:
        episodes += build_eval_episodes(index, protocol=protocol, fold=f, n_folds=n_folds, shots=shots,
                                        n_part=n_part, test_classes=test_classes, setting=setting)
    return Manifest(dataset=index.dataset, dataset_fingerprint=fingerprint(index), protocol=protocol, folds=folds,
                    n_folds=int(n_folds), setting=int(setting), shots=int(shots), n_part=int(n_part),
                    test_classes=[int(c) for c in test_classes], episodes=episodes)


def _dumps(m: Manifest) -> str:
    """Pretty but compact: one top-level key per line, one episode per line, stable key order."""
    d = m.to_dict()
    lines = ["{"]
    keys = list(d)
    for i, k in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        if k == "episodes":
            eps = d[k]
            if not eps:
                lines.append(f'  "episodes": []{comma}')
                continue
            lines.append('  "episodes": [')
            for j, e in enumerate(eps):
                lines.append("    " + json.dumps(e, separators=(", ", ": ")) + ("," if j < len(eps) - 1 else ""))
            lines.append("  ]" + comma)
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(d[k], separators=(', ', ': '))}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_manifest(manifest: Manifest, path: Path | str) -> Path:
    """Write ``manifest`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(manifest)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_manifest(path: Path | str) -> Manifest:
    """Read a manifest file.

    Raises:
        ProtocolError: the file is missing, not JSON, of another format version, or lacks keys; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"manifest {path} does not exist")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError(f"manifest {path}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != MANIFEST_FORMAT:
        raise ProtocolError(
            f"manifest {path}: format {d.get('format')!r} is not supported (this fewshot_proto reads format "
            f"{MANIFEST_FORMAT}); regenerate it with `python -m fewshot_proto.episodes freeze`"
        )
    missing = [k for k in _KEYS if k not in d]
    if missing:
        raise ProtocolError(f"manifest {path}: missing key(s) {missing}")
    if not isinstance(d["episodes"], list):
        raise ProtocolError(f"manifest {path}: 'episodes' must be a list")
    episodes = []
    for i, e in enumerate(d["episodes"]):
        try:
            episodes.append(EpisodeSpec.from_dict(e))
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"manifest {path}: episode {i} is malformed: {err!r}") from None
    try:
        return Manifest(
            dataset=str(d["dataset"]), dataset_fingerprint=str(d["dataset_fingerprint"]), protocol=str(d["protocol"]),
            folds=[int(f) for f in d["folds"]], n_folds=int(d["n_folds"]), setting=int(d["setting"]),
            shots=int(d["shots"]), n_part=int(d["n_part"]), test_classes=[int(c) for c in d["test_classes"]],
            episodes=episodes, seed=None if d["seed"] is None else int(d["seed"]),
            generator_version=int(d["generator_version"]), created_by=str(d["created_by"]), format=int(d["format"]),
        )
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"manifest {path}: bad value: {err}") from None


def _describe(e: Optional[EpisodeSpec]) -> str:
    if e is None:
        return "absent"
    sup = "; ".join(f"{s}:{zs}" for s, zs in e.support)
    return f"support [{sup}], {len(e.query_z)} query slices {e.query_z[:1]}..{e.query_z[-1:]}"


def manifest_mismatches(manifest: Manifest, index: SliceIndex, max_listed: int = 50) -> List[str]:
    """Every way ``manifest`` differs from what the current data and generator give (empty list: identical)."""
    out: List[str] = []
    if manifest.dataset != index.dataset:
        out.append(f"dataset name: manifest {manifest.dataset!r}, data {index.dataset!r}")
    fp = fingerprint(index)
    if manifest.dataset_fingerprint != fp:
        out.append(f"dataset fingerprint: manifest {manifest.dataset_fingerprint}, data {fp} (labels changed)")
    if manifest.generator_version != GENERATOR_VERSION:
        out.append(f"generator version: manifest {manifest.generator_version}, this code {GENERATOR_VERSION}")
    try:
        fresh = freeze(index, protocol=manifest.protocol, folds=manifest.folds, n_folds=manifest.n_folds,
                       setting=manifest.setting, test_classes=manifest.test_classes, shots=manifest.shots,
                       n_part=manifest.n_part)
    except ProtocolError as e:
        out.append(f"cannot regenerate episodes from the data: {e}")
        return out
    old = {e.key: e for e in manifest.episodes}
    new = {e.key: e for e in fresh.episodes}
    if len(old) != len(manifest.episodes):
        out.append("manifest has duplicate (fold, class, query scan) episodes")
    diffs = []
    for key in sorted(set(old) | set(new), key=lambda k: (k[0], k[1], k[2])):
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None and a.to_dict() == b.to_dict():
            continue
        fold, cls, scan = key
        if a is None or b is None:
            diffs.append(f"episode fold {fold} class {cls} query {scan!r}: manifest {_describe(a)}; "
                         f"regenerated {_describe(b)}")
            continue
        fields = [k for k in a.to_dict() if a.to_dict()[k] != b.to_dict()[k]]
        diffs.append(f"episode fold {fold} class {cls} query {scan!r}: {', '.join(fields)} differ "
                     f"(manifest {_describe(a)}; regenerated {_describe(b)})")
    if len(diffs) > max_listed:
        diffs = diffs[:max_listed] + [f"... and {len(diffs) - max_listed} more differing episodes"]
    return out + diffs


def verify_manifest(manifest: Manifest, index: SliceIndex, source: Optional[str | Path] = None) -> None:
    """Raise :class:`ProtocolError` listing every mismatch between ``manifest`` (read from file ``source``, named in
    the message) and ``index``; else return."""
    problems = manifest_mismatches(manifest, index)
    if problems:
        name = f"manifest {source} ({manifest.summary()})" if source is not None else f"manifest ({manifest.summary()})"
        raise ProtocolError(f"{name} does not match the data: " + "; ".join(problems))
