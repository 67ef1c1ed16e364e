"""VTAB for pretrained-model class-incremental learning: 50 classes taken from five VTAB datasets,
a cross-domain stream.

Data: Zhai et al., "A Large-scale Study of Representation Learning with the Visual Task Adaptation
Benchmark" (arXiv 1910.04867), the 50-class subset and train/test split packaged by APER (Zhou et al.,
arXiv 2303.07338; archive ``vtab.zip``, md5 a9c37bde6105a2516c900b0c33a437c1) and read by LAMDA-PILOT
from ``data/vtab-cil/vtab/{train,test}``. The authors do not shuffle VTAB's classes: the default
``order_seed`` is None, which keeps the sorted folder order as their code does.
Papers' setting: B0-Inc10 (``scenarios/vtab_b0_inc10.yaml``).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class VTAB(ImageFolderScenario):
    """VTAB (APER 50-class split) in natural class order as uint8 (N, 3, 224, 224) images; see ``_image_folder``."""

    description = "VTAB: 50 classes from five VTAB datasets in natural order (APER split), for pretrained ViTs"
    title = "VTAB"
    folders = ("vtab-cil/vtab", "vtab")
    expected_classes = 50
    source = "VTAB (Zhai et al., 2019), APER 50-class train/test split"

    def __init__(self, *, increment: int = 10, order_seed: int | None = None, **split):
        super().__init__(increment=increment, order_seed=order_seed, **split)
