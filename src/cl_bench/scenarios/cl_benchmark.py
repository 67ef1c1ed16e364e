"""The O-LoRA lineage's text-classification streams (Wang et al., 2023, O-LoRA, arXiv:2310.14152; repo
cmnfriend/O-LoRA), built on the MbPA++/ProgPrompt datasets:

* ``standard_cl``: the 4-task "standard CL benchmark", orders 1-3 of O-LoRA's ``scripts/order_{1,2,3}.sh``
    1: dbpedia -> amazon -> yahoo -> agnews       2: dbpedia -> amazon -> agnews -> yahoo
    3: yahoo -> amazon -> agnews -> dbpedia
* ``long_sequence``: the 15-task long sequence, orders 4-6 of thuwng/GORP ``scripts/order_{4,5,6}.sh``
  (order 6 is also O-LoRA's ``scripts/long.sh``), see ``LONG_ORDERS``.

Data (``layout=olora``, the default): O-LoRA's ``CL_Benchmark`` folder, ``<group>/<dataset>/`` with
``train.json``, ``dev.json`` (the same file as ``test.json``), ``test.json`` (JSON lists of
``{"label", "sentence"}``) and ``labels.json`` (the options). ``scenario.root`` may point at
``CL_Benchmark`` or at the repository holding it. Prompts are rendered as O-LoRA's ``uie_dataset_lora.py``
and ``uie_collator.py`` do with the published ``--add_task_name True --add_dataset_name True``:

    Task:{group}\\nDataset:{dataset}\\n{instruction}Option: {labels joined by ", "} \\n{sentence}\\nAnswer:

(COPA: ``Task:COPA\\nDataset:COPA\\n{sentence}\\nAnswer:``, its sentence holds the options), with the
zero-shot instruction of each group from ``configs/instruction_config.json`` (``INSTRUCTIONS``; another
file in that format via ``instruction_file``). The answer is the label.

``long_sequence`` also reads SAPT's copy (circle-hit/SAPT ``CL_Benchmark/Long_Sequence/<name>/``, lower-case
names, natural-instructions JSON) with ``layout=sapt``, prompts as SAPT's ``cl_dataset.py``:
``{definition}\\n{input}\\nOutput: `` (no definition line when the file has none).

Scorer: ``exact_match_ni``, O-LoRA's ``compute_metrics.py`` exact match (lower case, punctuation removed,
articles kept). ``max_new_tokens`` is the published ``generation_max_length`` 50 for every task.
"""
from __future__ import annotations

from cl_bench.errors import UserError
from cl_bench.scenarios._instruction_files import check_max_new_tokens, locate, ni_task, read_json, records, render
from cl_bench.scenarios._scenario import InstructionScenario
from cl_bench.scenarios.base import Examples, Task

STANDARD_ORDERS = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
}
LONG_ORDERS = {
    4: ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
        "agnews", "MultiRC", "yahoo"),
    5: ("MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
        "yelp", "amazon", "yahoo"),
    6: ("yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
        "MultiRC", "BoolQA", "WiC"),
}
GROUPS = {"dbpedia": "TC", "yahoo": "TC", "agnews": "TC", "amazon": "SC", "yelp": "SC", "IMDB": "SC",
          "SST-2": "SC", "MNLI": "NLI", "CB": "NLI", "RTE": "NLI", "QQP": "QQP", "BoolQA": "BoolQA",
          "COPA": "COPA", "MultiRC": "MultiRC", "WiC": "WiC"}
SAPT_NAMES = {"MNLI": "mnli", "CB": "cb", "WiC": "wic", "COPA": "copa", "QQP": "qqp", "BoolQA": "boolq",
              "RTE": "rte", "IMDB": "imdb", "yelp": "yelp", "amazon": "amazon", "SST-2": "sst2",
              "dbpedia": "dbpedia", "agnews": "agnews", "MultiRC": "multirc", "yahoo": "yahoo"}
INSTRUCTIONS = {  # O-LoRA configs/instruction_config.json, zero-shot (instruction_strategy single)
    "NLI": "What is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? "
           "Choose one from the option.\n",
    "QQP": "Whether the \"first sentence\" and the \"second sentence\" have the same meaning? "
           "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.\n",
}
MAX_NEW_TOKENS = 50  # generation_max_length in every published script
SOURCES = {"olora": "the CL_Benchmark folder of https://github.com/cmnfriend/O-LoRA",
           "sapt": "CL_Benchmark/Long_Sequence of https://github.com/circle-hit/SAPT"}


class _CLBenchmark(InstructionScenario):
    """Shared loader; subclasses set ``orders`` and ``layouts``."""

    orders: dict[int, tuple[str, ...]] = {}
    layouts: tuple[str, ...] = ("olora",)

    def __init__(self, *, root: str | None = None, order: int = 1, layout: str = "olora",
                 instruction_file: str | None = None, add_task_name: bool = True, add_dataset_name: bool = True,
                 max_new_tokens: int | None = None, hf_repo: str | None = None, hf_revision: str | None = None,
                 **caps):
        super().__init__(**caps)
        if order not in self.orders:
            raise UserError(f"scenario.order must be one of {', '.join(map(str, self.orders))} "
                            f"(the published orders), got {order!r}")
        if layout not in self.layouts:
            raise UserError(f"scenario.layout must be one of {', '.join(self.layouts)}, got {layout!r}")
        check_max_new_tokens(max_new_tokens)
        self.root, self.order, self.layout, self.instruction_file = root, order, layout, instruction_file
        self.add_task_name, self.add_dataset_name = add_task_name, add_dataset_name
        self.max_new_tokens, self.hf_repo, self.hf_revision = max_new_tokens, hf_repo, hf_revision

    def instructions(self) -> dict[str, str]:
        if self.instruction_file is None:
            return INSTRUCTIONS
        from pathlib import Path

        path = Path(self.instruction_file).expanduser()
        data = read_json(path, "an instruction_config.json of O-LoRA's format")
        try:
            return {group: next(i["instruction"] for i in entries if i["instruction_type"] == "zero-shot")
                    for group, entries in data.items()}
        except (AttributeError, KeyError, TypeError, StopIteration):
            raise UserError(f"{path} should map each task group to a list of {{instruction_type, instruction}} "
                            "with a zero-shot entry (O-LoRA's configs/instruction_config.json)") from None

    def folder(self, name: str) -> str:
        return f"{GROUPS[name]}/{name}" if self.layout == "olora" else SAPT_NAMES[name]

    def build(self):
        names = self.orders[self.order]
        hint = f"{type(self).registered_name} data: {SOURCES[self.layout]}"
        subfolders = ("", "CL_Benchmark") if self.layout == "olora" else \
            ("", "Long_Sequence", "CL_Benchmark/Long_Sequence")
        directory, source = locate(
            self.root, self.hf_repo, self.hf_revision, cache_name="CL_Benchmark", subfolders=subfolders,
            holds=lambda d: any((d / self.folder(n) / "train.json").is_file() for n in names),
            patterns=[f"{p}{self.folder(n)}/*.json" for n in names for p in ("", *(s + "/" for s in subfolders if s))],
            missing=f"the {len(names)} task folders ({', '.join(self.folder(n) for n in names)}) of "
                    f"{SOURCES[self.layout]}")
        instructions = self.instructions() if self.layout == "olora" else {}
        tasks = []
        for index, name in enumerate(names):
            folder = directory / self.folder(name)
            if self.layout == "olora":
                template, train, test = self.read_olora(folder, name, instructions, hint)
            else:
                template, train, test = self.read_sapt(folder, hint)
            tasks.append(Task(index, name, train, test, instruction=template, scorer="exact_match_ni",
                              max_new_tokens=self.max_new_tokens or MAX_NEW_TOKENS))
        provenance = {"source": f"{SOURCES[self.layout]} from {source}", "data_folder": str(directory),
                      "order": self.order, "layout": self.layout}
        return tasks, [], provenance

    def read_olora(self, folder, name: str, instructions: dict[str, str], hint: str):
        group = GROUPS[name]
        labels = read_json(folder / "labels.json", hint)
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(f"{folder / 'labels.json'} should be a JSON list of label strings")
        if group != "COPA" and group not in instructions:
            raise UserError(f"no zero-shot instruction for task group '{group}' in {self.instruction_file}")
        prefix = (f"Task:{group}\n" if self.add_task_name else "") + (f"Dataset:{name}\n" if self.add_dataset_name else "")
        body = "{input}\nAnswer:" if group == "COPA" else \
            f"{instructions[group]}Option: {', '.join(labels)} \n{{input}}\nAnswer:"
        template = prefix + body
        splits = []
        for split in ("train", "test"):
            rows = records(folder / f"{split}.json", ("label", "sentence"), hint)
            splits.append(Examples([render(template, r["sentence"]) for r in rows], [r["label"] for r in rows]))
        return template, *splits

    @staticmethod
    def read_sapt(folder, hint: str):
        template = None
        splits = []
        for split in ("train", "test"):
            definition, instances = ni_task(folder / f"{split}.json", hint)
            template = (f"{definition.strip()}\n" if definition.strip() else "") + "{input}\nOutput: "
            splits.append(Examples([render(template, text) for text, _ in instances],
                                   [outputs[0] for _, outputs in instances],
                                   tuple(outputs for _, outputs in instances)))
        return template, *splits


class StandardCL(_CLBenchmark):
    """O-LoRA's 4-task standard CL benchmark (dbpedia, amazon, yahoo, agnews), orders 1-3."""

    description = "standard CL benchmark: 4 text-classification tasks, O-LoRA orders 1-3; needs the data"
    orders = STANDARD_ORDERS


class LongSequence(_CLBenchmark):
    """The 15-task long sequence, orders 4-6 (O-LoRA or SAPT files)."""

    description = "long sequence: 15 classification tasks, orders 4-6 (O-LoRA/SAPT files); needs the data"
    orders = LONG_ORDERS
    layouts = ("olora", "sapt")

    def __init__(self, *, order: int = 4, **kwargs):
        super().__init__(order=order, **kwargs)
