"""Split-CIFAR-100: 32x32 colour images, 100 fine classes, 50000 train / 10000 test.

Source: the official "CIFAR-100 python version" archive by Alex Krizhevsky
(https://www.cs.toronto.edu/~kriz/cifar.html), extracted to ``cifar-100-python/{train,test,meta}``.
Those files are Python 2 pickles; they are read with a restricted unpickler that only builds
numpy arrays and plain containers, never arbitrary objects.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cl_bench.errors import OFFLINE_HINT, UserError
from cl_bench.scenarios._scenario import ClassIncrementalScenario
from cl_bench.scenarios.base import Samples, file_digest

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
CACHE_DIR = Path("~/.cache/cl_bench/data")
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"  # the official archive and its md5
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """Whether the environment says there is no network (the Hugging Face offline variables)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as Python 3 pickles (protocol < 3) use it for bytes, limited to latin-1."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as latin-1 bytes")
    return codecs.encode(text, "latin-1", errors)


# The only globals a CIFAR pickle may reference: numpy array/dtype/scalar reconstruction (numpy 1.x
# wrote numpy.core.*, numpy 2.x writes numpy._core.*) and the latin-1 bytes helper of Python 3.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR files contain; any other global is refused with UserError."""

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f"refusing to unpickle {module}.{name} from {self.path}: not CIFAR data") from None

    def persistent_load(self, pid):
        raise UserError(f"refusing to unpickle a persistent id from {self.path}: not CIFAR data")


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (the official files have Python 2 byte-string keys)."""
    try:
        with open(path, "rb") as handle:
            obj = CifarUnpickler(handle, path).load()
    except UserError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise UserError(f"cannot read {path} as a CIFAR pickle: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not CIFAR data: expected a dict, found {type(obj).__name__}")
    return {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in obj.items()}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def find_folder(directory: Path) -> Path | None:
    """``directory/cifar-100-python`` or ``directory`` itself, whichever holds train, test and meta."""
    for folder in (directory / FOLDER, directory):
        if all((folder / name).is_file() for name in FILES):
            return folder
    return None


class CIFAR100(ClassIncrementalScenario):
    """Split-CIFAR-100 (Krizhevsky, 2009) from the official python archive: uint8 (N, 3, 32, 32), fine labels."""

    description = "Split-CIFAR-100: 32x32 colour images, 100 classes (official python archive)"
    default_model = "resnet18"

    def __init__(self, *, root: str | None = None, download: bool | str = "auto",
                 increment: int = 10, **split):
        """``download``: ``auto`` fetches the archive when it is not found, unless the environment is
        offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``); ``true`` always may; ``false`` never."""
        super().__init__(increment=increment, **split)
        if download not in (True, False, "auto"):
            raise UserError(f"scenario.download must be auto, true or false, got {download!r}")
        self.root, self.download = root, download

    def locate(self) -> Path:
        directory = Path(self.root).expanduser() if self.root is not None else CACHE_DIR.expanduser()
        folder = find_folder(directory)
        may_download = self.download is True or (self.download == "auto" and not offline())
        if folder is None and may_download:
            self._download(directory)
            folder = find_folder(directory)
        if folder is None:
            why = "downloads are off (scenario.download=false)" if self.download is False else (
                "the environment is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if not may_download
                else "the downloaded archive does not hold it")
            raise UserError(
                f"CIFAR-100 not found in {directory} (need {FOLDER}/train, test and meta: the official python "
                f"archive from https://www.cs.toronto.edu/~kriz/cifar.html, extracted) and {why}; "
                f"{OFFLINE_HINT}; with a network, scenario.download=true fetches it")
        return folder

    @staticmethod
    def _download(directory: Path) -> None:
        """The official archive from ``URL`` into ``directory``: md5-checked, then extracted with tarfile's
        ``data`` filter (no paths outside ``directory``, no links out, no device files)."""
        directory.mkdir(parents=True, exist_ok=True)
        archive = directory / URL.rsplit("/", 1)[-1]
        partial = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(URL, timeout=60) as response, open(partial, "wb") as handle:
                shutil.copyfileobj(response, handle, 1 << 20)
            digest = hashlib.md5(partial.read_bytes()).hexdigest()
            if digest != ARCHIVE_MD5:
                raise ValueError(f"md5 {digest}, expected {ARCHIVE_MD5}")
            partial.replace(archive)
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(directory, filter="data")
        except (OSError, ValueError, tarfile.TarError) as exc:  # urllib's errors are OSErrors
            raise UserError(f"downloading CIFAR-100 from {URL} into {directory} failed "
                            f"({' '.join(str(exc).split())}); {OFFLINE_HINT}") from None
        finally:
            partial.unlink(missing_ok=True)

    @staticmethod
    def _split(path: Path) -> Samples:
        batch = load_pickle(path)
        data, labels = batch.get("data"), batch.get("fine_labels")
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[1] != 3 * 32 * 32):
            raise UserError(f"{path} is not CIFAR data: 'data' must be a uint8 array of 3072-byte rows")
        if labels is None or len(labels) != len(data):
            raise UserError(f"{path} is not CIFAR-100 data: 'fine_labels' missing or not one per image")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= 100):
            raise UserError(f"{path} has fine labels outside 0..99")
        images = data.reshape(-1, 3, 32, 32)  # each row: 1024 red, 1024 green, 1024 blue bytes
        if not (images.flags.writeable and images.flags.c_contiguous):
            images = images.copy()
        return Samples(torch.from_numpy(images), torch.from_numpy(labels))

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        folder = self.locate()
        meta = load_pickle(folder / "meta")
        names = meta.get("fine_label_names")
        if not isinstance(names, list) or len(names) != 100:
            raise UserError(f"{folder / 'meta'} is not CIFAR-100 meta data: need 100 'fine_label_names'")
        train, test = self._split(folder / "train"), self._split(folder / "test")
        provenance = {
            "source": "CIFAR-100 python version (Krizhevsky, 2009)",
            "data_dir": str(folder),
            "files": {name: file_digest(folder / name) for name in FILES},
        }
        return train, test, [_text(n) for n in names], provenance
