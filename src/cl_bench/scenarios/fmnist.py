"""Split-Fashion-MNIST: Zalando's 28x28 grey clothing images, 10 classes, 60000 train / 10000 test.

Source: the four IDX files published by Zalando Research (https://github.com/zalandoresearch/fashion-mnist),
read from ``root`` when given, otherwise from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), otherwise downloaded through torchvision when
``download=true``.
"""
from __future__ import annotations

import gzip
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import ClassIncrementalScenario
from cl_bench.scenarios.base import Samples, file_digest

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {  # role -> (file name without .gz, IDX magic number)
    "train_images": ("train-images-idx3-ubyte", 2051),
    "train_labels": ("train-labels-idx1-ubyte", 2049),
    "test_images": ("t10k-images-idx3-ubyte", 2051),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049),
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/cl_bench/data")
FILE_LIST = ", ".join(f"{name}.gz" for name, _ in FILES.values())


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped) as a numpy array; UserError when it is not one."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc} (corrupt or truncated file?)") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise UserError(f"{path} is not an IDX file with magic number {magic} (found {found}): "
                        "corrupt or wrong file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated: its IDX header is incomplete")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    if len(data) - header != int(np.prod(dims)):
        raise UserError(f"{path} holds {len(data) - header} data bytes but its IDX header "
                        f"promises {int(np.prod(dims))} for shape {tuple(dims)}: corrupt or truncated file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_files(directory: Path) -> dict[str, Path] | None:
    """The four files in ``directory`` or its torchvision layout FashionMNIST/raw/ (gzipped preferred)."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        found = {}
        for role, (name, _) in FILES.items():
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def debian_dirs() -> list[Path]:
    """Where the Debian package put its files (asks dpkg when it exists), then the usual path."""
    dirs = []
    if shutil.which("dpkg"):
        try:
            listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True,
                                     timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            if line.strip().endswith("-ubyte.gz"):
                folder = Path(line.strip()).parent
                if folder not in dirs:
                    dirs.append(folder)
    if DEBIAN_DIR not in dirs:
        dirs.append(DEBIAN_DIR)
    return dirs


class FashionMNIST(ClassIncrementalScenario):
    """Split-Fashion-MNIST (Zalando Research): uint8 (N, 1, 28, 28) images, default 5 tasks of 2 classes."""

    description = "Split-Fashion-MNIST: 28x28 grey clothing images, 10 classes (Debian dataset-fashion-mnist)"
    default_model = "efficientnet_lite0"

    def __init__(self, *, root: str | None = None, download: bool = False, **split):
        super().__init__(**split)
        self.root, self.download = root, bool(download)

    def locate(self) -> dict[str, Path]:
        """The four files: only ``root`` when given, else the Debian package, else the download cache."""
        if self.root is not None:
            searched = [Path(self.root).expanduser()]
        else:
            searched = debian_dirs() + [CACHE_DIR.expanduser()]
        for directory in searched:
            found = find_files(directory)
            if found:
                return found
        if self.download:
            target = searched[0] if self.root is not None else CACHE_DIR.expanduser()
            self._download(target)
            found = find_files(target)
            if found:
                return found
            raise UserError(f"downloaded Fashion-MNIST into {target} but the four IDX files are not there")
        if self.root is not None:
            raise UserError(
                f"Fashion-MNIST not found in {self.root} (need {FILE_LIST}, gzipped or not, there or in "
                "FashionMNIST/raw/); put the four files there, set scenario.download=true with a network, "
                f"or drop scenario.root and run `apt-get install {DEBIAN_PACKAGE}` (Debian)")
        raise UserError(
            f"Fashion-MNIST not found (looked in {', '.join(str(d) for d in searched)}); get it with "
            f"`apt-get install {DEBIAN_PACKAGE}` (Debian), or pass scenario.root=DIR with the four files "
            f"{FILE_LIST}, or set scenario.download=true with a network")

    @staticmethod
    def _download(target: Path) -> None:
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
        except ImportError:
            raise UserError("scenario.download=true needs torchvision (pip install torchvision)") from None
        try:
            TorchvisionFashionMNIST(str(target), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            message = " ".join(str(exc).split())
            raise UserError(f"downloading Fashion-MNIST into {target} failed: {message}") from None

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        files = self.locate()
        arrays = {role: read_idx(path, FILES[role][1]) for role, path in files.items()}
        parts = []
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if len(images) != len(labels):
                raise UserError(f"{files[f'{split}_images']} has {len(images)} images but "
                                f"{files[f'{split}_labels']} has {len(labels)} labels")
            if labels.size and labels.max() >= len(CLASS_NAMES):
                raise UserError(f"{files[f'{split}_labels']} has label {labels.max()}; Fashion-MNIST has 10 classes")
            parts.append(Samples(torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))))
        provenance = {
            "source": "Fashion-MNIST IDX files (Zalando Research)",
            "data_dir": str(files["train_images"].parent),
            "files": {path.name: file_digest(path) for path in files.values()},
        }
        return parts[0], parts[1], list(CLASS_NAMES), provenance
