"""The headline command, ``cl-bench run strategy=mos scenario=cifar100``, as a user types it: the paper
backbone is chosen without ``model=``, CIFAR-100 downloads when missing, and offline runs fail in one
line naming both ways to supply data and weights. Never the network: a generated archive stands in."""
import hashlib
import pickle
import tarfile
import time

import numpy as np
import pytest

from cl_bench.cli import main
from cl_bench.errors import UserError
from cl_bench.scenarios import cifar100
from cl_bench.scenarios.cifar100 import CIFAR100

HEADLINE = ["run", "strategy=mos", "scenario=cifar100"]


def write_cifar(folder, train_per_class=1, test_per_class=1):
    """A CIFAR-100 python archive's three pickles (dict with bytes keys, uint8 rows) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for _ in range(per_class) for c in range(100)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels}, protocol=2))
    names = {b"fine_label_names": [b"class_%d" % i for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(names, protocol=2))


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_download_fetches_and_extracts_the_official_archive_layout(tmp_path, monkeypatch):
    write_cifar(tmp_path / "source" / "cifar-100-python")
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(cifar100, "URL", archive.as_uri())  # file://, so torchvision's real downloader runs
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "data"
    scenario = CIFAR100(root=str(root), download=True)
    assert scenario.locate() == root / "cifar-100-python"
    assert len(scenario.load()[0]) == 100
    monkeypatch.setattr(cifar100, "ARCHIVE_MD5", "0" * 32)  # a damaged download is one line naming both ways
    with pytest.raises(UserError) as excinfo:
        CIFAR100(root=str(tmp_path / "other"), download=True).locate()
    assert "\n" not in str(excinfo.value) and "model.pretrained_path=FILE" in str(excinfo.value)


@pytest.mark.parametrize("environment, downloads", [({}, True), ({"HF_DATASETS_OFFLINE": "1"}, False)])
def test_auto_downloads_unless_the_environment_is_offline(tmp_path, monkeypatch, environment, downloads):
    for name in cifar100.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    fetched = []
    monkeypatch.setattr(CIFAR100, "_download", staticmethod(lambda directory: fetched.append(directory)
                                                            or write_cifar(directory / "cifar-100-python")))
    if downloads:
        assert CIFAR100(root=str(tmp_path)).locate() == tmp_path / "cifar-100-python"
    else:
        with pytest.raises(UserError, match="the environment is offline"):
            CIFAR100(root=str(tmp_path)).locate()
    assert fetched == ([tmp_path] if downloads else [])


def test_the_headline_command_runs_mos_on_its_paper_backbone(tmp_path, capsys):
    write_cifar(tmp_path / "data" / "cifar-100-python", train_per_class=2)  # MOS's class statistics need 2
    start = time.perf_counter()
    code = main([*HEADLINE, f"scenario.root={tmp_path / 'data'}", "model.pretrained=false",
                 # small settings: 2 tasks of 50 classes, the ViT-B/16 at 32 px (2x2 patches), one epoch
                 "scenario.init=50", "scenario.increment=50", "model.image_size=32", "strategy.epochs=1",
                 "strategy.crct_epochs=1", "strategy.batch_size=100", "strategy.ca_statistics=variance",
                 "progress=false", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "model=vit_b16_in21k: the backbone of mos's paper" in err and "resnet18 does not fit" in err
    (run_dir,) = (tmp_path / "results" / "runs").iterdir()
    config = (run_dir / "config.yaml").read_text()
    assert "name: vit_b16_in21k" in config and "type: vit_base_patch16_224.augreg_in21k" in config
    scores = (run_dir / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 3  # header; task 0 after task 0; tasks 0 and 1 after task 1
    print(f"headline run: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("with_data", [False, True])
def test_offline_without_weights_fails_in_one_line_naming_both_ways(tmp_path, monkeypatch, capsys, with_data):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/vit_base_patch16_224.augreg_in21k", "model.safetensors"), str):
        pytest.skip("the ViT-B/16 weights are in this machine's cache")
    monkeypatch.setattr(cifar100, "CACHE_DIR", tmp_path / "empty-cache")
    data = []
    if with_data:
        write_cifar(tmp_path / "data" / "cifar-100-python")
        data = [f"scenario.root={tmp_path / 'data'}"]
    assert main([*HEADLINE, *data, "progress=false", f"results_dir={tmp_path / 'results'}"]) == 2
    lines = stderr_lines(capsys)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 2, lines  # the other line names the backbone chosen
    assert ("CIFAR-100 not found" in errors[0]) != with_data
    assert "scenario.root=DIR" in errors[0] and "model.pretrained_path=FILE" in errors[0]
