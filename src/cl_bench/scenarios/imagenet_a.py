"""ImageNet-A for pretrained-model class-incremental learning: 200 ImageNet classes, natural images
that ImageNet classifiers get wrong (7,500 images in all).

Data: Hendrycks et al., "Natural Adversarial Examples" (CVPR 2021, arXiv 1907.07174), in the train/test
split packaged by APER (Zhou et al., arXiv 2303.07338; archive ``ina.zip``, md5
7f4aaf0b1532b7a0bd670822c152d3c5) and read by LAMDA-PILOT from ``data/imagenet-a/{train,test}``.
Papers' setting: B0-Inc20 with class order seed 1993 (``scenarios/imagenet_a_b0_inc20.yaml``).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class ImageNetA(ImageFolderScenario):
    """ImageNet-A (APER split) as uint8 (N, 3, 224, 224) images; see ``_image_folder`` for storage."""

    description = "ImageNet-A: 200 classes of adversarially hard natural images (APER split), for pretrained ViTs"
    title = "ImageNet-A"
    folders = ("imagenet-a", "ina")
    expected_classes = 200
    source = "ImageNet-A (Hendrycks et al., 2021), APER train/test split"

    def __init__(self, *, increment: int = 20, **split):
        super().__init__(increment=increment, **split)
