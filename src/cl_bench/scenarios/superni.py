"""Continual streams of Super-NaturalInstructions tasks (Wang et al., 2022, arXiv:2204.07705):

* ``order=1`` / ``order=2``: SAPT's 15-task benchmark (Zhao et al., ACL 2024, arXiv:2403.11549; repo
  circle-hit/SAPT, ``gen_script_superni_t5.py``), see ``SAPT_ORDERS``. Data: SAPT's
  ``CL_Benchmark/SuperNI/<task>/{train,dev,test}.json`` (natural-instructions task files already cut
  to at most 1,000 / 100 / 100 instances); ``test.json`` is scored. Prompt as SAPT's ``cl_dataset.py``:
  ``Definition: {definition}\\n\\nNow complete the following example -\\nInput: {input}\\nOutput: ``.
  ``max_new_tokens`` 50 (their ``generation_max_length``).
* ``order=G1`` / ``C1`` / ``M1``: the 5-task NI-Seq sequences of the function-vector paper (Jiang et
  al., ICLR 2025, arXiv:2406.12227; repo GangweiJiang/FvForgetting, ``scripts/train/seq{0,1,2}_fvg.sh``),
  see ``FV_SEQUENCES``. Data: natural-instructions task files ``task<ID>_<name>.json`` (the ``tasks/``
  folder of allenai/natural-instructions, or ``data/train`` of the authors' archive), found by ID as
  their ``ni_dataset.py`` does; the last 100 instances are the test set, the others the training set,
  of which their scripts train on 1,000 (``max_train_samples``; here the default
  ``max_train_per_task=1000``, a random subset). Prompt as their ``DataCollatorForNI`` (definition, no
  examples): ``Definition: {definition}.\\n\\nNow complete the following example -\\nInput: {input}.\\nOutput:``
  (a full stop added when the text does not end in punctuation). ``max_new_tokens`` per task as their
  ``eval_utils.sentence_eval``: 6 for the classification tasks, 12 for task1510, 30 for task618/589,
  64 otherwise. task360 is loaded by ID from the data given (which task the authors' own file holds is
  unverified, see the spec).

Scorer: ``rouge_l_ni`` (ROUGE-L with stemming, max over an instance's outputs), the metric both papers
report. Deliberate deviations: an instance with several outputs is trained on one of them chosen with
``label_seed`` (SAPT draws one at load time, FvForgetting at every batch) and scored against all of
them (SuperNI's ``compute_metrics``; SAPT scores against the drawn one); FvForgetting scores its
trained tasks with another prompt format on files of its archive, the training prompt is used here.
The C2/G2/M2 sequences of a third-party reconstruction are not offered (unverified).
"""
from __future__ import annotations

import string

import numpy as np

from cl_bench.errors import UserError
from cl_bench.scenarios._instruction_files import check_max_new_tokens, locate, ni_task, render
from cl_bench.scenarios._scenario import InstructionScenario
from cl_bench.scenarios.base import Examples, Task

SAPT_ORDERS = {
    "1": ("task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization",
          "task181_outcome_extraction", "task002_quoref_answer_generation", "task1510_evalution_relation_extraction",
          "task639_multi_woz_user_utterance_generation", "task1729_personachat_generate_next",
          "task073_commonsenseqa_answer_generation", "task1590_diplomacy_text_generation",
          "task748_glucose_reverse_cause_event_detection", "task511_reddit_tifu_long_text_summarization",
          "task591_sciq_answer_generation", "task1687_sentiment140_classification", "task875_emotion_classification"),
    "2": ("task748_glucose_reverse_cause_event_detection", "task073_commonsenseqa_answer_generation",
          "task1590_diplomacy_text_generation", "task639_multi_woz_user_utterance_generation",
          "task1572_samsum_summary", "task1687_sentiment140_classification", "task591_sciq_answer_generation",
          "task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
          "task1729_personachat_generate_next", "task181_outcome_extraction",
          "task511_reddit_tifu_long_text_summarization", "task002_quoref_answer_generation",
          "task1290_xsum_summarization", "task875_emotion_classification"),
}
FV_SEQUENCES = {  # NI-Seq-G1 (generation), -C1 (classification), -M1 (mixed): seq0, seq1, seq2
    "G1": (618, 1290, 589, 511, 1357),
    "C1": (195, 1343, 1310, 1292, 363),
    "M1": (360, 363, 1290, 339, 1510),
}
FV_MAX_NEW_TOKENS = {195: 6, 339: 6, 363: 6, 1292: 6, 1310: 6, 1343: 6, 1510: 12, 618: 30, 589: 30}
FV_TEST_SIZE = 100
SAPT_MAX_NEW_TOKENS = 50
SAPT_SOURCE = "CL_Benchmark/SuperNI of https://github.com/circle-hit/SAPT"
NI_SOURCE = ("tasks/ of https://github.com/allenai/natural-instructions (or data/train of the "
             "GangweiJiang/FvForgetting archive)")


def fv_prompt(definition: str) -> str:
    """FvForgetting's ``DataCollatorForNI`` prompt (definition only) with an ``{input}`` field."""
    definition = "Definition: " + definition.strip()
    if definition[-1] not in string.punctuation:
        definition += "."
    return definition + "\n\nNow complete the following example -\nInput: {input}\nOutput:"


def fv_input(text: str) -> str:
    text = text.strip()
    return text if text and text[-1] in string.punctuation else text + "."


class SuperNI(InstructionScenario):
    """SuperNI task streams: SAPT's 15-task orders 1-2, or the function-vector paper's G1/C1/M1."""

    description = "SuperNI streams: SAPT 15-task orders 1-2 or FV/IV 5-task G1/C1/M1; needs the data"

    def __init__(self, *, root: str | None = None, order: int | str = 1, label_seed: int = 0,
                 max_new_tokens: int | None = None, hf_repo: str | None = None, hf_revision: str | None = None,
                 max_train_per_task: int | None = 1000, **caps):
        super().__init__(max_train_per_task=max_train_per_task, **caps)
        key = str(order).upper()
        if key not in SAPT_ORDERS and key not in FV_SEQUENCES:
            raise UserError(f"scenario.order must be 1 or 2 (SAPT) or one of {', '.join(FV_SEQUENCES)} "
                            f"(function-vector sequences), got {order!r}")
        check_max_new_tokens(max_new_tokens)
        self.root, self.order, self.key, self.label_seed = root, order, key, label_seed
        self.max_new_tokens, self.hf_repo, self.hf_revision = max_new_tokens, hf_repo, hf_revision

    def build(self):
        rng = np.random.default_rng(self.label_seed)
        if self.key in SAPT_ORDERS:
            tasks, directory, source = self.sapt_tasks(rng)
        else:
            tasks, directory, source = self.fv_tasks(rng)
        provenance = {"source": f"Super-NaturalInstructions ({'SAPT' if self.key in SAPT_ORDERS else 'FvForgetting'} "
                                f"order {self.key}) from {source}", "data_folder": str(directory),
                      "order": self.key, "label_seed": self.label_seed}
        return tasks, [], provenance

    @staticmethod
    def examples(template: str, instances, rng: np.random.Generator, prepare=lambda text: text) -> Examples:
        answers = [outputs[int(rng.integers(len(outputs)))] if len(outputs) > 1 else outputs[0]
                   for _, outputs in instances]
        return Examples([render(template, prepare(text)) for text, _ in instances], answers,
                        tuple(tuple(outputs) for _, outputs in instances))

    def sapt_tasks(self, rng):
        names = SAPT_ORDERS[self.key]
        hint = f"SAPT SuperNI data: {SAPT_SOURCE}"
        subfolders = ("", "SuperNI", "CL_Benchmark/SuperNI")
        directory, source = locate(
            self.root, self.hf_repo, self.hf_revision, cache_name="SuperNI", subfolders=subfolders,
            holds=lambda d: any((d / name / "train.json").is_file() for name in names),
            patterns=[f"{p}{name}/*.json" for name in names for p in ("", "SuperNI/", "CL_Benchmark/SuperNI/")],
            missing=f"the 15 SAPT SuperNI task folders (<task>/train.json, test.json; {SAPT_SOURCE})")
        tasks = []
        for index, name in enumerate(names):
            splits = []
            for split in ("train", "test"):
                definition, instances = ni_task(directory / name / f"{split}.json", hint)
                template = ("Definition: " + definition.strip() + "\n\nNow complete the following example -\n"
                            "Input: {input}\nOutput: ")
                splits.append(self.examples(template, instances, rng))
            tasks.append(Task(index, name, *splits, instruction=template, scorer="rouge_l_ni",
                              max_new_tokens=self.max_new_tokens or SAPT_MAX_NEW_TOKENS))
        return tasks, directory, source

    def fv_tasks(self, rng):
        ids = FV_SEQUENCES[self.key]
        hint = f"natural-instructions task files: {NI_SOURCE}"

        def task_file(folder, task_id: int):
            found = sorted(folder.glob(f"task{task_id:03d}_*.json"))
            return found[0] if found else None

        directory, source = locate(
            self.root, self.hf_repo, self.hf_revision, cache_name="natural-instructions",
            subfolders=("", "tasks", "train"), holds=lambda d: any(task_file(d, i) for i in ids),
            patterns=[f"{p}task{i:03d}_*.json" for i in ids for p in ("", "tasks/", "train/")],
            missing=f"natural-instructions task files {', '.join(f'task{i:03d}_*.json' for i in ids)} ({NI_SOURCE})")
        tasks = []
        for index, task_id in enumerate(ids):
            path = task_file(directory, task_id)
            if path is None:
                raise UserError(f"no task{task_id:03d}_*.json in {directory} ({hint})")
            definition, instances = ni_task(path, hint)
            if len(instances) <= FV_TEST_SIZE:
                raise UserError(f"{path} has {len(instances)} instances; the FvForgetting split needs more than "
                                f"{FV_TEST_SIZE} (the last {FV_TEST_SIZE} are the test set)")
            template = fv_prompt(definition)
            train = self.examples(template, instances[:-FV_TEST_SIZE], rng, fv_input)
            test = self.examples(template, instances[-FV_TEST_SIZE:], rng, fv_input)
            tasks.append(Task(index, path.stem, train, test, instruction=template, scorer="rouge_l_ni",
                              max_new_tokens=self.max_new_tokens or FV_MAX_NEW_TOKENS.get(task_id, 64)))
        return tasks, directory, source
