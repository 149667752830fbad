"""Data layer: NIfTI readers, normalisation, slice preparation, augmentation and superpixel pseudo-labels.

Importing this package imports numpy, scipy, scikit-image and torch; nibabel (the NIfTI reader) is imported when a
file is first read. The synthetic phantom generator lives in ``fewshot_proto.data.phantom``.
"""
from __future__ import annotations

from fewshot_proto.data.augment import augment_pair, random_coordinate_map
from fewshot_proto.data.dataset import InMemoryDataset, VolumeDataset, build_slice_index, slice_index_from_labels
from fewshot_proto.data.normalise import ct_window, dataset_stats, normalise_volume, zscore
from fewshot_proto.data.readers import (
    AlpnetDataset,
    MSDDataset,
    NiftiDataset,
    dataset_from_config,
    default_cache_dir,
    detect_layout,
    open_dataset,
    read_volume,
    write_prediction,
    write_probability,
)
from fewshot_proto.data.superpixel import body_mask, superpixel_pseudolabel, superpixels
from fewshot_proto.data.transforms import prepare_slices, resize_mask, resize_slice, to_channels

__all__ = [
    "VolumeDataset",
    "InMemoryDataset",
    "NiftiDataset",
    "AlpnetDataset",
    "MSDDataset",
    "open_dataset",
    "dataset_from_config",
    "detect_layout",
    "default_cache_dir",
    "write_prediction",
    "write_probability",
    "read_volume",
    "build_slice_index",
    "slice_index_from_labels",
    "zscore",
    "ct_window",
    "dataset_stats",
    "normalise_volume",
    "resize_slice",
    "resize_mask",
    "to_channels",
    "prepare_slices",
    "augment_pair",
    "random_coordinate_map",
    "superpixels",
    "superpixel_pseudolabel",
    "body_mask",
]
