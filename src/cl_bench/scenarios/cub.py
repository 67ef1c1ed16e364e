"""CUB-200-2011 for pretrained-model class-incremental learning: 200 bird species (11,788 images in all).

Data: Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset" (Caltech technical report CNS-TR-2011-001),
in the train/test split packaged by APER (Zhou et al., arXiv 2303.07338; archive ``cub.zip``, md5
85e342a2d5f941e740193602057df7a5) and read by LAMDA-PILOT from ``data/cub/{train,test}``.
Papers' setting: B0-Inc10 with class order seed 1993 (``scenarios/cub_b0_inc10.yaml``).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class CUB(ImageFolderScenario):
    """CUB-200-2011 (APER split) as uint8 (N, 3, 224, 224) images; see ``_image_folder`` for storage."""

    description = "CUB-200-2011: 200 bird species (APER split), for pretrained ViTs"
    title = "CUB-200-2011"
    folders = ("cub",)
    expected_classes = 200
    source = "CUB-200-2011 (Wah et al., 2011), APER train/test split"

    def __init__(self, *, increment: int = 10, **split):
        super().__init__(increment=increment, **split)
