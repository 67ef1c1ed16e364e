"""ImageNet-R for pretrained-model class-incremental learning: 200 ImageNet classes drawn as art,
cartoons, sketches, toys, tattoos and other renditions (30,000 images in all).

Data: Hendrycks et al., "The Many Faces of Robustness" (ICCV 2021, arXiv 2006.16241), in the train/test
split packaged by APER (Zhou et al., arXiv 2303.07338; archive ``imagenet-r.zip``, md5
730aa3fb9c7d2ec0b6381c6b23040681) and read by LAMDA-PILOT from ``data/imagenet-r/{train,test}``.
Papers' setting: B0-Inc20 with class order seed 1993 (``scenarios/imagenet_r_b0_inc20.yaml``).
"""
from __future__ import annotations

from cl_bench.scenarios._image_folder import ImageFolderScenario


class ImageNetR(ImageFolderScenario):
    """ImageNet-R (APER split) as uint8 (N, 3, 224, 224) images; see ``_image_folder`` for storage."""

    description = "ImageNet-R: 200 classes of renditions (APER split), for pretrained ViTs"
    title = "ImageNet-R"
    folders = ("imagenet-r",)
    expected_classes = 200
    source = "ImageNet-R (Hendrycks et al., 2021), APER train/test split"

    def __init__(self, *, increment: int = 20, **split):
        super().__init__(increment=increment, **split)
