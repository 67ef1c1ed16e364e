"""Class-incremental scenarios read from ``train/<class>/<image>`` and ``test/<class>/<image>`` folders.

This is the layout of the splits packaged for pretrained-model class-incremental learning by
Zhou et al. (APER, "Revisiting Class-Incremental Learning with Pre-Trained Models", arXiv 2303.07338;
https://github.com/zhoudw-zdw/RevisitingCIL#dataset), which LAMDA-PILOT reads with torchvision's
``ImageFolder``. Classes are the sub-folders in sorted (string) order and images are found the way
``ImageFolder`` finds them, so class ids match the authors' code.

Every image is decoded once with PIL, converted to RGB and stored as uint8 (3, S, S), S =
``image_size``, with the authors' test transform: bicubic resize of the shorter side to
``int(256 / 224 * S)`` then a centre crop of S. The arrays are cached in
``~/.cache/cl_bench/data/<name>-<hash of the file list and sizes>-<S>.pt`` (read with
``weights_only=True``), so later runs skip decoding. Memory: 150 KB per image at S = 224.
"""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cl_bench._io import atomic_torch_save
from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import ClassIncrementalScenario
from cl_bench.scenarios.base import Samples

# torchvision's ImageFolder extensions, compared case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_DIR = Path("~/.cache/cl_bench/data")
CACHE_FORMAT = 1  # bump when the stored arrays change meaning
SPLITS = ("train", "test")


def list_images(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders) and (image path, class index) pairs, as ImageFolder lists them."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    images = []
    for index, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(folder / name, followlinks=True)):
            images += [(Path(directory) / f, index) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, images


def decode(path: Path, size: int) -> np.ndarray:
    """The image at ``path`` as uint8 (3, size, size): the authors' test transform (Resize(int(256/224*size),
    bicubic) + CenterCrop(size), with torchvision's size and offset rounding), without ToTensor's scaling."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as error:  # PIL raises many types for unreadable files
        raise UserError(f"cannot read image {path}: {type(error).__name__}: {' '.join(str(error).split())}") from None
    return resize_and_crop(image, size)


def resize_and_crop(image, size: int) -> np.ndarray:
    """An RGB PIL image as uint8 (3, size, size) with the test transform above."""
    from PIL import Image

    width, height = image.size
    short = int(256 / 224 * size)
    if width <= height:
        resized = (short, int(short * height / width))
    else:
        resized = (int(short * width / height), short)
    if resized != image.size:
        image = image.resize(resized, Image.BICUBIC)
    left, top = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def decode_all(paths: list[Path], size: int) -> torch.Tensor:
    """All images as one uint8 (N, 3, size, size) tensor (threads: PIL releases the GIL while decoding)."""
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for index, array in enumerate(pool.map(lambda path: decode(path, size), paths)):
            images[index] = array
    return torch.from_numpy(images)


def file_list_digest(folder: Path, classes: list[str], listing: dict, size: int) -> str:
    """A hash of the class names, every image's relative path and byte size, and the storage size."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{classes}".encode())
    for split in SPLITS:
        for path, label in listing[split]:
            digest.update(f"{path.relative_to(folder)}|{path.stat().st_size}|{label}\n".encode())
    return digest.hexdigest()[:16]


class ImageFolderScenario(ClassIncrementalScenario):
    """A dataset in ``root/<folder>/{train,test}/<class>/*.jpg``; subclasses name it (see module docstring).

    Subclasses set ``title`` (for messages), ``folders`` (sub-folder names tried under ``root``, which
    may also hold ``train/`` and ``test/`` itself), ``expected_classes`` and ``source`` (provenance).
    """

    title = ""
    folders: tuple[str, ...] = ()
    expected_classes = 0
    source = ""
    default_model = "vit_b16_in21k"

    def __init__(self, *, root: str | None = None, image_size: int = 224, cache: bool = True,
                 increment: int = 10, **split):
        super().__init__(increment=increment, **split)
        if image_size < 8:
            raise UserError(f"scenario.image_size must be at least 8, got {image_size}")
        self.root, self.image_size, self.cache = root, image_size, bool(cache)

    def locate(self) -> Path:
        directory = Path(self.root).expanduser() if self.root is not None else CACHE_DIR.expanduser()
        for folder in [directory / name for name in self.folders] + [directory]:
            if all((folder / split).is_dir() for split in SPLITS):
                return folder
        raise UserError(
            f"{self.title} not found in {directory}: need {self.folders[0]}/train/<class>/<image>.jpg and "
            f"{self.folders[0]}/test/<class>/<image>.jpg there (or train/ and test/ directly in it), the APER "
            "split from https://github.com/zhoudw-zdw/RevisitingCIL#dataset unpacked; pass scenario.root=DIR")

    def read(self, folder: Path) -> tuple[list[str], dict]:
        """Class names and each split's (path, label) list, checked against each other and the class count."""
        classes, listing = None, {}
        for split in SPLITS:
            names, listing[split] = list_images(folder / split)
            if classes is not None and names != classes:
                different = sorted(set(names) ^ set(classes))[0]  # both lists are sorted: the sets differ
                raise UserError(f"{folder}/train and {folder}/test hold different class folders "
                                f"(first difference: {different})")
            classes = names
            if not listing[split]:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder / split}/<class>/")
        if len(classes) != self.expected_classes:
            raise UserError(f"{folder} holds {len(classes)} class folders in train/ and test/ but {self.title} "
                            f"has {self.expected_classes}: incomplete data or a different dataset")
        return classes, listing

    def decoded(self, folder: Path, classes: list[str], listing: dict) -> tuple[dict, Path | None]:
        """{split: uint8 images}, from the cache when it holds this exact file list."""
        digest = file_list_digest(folder, classes, listing, self.image_size)
        path = CACHE_DIR.expanduser() / f"{self.name}-{digest}-{self.image_size}.pt" if self.cache else None
        if path is not None and path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if all(len(stored[split]) == len(listing[split]) for split in SPLITS):
                    return stored, path
            except Exception:  # a damaged cache file is decoded again
                pass
            path.unlink(missing_ok=True)
        total = sum(len(listing[split]) for split in SPLITS)
        print(f"{self.title}: decoding {total} images once at {self.image_size} px"
              + (f" into {path}" if path is not None else ""), file=sys.stderr)
        images = {split: decode_all([p for p, _ in listing[split]], self.image_size) for split in SPLITS}
        if path is not None:
            atomic_torch_save(path, images)
        return images, path

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        folder = self.locate()
        classes, listing = self.read(folder)
        images, cache_file = self.decoded(folder, classes, listing)
        parts = [Samples(images[split], torch.tensor([label for _, label in listing[split]], dtype=torch.long))
                 for split in SPLITS]
        provenance = {
            "source": self.source,
            "data_dir": str(folder),
            "images": {split: len(listing[split]) for split in SPLITS},
            "storage": f"RGB uint8, bicubic shorter side {int(256 / 224 * self.image_size)}, "
                       f"centre crop {self.image_size}",
            "cache_file": str(cache_file) if cache_file is not None else None,
        }
        return parts[0], parts[1], classes, provenance
