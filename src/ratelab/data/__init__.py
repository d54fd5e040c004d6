"""Datasets by name: ``build_dataset(name, split, ...)`` and ``list_datasets()``.

Registered: ``digits`` (scikit-learn 8x8 digits), ``shapes`` (synthetic shapes with masks and captions),
``shapes_cluttered`` (several objects of one class among distractors on textures, exact masks), ``imagefolder``
(``root/<split>/<class>/*.png``), ``cifar10`` and ``cifar100`` (official python pickles); for segmentation
evaluation ``voc`` (a VOCdevkit; items ``(image, mask)``, 255 = ignore) and ``coco`` (a COCO instances file; items
``(image, image_id)``); image-caption pairs ``shapes_captions``, ``caption_folder`` (sidecar .txt or a CSV/JSONL
index) and ``caption_wds`` (WebDataset tar shards), items ``(image, caption)`` (:mod:`ratelab.data.captions`).
Classification items are ``(image, label)``: a normalized float32 ``(C, H, W)`` tensor and an ``int``.
"""

from ratelab.data import captions, cifar, coco, digits, folder, shapes, voc  # noqa: F401  (registers the datasets)
from ratelab.data.common import ImageDataset, stratified_split
from ratelab.data.registry import build_dataset, dataset_options, list_datasets, register_dataset

__all__ = ["ImageDataset", "build_dataset", "dataset_options", "list_datasets", "register_dataset", "stratified_split"]
