"""``scenario=hf`` and ``scenario=hf_instructions`` on small files generated here in the formats people keep
their data in (parquet, an image folder, ``save_to_disk``, Alpaca and ShareGPT JSON); no network."""
import json

import numpy as np
import pytest
import torch

from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.runner import build_stream, run


def stream_of(*overrides):
    return build_stream(compose(list(overrides)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import datasets
    import pandas as pd
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    vectors = [{"features": list(rng.normal(3.0 * c, 0.3, size=5).astype(float)), "label": f"k{c}", "count": c}
               for c in range(4) for _ in range(8)]
    pd.DataFrame(vectors).to_parquet(root / "vectors.parquet")
    datasets.Dataset.from_dict({"text": [], "label": []}).save_to_disk(str(root / "empty"))
    for split, count in (("train", 4), ("test", 2)):
        for c in range(4):
            (root / "images" / split / f"shape{c}").mkdir(parents=True)
            for i in range(count):
                pixels = np.full((12, 18, 3), 50 * c, dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / split / f"shape{c}" / f"{i}.png")
    texts = datasets.Dataset.from_dict({"sentence": [f"text {i} about {i % 3}" for i in range(18)],
                                        "topic": [i % 3 for i in range(18)]},
                                       features=datasets.Features({"sentence": datasets.Value("string"),
                                                                   "topic": datasets.ClassLabel(names=["a", "b", "c"])}))
    datasets.DatasetDict({"train": texts, "test": texts.select(range(6))}).save_to_disk(str(root / "saved"))
    words = ["abc", "dog", "cat", "sun", "red", "fox", "owl", "bee", "ant", "elk"]
    alpaca = ([{"instruction": "Reverse the word.", "input": w, "output": w[::-1], "task": "reverse"} for w in words]
              + [{"instruction": "Repeat the word.", "input": w, "output": w + w, "task": "repeat"} for w in words])
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    for name, key, user, assistant in (("chat", "conversations", "human", "gpt"), ("msgs", "messages", "user",
                                                                                   "assistant")):
        turns = [{key: [{"from" if key == "conversations" else "role": role, "value" if key == "conversations"
                         else "content": text} for role, text in ((user, f"Say {w}"), (assistant, "ok"),
                                                                  (user, "again"), (assistant, w))]}
                 for w in words[:5]]
        (root / f"{name}.json").write_text(json.dumps(turns))
    return root


def test_parquet_vectors_with_string_labels_and_a_held_out_test_split(files):
    stream = stream_of("scenario=hf", "scenario.path=parquet", f"scenario.data_files={files}/vectors.parquet",
                       "scenario.test_split=null", "scenario.increment=2", "model=mlp")
    assert stream.input_kind == "vector" and len(stream) == 2
    assert sorted(stream.class_names) == ["k0", "k1", "k2", "k3"]
    counts = [(len(t.train), len(t.test)) for t in stream.tasks]
    assert counts == [(12, 4), (12, 4)]  # a stratified quarter of 8 rows per class held out
    first = stream.tasks[0]
    assert first.train.inputs.shape == (12, 5) and first.train.inputs.dtype == torch.float32
    provenance = stream.provenance
    assert provenance["source"] == "datasets" and provenance["test_fraction"] == 0.25
    assert set(provenance["fingerprints"]) == {"train"} and provenance["input_column"] == "features"


def test_an_image_folder_keeps_its_class_names_and_images_are_resized(files, tmp_path):
    args = ["scenario=hf", "scenario.path=imagefolder", "scenario.image_size=16", "model=small_cnn",
            f"scenario.data_files={{train: '{files}/images/train/**', test: '{files}/images/test/**'}}"]
    stream = stream_of(*args)
    assert stream.input_kind == "image" and sorted(stream.class_names) == ["shape0", "shape1", "shape2", "shape3"]
    images = stream.tasks[0].train.inputs
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    for task in stream.tasks:  # a class's pixels are 50 * its folder index: labels follow the folders
        for image, target in zip(task.train.inputs, task.train.targets):
            assert int(image[0, 8, 8]) == 50 * int(stream.class_names[int(target)][-1])
    summary = run(compose([*args, "strategy.epochs=2", "progress=false", f"results_dir={tmp_path}"]))
    assert summary["status"] == "finished" and summary["tasks_total"] == 2


def test_a_save_to_disk_folder_with_a_class_label_and_text(files):
    stream = stream_of("scenario=hf", f"scenario.path={files}/saved", "scenario.input_column=sentence",
                       "scenario.label_column=topic", "scenario.increment=1", "model=minilm")
    assert stream.input_kind == "text" and sorted(stream.class_names) == ["a", "b", "c"]
    assert sum(len(t.test) for t in stream.tasks) == 6 and isinstance(stream.tasks[0].train.inputs[0], str)
    assert set(stream.provenance["fingerprints"]) == {"train", "test"}


def test_alpaca_rows_grouped_by_task_column_in_the_order_asked(files, tmp_path):
    args = ["scenario=hf_instructions", "scenario.path=json", f"scenario.data_files={files}/alpaca.json",
            "scenario.task_order=[repeat, reverse]", "scenario.scorer={repeat: exact_match, reverse: rouge_l}",
            "model=tiny_llama", "strategy=seqlora", "strategy.batch_size=4"]
    stream = stream_of(*args)
    assert [t.name for t in stream.tasks] == ["repeat", "reverse"] and stream.provenance["format"] == "alpaca"
    repeat = stream.tasks[0]
    assert (len(repeat.train), len(repeat.test)) == (8, 2)  # 20% of 10 held out
    assert repeat.instruction == "Repeat the word." and repeat.scorer == "exact_match"
    for prompt, answer in zip(repeat.train.prompts, repeat.train.answers):
        word = prompt.split("\n\n")[1]
        assert prompt == f"Repeat the word.\n\n{word}" and answer == word + word
    summary = run(compose([*args, "progress=false", f"results_dir={tmp_path}"]))
    assert summary["status"] == "finished" and summary["provenance"]["stream"]["scorers"]["reverse"] == "rouge_l"


@pytest.mark.parametrize("name", ["chat", "msgs"])
def test_sharegpt_files_one_task_per_split_answer_is_the_last_assistant_turn(files, name):
    stream = stream_of("scenario=hf_instructions", "scenario.path=json", "model=tiny_llama", "strategy=seqlora",
                       f"scenario.data_files={{first: '{files}/{name}.json', second: '{files}/{name}.json'}}")
    assert [t.name for t in stream.tasks] == ["first", "second"] and stream.provenance["format"] == "sharegpt"
    examples = stream.tasks[0].train.concat(stream.tasks[0].test)
    for prompt, answer in zip(examples.prompts, examples.answers):
        assert prompt == f"Say {answer}\nok\nagain"


@pytest.mark.parametrize("overrides, expected", [
    (["scenario=hf", "model=mlp"], "scenario.path is required"),
    (["scenario=hf"], "has no default model: pass model=NAME"),
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=/nonexistent/x.parquet"],
     "could not be loaded with datasets"),
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=FILES/vectors.parquet"],
     "has no split 'test' (it has: train)"),
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=FILES/vectors.parquet",
      "scenario.test_split=null", "scenario.label_column=nope"], "scenario.label_column='nope' is not a column"),
    (["scenario=hf_instructions", "model=tiny_llama", "strategy=seqlora", "scenario.path=json",
      "scenario.data_files=FILES/alpaca.json", "scenario.task_order=[nope]"], "unknown tasks ['nope']"),
    (["scenario=hf_instructions", "model=tiny_llama", "strategy=seqlora", "scenario.path=json",
      "scenario.data_files=FILES/alpaca.json", "scenario.scorer=bleu9"], "names scorer 'bleu9'"),
    (["scenario=hf_instructions", "model=tiny_llama", "strategy=seqlora", "scenario.path=parquet",
      "scenario.data_files=FILES/vectors.parquet"], "is neither Alpaca"),
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=FILES/vectors.parquet",
      "scenario.test_split=null", "scenario.input_column=count"], "holds Value('int64'), not images, text"),
    (["scenario=hf", "model=mlp", "scenario.path=FILES/empty", "scenario.test_split=null"],
     "could not be loaded with datasets"),  # datasets itself refuses an empty saved dataset
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=FILES/vectors.parquet",
      "scenario.test_split=null", "scenario.label_column=features"], "cannot hold out a stratified"),
    (["scenario=hf", "model=mlp", "scenario.path=parquet", "scenario.data_files=FILES/vectors.parquet",
      "scenario.test_split=null", "scenario.input_column=nope"], "scenario.input_column='nope' is not a column"),
])
def test_bad_settings_are_one_line_errors(capsys, files, tmp_path, overrides, expected):
    argv = ["run", *[o.replace("FILES", str(files)) for o in overrides], "progress=false", f"results_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_the_fingerprint_follows_the_data(files, tmp_path):
    import pandas as pd

    changed = pd.read_parquet(files / "vectors.parquet")
    changed.loc[0, "label"] = "k1"
    changed.to_parquet(tmp_path / "changed.parquet")
    hashes = [stream_of("scenario=hf", "scenario.path=parquet", f"scenario.data_files={path}",
                        "scenario.test_split=null", "model=mlp").provenance["data_hash"]
              for path in (files / "vectors.parquet", tmp_path / "changed.parquet")]
    assert hashes[0] != hashes[1]
