"""Scenario data sources and the class-incremental split; everything offline, fixtures generated here."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios import cifar100, fmnist
from cl_bench.scenarios.base import Samples, class_incremental_stream, class_order, split_sizes
from cl_bench.scenarios.cifar100 import CIFAR100
from cl_bench.scenarios.digits import Digits
from cl_bench.scenarios.fmnist import FashionMNIST
from cl_bench.scenarios.toy import Toy
from cl_bench.scenarios.wordnet import LEXNAMES, WordNet


def make(cls, **kwargs):
    """An instance of a scenario class as the registry would name it, without registering it."""
    named = type(cls.__name__, (cls,), {"registered_name": cls.__name__.lower()})
    return named(**kwargs)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- split logic

def test_split_sizes_b0_inc2_and_b50_inc10():
    assert split_sizes(10, 0, 2, "error") == [2, 2, 2, 2, 2]
    assert split_sizes(100, 50, 10, "error") == [50, 10, 10, 10, 10, 10]
    assert split_sizes(100, 0, 10, "error") == [10] * 10


def test_split_sizes_remainder():
    with pytest.raises(UserError) as excinfo:
        split_sizes(10, 0, 3, "error")
    assert "scenario.remainder" in one_line_error(excinfo)
    assert split_sizes(10, 0, 3, "last_task") == [3, 3, 4]
    assert split_sizes(10, 0, 3, "extra_task") == [3, 3, 3, 1]
    assert split_sizes(10, 4, 3, "error") == [4, 3, 3]
    with pytest.raises(UserError):
        split_sizes(10, 0, 2, "lasttask")  # a typo is refused even when nothing is left over
    with pytest.raises(UserError):
        split_sizes(10, 12, 2, "error")
    with pytest.raises(UserError):
        split_sizes(10, 0, 0, "error")


def test_class_order_deterministic_per_seed():
    assert class_order(100, 1993) == class_order(100, 1993)
    assert class_order(100, 1993) != class_order(100, 1)
    assert sorted(class_order(100, 1993)) == list(range(100))
    assert class_order(5, None) == [0, 1, 2, 3, 4]


def labelled_fixture(num_classes=10, train_per_class=8, test_per_class=4):
    """Samples whose inputs carry (original class, unique id) so relabelling and overlaps can be checked."""
    def part(per_class, first_id):
        targets = torch.arange(num_classes).repeat_interleave(per_class)
        ids = torch.arange(first_id, first_id + len(targets))
        return Samples(torch.stack([targets, ids], dim=1), targets)
    return part(train_per_class, 0), part(test_per_class, 10_000)


def test_stream_relabels_by_class_order_and_partitions_samples():
    train, test = labelled_fixture()
    names = [f"c{i}" for i in range(10)]
    stream = class_incremental_stream("fixture", train, test, names, input_kind="vector", init=4,
                                      increment=2, order_seed=7, remainder="error")
    order = class_order(10, 7)
    assert [len(t.classes) for t in stream.tasks] == [4, 2, 2, 2]
    assert stream.class_names == tuple(names[c] for c in order)
    assert [c for t in stream.tasks for c in t.classes] == list(range(10))
    train_ids, test_ids = [], []
    for task in stream.tasks:
        for part, ids in ((task.train, train_ids), (task.test, test_ids)):
            assert set(part.targets.tolist()) == set(task.classes)
            original = part.inputs[:, 0]
            assert torch.equal(original, torch.tensor(order)[part.targets])
            ids += part.inputs[:, 1].tolist()
    assert sorted(train_ids) == list(range(80)) and sorted(test_ids) == list(range(10_000, 10_040))
    assert not set(train_ids) & set(test_ids)


def test_stream_max_per_class():
    train, test = labelled_fixture()
    kwargs = dict(input_kind="vector", init=0, increment=5, order_seed=3,
                  max_per_class=3, max_test_per_class=2)
    stream = class_incremental_stream("fixture", train, test, [str(i) for i in range(10)], **kwargs)
    for task in stream.tasks:
        assert set(Counter(task.train.targets.tolist()).values()) == {3}
        assert set(Counter(task.test.targets.tolist()).values()) == {2}
    again = class_incremental_stream("fixture", train, test, [str(i) for i in range(10)], **kwargs)
    assert again.provenance["data_hash"] == stream.provenance["data_hash"]


# ---------------------------------------------------------------- toy and digits

def test_toy_stream_shapes_and_separable():
    stream = make(Toy).stream()
    assert len(stream) == 3 and stream.input_kind == "vector" and stream.input_shape == (16,)
    for task in stream.tasks:
        assert task.train.inputs.dtype == torch.float32 and task.train.inputs.shape == (80, 16)
        assert task.test.inputs.shape == (40, 16) and task.train.targets.dtype == torch.int64
    train = stream.tasks[0].train.concat(stream.tasks[1].train).concat(stream.tasks[2].train)
    test = stream.tasks[0].test.concat(stream.tasks[1].test).concat(stream.tasks[2].test)
    centres = torch.stack([train.inputs[train.targets == c].mean(0) for c in range(6)])
    predicted = torch.cdist(test.inputs, centres).argmin(1)
    assert (predicted == test.targets).float().mean() > 0.97
    assert make(Toy).stream().provenance["data_hash"] == stream.provenance["data_hash"]
    assert make(Toy, data_seed=1).stream().provenance["data_hash"] != stream.provenance["data_hash"]
    with pytest.raises(UserError):
        make(Toy, num_classes=0)


def test_digits_stream():
    stream = make(Digits).stream()
    assert len(stream) == 5 and stream.input_kind == "image" and stream.input_shape == (1, 8, 8)
    n_train = sum(len(t.train) for t in stream.tasks)
    n_test = sum(len(t.test) for t in stream.tasks)
    assert n_train + n_test == 1797 and abs(n_test - 0.25 * 1797) < 2
    images = stream.tasks[0].train.inputs
    assert images.dtype == torch.uint8 and images.max() == 255
    assert make(Digits).stream().provenance["data_hash"] == stream.provenance["data_hash"]


# ---------------------------------------------------------------- Fashion-MNIST

def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fmnist(directory: Path, gz: bool = True, train_per_class: int = 3, test_per_class: int = 2):
    """Tiny Fashion-MNIST in the real IDX format; pixel (0, 0) of each image holds its label."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = np.random.default_rng(0).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            name, data = f"{prefix}-{kind}-ubyte", idx_bytes(array, magic)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)


@pytest.fixture
def no_debian(monkeypatch):
    def refuse():
        raise AssertionError("the Debian fallback must not be consulted")
    monkeypatch.setattr(fmnist, "debian_dirs", refuse)


def test_fmnist_from_root_gz(tmp_path, no_debian):
    write_fmnist(tmp_path)
    scenario = make(FashionMNIST, root=str(tmp_path))
    train, test, names, provenance = scenario.load()
    assert train.inputs.shape == (30, 1, 28, 28) and test.inputs.shape == (20, 1, 28, 28)
    assert train.inputs.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert torch.equal(train.inputs[:, 0, 0, 0].long(), train.targets)
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10
    assert set(provenance["files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    assert all(len(digest) == 16 for digest in provenance["files"].values())
    stream = scenario.stream()
    assert len(stream) == 5 and [len(t.train) for t in stream.tasks] == [6] * 5


def test_fmnist_torchvision_layout_uncompressed(tmp_path, no_debian):
    write_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    train, test, _, provenance = make(FashionMNIST, root=str(tmp_path)).load()
    assert len(train) == 30 and len(test) == 20
    assert "train-images-idx3-ubyte" in provenance["files"]


def test_fmnist_corrupt_files(tmp_path, no_debian):
    write_fmnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), 2049)))  # label magic
    with pytest.raises(UserError) as excinfo:
        make(FashionMNIST, root=str(tmp_path)).load()
    assert "magic" in one_line_error(excinfo)
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), 2051))[:-12])  # truncated
    with pytest.raises(UserError) as excinfo:
        make(FashionMNIST, root=str(tmp_path)).load()
    one_line_error(excinfo)
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8), 2051)[:-5]))
    with pytest.raises(UserError) as excinfo:
        make(FashionMNIST, root=str(tmp_path)).load()
    assert "truncated" in one_line_error(excinfo)


def test_fmnist_missing_root_only_looks_in_root(tmp_path, no_debian):
    with pytest.raises(UserError) as excinfo:
        make(FashionMNIST, root=str(tmp_path)).load()
    message = one_line_error(excinfo)
    assert str(tmp_path) in message and "scenario.download=true" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_fmnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "debian_dirs", lambda: [tmp_path / "debian"])
    monkeypatch.setattr(fmnist, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(UserError) as excinfo:
        make(FashionMNIST).load()
    message = one_line_error(excinfo)
    for hint in ("apt-get install dataset-fashion-mnist", "scenario.root=DIR", "scenario.download=true"):
        assert hint in message


def test_fmnist_download_goes_to_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "debian_dirs", lambda: [tmp_path / "debian"])
    monkeypatch.setattr(fmnist, "CACHE_DIR", tmp_path / "cache")
    targets = []

    def fake_download(target):  # stands in for torchvision, which writes root/FashionMNIST/raw/
        targets.append(target)
        write_fmnist(target / "FashionMNIST" / "raw")

    monkeypatch.setattr(FashionMNIST, "_download", staticmethod(fake_download))
    train, _, _, _ = make(FashionMNIST, download=True).load()
    assert len(train) == 30 and targets == [tmp_path / "cache"]
    make(FashionMNIST, download=True).load()  # found in the cache: no second download
    assert len(targets) == 1


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fmnist_real_debian_data():
    train, test, names, provenance = make(FashionMNIST).load()
    assert train.inputs.shape == (60000, 1, 28, 28) and test.inputs.shape == (10000, 1, 28, 28)
    assert Counter(train.targets.tolist()) == {c: 6000 for c in range(10)}
    assert Counter(test.targets.tolist()) == {c: 1000 for c in range(10)}
    assert len(provenance["files"]) == 4


# ---------------------------------------------------------------- WordNet

LICENCE = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
           "  2 Princeton University under the following license.  |  not a gloss  ",
           "  3   "]


def lex_pos(lex: int) -> tuple[str, str]:
    if lex in (0, 1, 44):
        return "adj", "a"
    if lex == 2:
        return "adv", "r"
    return ("noun", "n") if lex < 29 else ("verb", "v")


def write_wordnet(directory: Path, per_class: int = 6, skip_class: int | None = None):
    """data.{noun,verb,adj,adv} in the WordNet 3.0 format, ``per_class`` distinct glosses per class."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = {pos: list(LICENCE) for pos in ("noun", "verb", "adj", "adv")}
    offset = 1000
    for lex in range(45):
        if lex == skip_class:
            continue
        pos, ss_type = lex_pos(lex)
        glosses = [f"meaning {i} of {LEXNAMES[lex]}; \"an example {i}\"" for i in range(per_class)]
        glosses += [glosses[0], "a gloss shared by two classes"]  # a duplicate, an ambiguous one
        for i, gloss in enumerate(glosses):
            lines[pos].append(f"{offset:08d} {lex:02d} {ss_type} 01 word_{lex}_{i} 0 001 "
                              f"@ 00001740 {ss_type} 0000 | {gloss}  ")
            offset += 100
    for pos, content in lines.items():
        (directory / f"data.{pos}").write_text("\n".join(content) + "\n")


def test_wordnet_fixture_stream(tmp_path):
    write_wordnet(tmp_path)
    scenario = make(WordNet, root=str(tmp_path))
    train, test, names, provenance = scenario.load()
    assert names == LEXNAMES and len(names) == 45
    assert Counter(train.targets.tolist()) == {c: 5 for c in range(45)}
    assert Counter(test.targets.tolist()) == {c: 1 for c in range(45)}
    texts = train.inputs + test.inputs
    assert all(isinstance(t, str) and t.startswith("meaning ") for t in texts)
    assert len(set(texts)) == len(texts) == 45 * 6
    assert "an example" in texts[0] and "word_" not in texts[0] and "|" not in texts[0]
    stream = scenario.stream()
    assert len(stream) == 5 and all(len(t.classes) == 9 for t in stream.tasks)
    assert stream.input_kind == "text" and stream.kind == "classes"
    again = make(WordNet, root=str(tmp_path)).load()
    assert again[0].fingerprint() == train.fingerprint()


def test_wordnet_max_per_class(tmp_path):
    write_wordnet(tmp_path, per_class=12)
    stream = make(WordNet, root=str(tmp_path), max_per_class=3, max_test_per_class=1).stream()
    for task in stream.tasks:
        assert set(Counter(task.train.targets.tolist()).values()) == {3}
        assert set(Counter(task.test.targets.tolist()).values()) == {1}
        assert not set(task.train.inputs) & set(task.test.inputs)


def test_wordnet_errors(tmp_path):
    with pytest.raises(UserError) as excinfo:
        make(WordNet, root=str(tmp_path)).load()
    message = one_line_error(excinfo)
    assert "apt-get install --no-install-recommends wordnet-base" in message and "scenario.root=DIR" in message
    write_wordnet(tmp_path, skip_class=16)
    with pytest.raises(UserError) as excinfo:
        make(WordNet, root=str(tmp_path)).load()
    assert "noun.motive" in one_line_error(excinfo)
    write_wordnet(tmp_path)
    with open(tmp_path / "data.adv", "a") as handle:
        handle.write("garbage without a gloss\n")
    with pytest.raises(UserError) as excinfo:
        make(WordNet, root=str(tmp_path)).load()
    assert "data.adv" in one_line_error(excinfo)


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="wordnet-base not installed")
def test_wordnet_real_data():
    scenario = make(WordNet)
    train, test, names, _ = scenario.load()
    train_counts, test_counts = Counter(train.targets.tolist()), Counter(test.targets.tolist())
    assert set(train_counts) == set(test_counts) == set(range(45))
    assert min(test_counts.values()) >= 5 and min(train_counts.values()) >= 30
    assert not set(train.inputs) & set(test.inputs)
    stream = scenario.stream()
    assert len(stream) == 5
    for task in stream.tasks:
        assert set(task.test.targets.tolist()) == set(task.classes)
        assert max(Counter(task.train.targets.tolist()).values()) <= 200
        assert max(Counter(task.test.targets.tolist()).values()) <= 50


# ---------------------------------------------------------------- CIFAR-100

def py2_pickle(obj) -> bytes:
    """Pickle protocol 2 as Python 2 with numpy 1.x wrote the official CIFAR files (str = BINSTRING)."""
    out = bytearray(b"\x80\x02")

    def emit(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, bytes):
            out.extend(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<I", len(o)) + o)
        elif isinstance(o, tuple):
            out.extend(b"(")
            for item in o:
                emit(item)
            out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for item in o:
                emit(item)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for key, value in o.items():
                emit(key)
                emit(value)
            out.extend(b"u")
        elif isinstance(o, np.dtype):
            out.extend(b"cnumpy\ndtype\n")
            emit((o.str[1:].encode(), 0, 1))
            out.extend(b"R")
            emit((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")
        elif isinstance(o, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.extend(b"tR")
            emit((1, o.shape, o.dtype, False, o.tobytes()))
            out.extend(b"b")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def cifar_batch(per_class: int) -> dict:
    """Rows whose red plane holds the label, green label + 100, blue 255 - label."""
    labels = [c for _ in range(per_class) for c in range(100)]
    planes = np.array([[c, c + 100, 255 - c] for c in labels], dtype=np.uint8)
    data = np.repeat(planes, 1024, axis=1)
    return {b"batch_label": b"training batch 1 of 1", b"filenames": [b"x.png"] * len(labels),
            b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels], b"data": data}


CIFAR_NAMES = [f"class_{i}" for i in range(100)]


def write_cifar(folder: Path, dump=py2_pickle, train=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train").write_bytes(train if train is not None else dump(cifar_batch(2)))
    (folder / "test").write_bytes(dump(cifar_batch(1)))
    (folder / "meta").write_bytes(dump({b"fine_label_names": [n.encode() for n in CIFAR_NAMES],
                                        b"coarse_label_names": [b"c%d" % i for i in range(20)]}))


def test_cifar100_official_format(tmp_path):
    write_cifar(tmp_path / "cifar-100-python")
    assert pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="bytes")[b"data"].shape
    train, test, names, provenance = make(CIFAR100, root=str(tmp_path)).load()
    assert names == CIFAR_NAMES
    assert train.inputs.shape == (200, 3, 32, 32) and test.inputs.shape == (100, 3, 32, 32)
    assert train.inputs.dtype == torch.uint8 and train.targets.dtype == torch.int64
    labels = train.targets
    assert torch.equal(train.inputs[:, 0].reshape(200, -1).long(), labels[:, None].expand(200, 1024))
    assert torch.equal(train.inputs[:, 1, 31, 31].long(), labels + 100)
    assert torch.equal(train.inputs[:, 2, 5, 7].long(), 255 - labels)
    assert set(provenance["files"]) == {"train", "test", "meta"}
    stream = make(CIFAR100, root=str(tmp_path / "cifar-100-python"), init=50).stream()
    assert [len(t.classes) for t in stream.tasks] == [50, 10, 10, 10, 10, 10]
    assert len(stream.tasks[0].train) == 100 and stream.input_shape == (3, 32, 32)


def test_cifar100_python3_pickles(tmp_path):
    write_cifar(tmp_path, dump=lambda obj: pickle.dumps(obj, protocol=2))
    train, _, names, _ = make(CIFAR100, root=str(tmp_path)).load()
    assert len(train) == 200 and names == CIFAR_NAMES


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar100_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": Payload(marker), b"fine_labels": []}, protocol=2)
    write_cifar(tmp_path / "cifar-100-python", train=evil)
    with pytest.raises(UserError) as excinfo:
        make(CIFAR100, root=str(tmp_path)).load()
    message = one_line_error(excinfo)
    assert message.startswith(f"refusing to unpickle {os.system.__module__}.system from ")
    assert message.endswith("not CIFAR data")
    assert not marker.exists()
    (tmp_path / "cifar-100-python" / "train").write_bytes(
        b"\x80\x02cbuiltins\neval\nU\x03" + b"1+1" + b"\x85R.")
    with pytest.raises(UserError) as excinfo:
        make(CIFAR100, root=str(tmp_path)).load()
    assert "builtins.eval" in one_line_error(excinfo)


def test_cifar100_bad_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(UserError) as excinfo:
        make(CIFAR100, root=str(tmp_path)).load()
    message = one_line_error(excinfo)
    assert "scenario.root=DIR" in message and "cifar-100-python/" in message
    assert "scenario.download=true" in message
    write_cifar(tmp_path, train=b"not a pickle at all")
    with pytest.raises(UserError) as excinfo:
        make(CIFAR100, root=str(tmp_path)).load()
    assert "train" in one_line_error(excinfo)
    monkeypatch.setattr(cifar100, "CACHE_DIR", tmp_path / "cache")

    def fake_download(directory):  # stands in for torchvision's download_and_extract_archive
        write_cifar(directory / "cifar-100-python")

    monkeypatch.setattr(CIFAR100, "_download", staticmethod(fake_download))
    train, _, _, _ = make(CIFAR100, download=True).load()
    assert len(train) == 200
