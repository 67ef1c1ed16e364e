"""ObjectNet for pretrained-model class-incremental learning: 200 object classes photographed with
controlled rotation, background and viewpoint.

Data: Barbu et al., "ObjectNet: A large-scale bias-controlled dataset for pushing the limits of object
recognition models" (NeurIPS 2019), the 200-class subset and train/test split packaged by APER (Zhou et al.,
arXiv 2303.07338; archive ``objnet.tgz``, md5 63ff7443a47bd682016a8ec59b8cc1bc) and read by LAMDA-PILOT
from ``data/objectnet/{train,test}``. Papers' setting: B0-Inc10 with class order seed 1993
(``scenarios/objectnet_b0_inc10.yaml``; the MOS configuration files and logs use Inc20).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class ObjectNet(ImageFolderScenario):
    """ObjectNet (APER 200-class split) as uint8 (N, 3, 224, 224) images; see ``_image_folder`` for storage."""

    description = "ObjectNet: 200 object classes under controlled pose and background (APER split), for pretrained ViTs"
    title = "ObjectNet"
    folders = ("objectnet", "objnet")
    expected_classes = 200
    source = "ObjectNet (Barbu et al., 2019), APER 200-class train/test split"

    def __init__(self, *, increment: int = 10, **split):
        super().__init__(increment=increment, **split)
