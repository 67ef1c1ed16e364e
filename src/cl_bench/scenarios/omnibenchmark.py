"""OmniBenchmark for pretrained-model class-incremental learning: 300 classes sampled across the
realms of OmniBenchmark's concept hierarchy.

Data: Zhang et al., "Benchmarking Omni-Vision Representation through the Lens of Visual Realms"
(ECCV 2022, arXiv 2207.07106), the 300-class subset and train/test split packaged by APER (Zhou et al.,
arXiv 2303.07338; archive ``omnibenchmark.zip``, md5 f1c30808a707f9197c6c811ea52e5cbb) and read by
LAMDA-PILOT from ``data/omnibenchmark/{train,test}``. Its class folders are numbered, without names.
Papers' setting: B0-Inc30 with class order seed 1993 (``scenarios/omnibenchmark_b0_inc30.yaml``).
The largest of these sets: every image takes 150 KB of memory at 224 px (``image_size`` lowers it).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class OmniBenchmark(ImageFolderScenario):
    """OmniBenchmark (APER 300-class split) as uint8 (N, 3, 224, 224) images; see ``_image_folder``."""

    description = "OmniBenchmark: 300 classes across visual realms (APER split), for pretrained ViTs"
    title = "OmniBenchmark"
    folders = ("omnibenchmark",)
    expected_classes = 300
    source = "OmniBenchmark (Zhang et al., 2022), APER 300-class train/test split"

    def __init__(self, *, increment: int = 30, **split):
        super().__init__(increment=increment, **split)
