"""TRACE (Wang et al., 2023, arXiv:2310.06762; repo BeyonderXX/TRACE): eight instruction tasks for
continual learning of LLMs, in the order of the authors' ``scripts/train_seq_naive.sh``:

    C-STANCE -> FOMC -> MeetingBank -> Py150 -> ScienceQA -> NumGLUE-cm -> NumGLUE-ds -> 20Minuten

Data: the ``LLM-CL-Benchmark_5000`` folder of the TRACE archive (linked from the repository README;
5,000 training examples per task), one folder per task with ``train.json``, ``eval.json`` and
``test.json``, each a JSON list (or JSON lines) of ``{"prompt": ..., "answer": ...}``. The prompt
already starts with the task's instruction (the ``TASK_PROMT`` of their ``inference/ICL.py``, kept
here as ``INSTRUCTIONS``) and is used unchanged; ``test.json`` is scored, ``eval.json`` is not read.
``scenario.root`` may point at that folder or at its parent.

Per-task scorers, as in their ``evaluations/eval_*.py`` and ``metrics.py`` (every score in [0, 1];
an empty prediction scores 0 and stays in the denominator, as there):

* C-STANCE, FOMC, NumGLUE-cm, NumGLUE-ds: ``exact_string`` (prediction == answer; we strip
  surrounding whitespace);
* ScienceQA: ``first_character`` (the option letter; their BLEU/ROUGE on the reasoning is not scored);
* MeetingBank: ``rouge_l`` (they use the ``rouge`` package; we use rouge-score's ROUGE-L F1);
* Py150: ``code_edit_similarity`` (their literal post-processing, then ``fuzz.ratio``);
* 20Minuten: ``sari`` with the whole prompt as source, as their eval passes it (BLEU/ROUGE not scored).

Generation budget: the authors generate up to ``max_ans_len`` = 512 tokens for every task. The defaults
here (``MAX_NEW_TOKENS``) cover the scored part of each answer: a few tokens for option letters and
numbers, one code line for Py150, 256 for the summaries and simplifications; ``max_new_tokens=512``
restores the published budget for all tasks. TRACE's general-ability suites (MMLU, GSM8K, ... via
OpenCompass) are not part of the archive and are not loaded.
"""
from __future__ import annotations

from cl_bench.errors import UserError
from cl_bench.scenarios._instruction_files import check_max_new_tokens, locate, records
from cl_bench.scenarios._scenario import InstructionScenario
from cl_bench.scenarios.base import Examples, Task

ORDER = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
INSTRUCTIONS = {
    "FOMC": "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
            "Choose one from A, B and C.\n",
    "C-STANCE": "判断以下文本对指定对象的态度，选择一项：A.支持，B.反对，C.中立。输出A，B或者C。\n",
    "ScienceQA": "Choose an answer for the following question and give your reasons.\n\n",
    "NumGLUE-cm": "Solve the following math problem.\n",
    "NumGLUE-ds": "Solve the following math problem.\n",
    "MeetingBank": "Write a summary of the following meeting transcripts.\n",
    "Py150": "Continue writing the code.\n",
    "20Minuten": "Provide a simplified version of the following paragraph in German.\n\n",
}
SCORERS = {"C-STANCE": "exact_string", "FOMC": "exact_string", "MeetingBank": "rouge_l",
           "Py150": "code_edit_similarity", "ScienceQA": "first_character", "NumGLUE-cm": "exact_string",
           "NumGLUE-ds": "exact_string", "20Minuten": "sari"}
MAX_NEW_TOKENS = {"C-STANCE": 8, "FOMC": 8, "MeetingBank": 256, "Py150": 64, "ScienceQA": 16,
                  "NumGLUE-cm": 32, "NumGLUE-ds": 32, "20Minuten": 256}
SOURCE = "the TRACE archive linked from https://github.com/BeyonderXX/TRACE (README, 'data preproceess')"


class TRACE(InstructionScenario):
    """The eight TRACE tasks from their ``{prompt, answer}`` JSON files, in the published order."""

    description = "TRACE: 8 instruction tasks (C-STANCE ... 20Minuten) in the published order; needs the data"

    def __init__(self, *, root: str | None = None, order: int | list = 1, folder: str = "LLM-CL-Benchmark_5000",
                 max_new_tokens: int | None = None, hf_repo: str | None = None, hf_revision: str | None = None,
                 **caps):
        super().__init__(**caps)
        if isinstance(order, list):
            if not order or len(set(order)) != len(order) or set(order) - set(ORDER):
                raise UserError(f"scenario.order must be 1 (the published order) or a list of distinct "
                                f"TRACE tasks out of {', '.join(ORDER)}, got {order}")
            self.tasks = tuple(order)
        elif order == 1:
            self.tasks = ORDER
        else:
            raise UserError(f"scenario.order must be 1 (TRACE's published order) or a list of task names, got {order!r}")
        check_max_new_tokens(max_new_tokens)
        self.root, self.order, self.folder, self.max_new_tokens = root, order, folder, max_new_tokens
        self.hf_repo, self.hf_revision = hf_repo, hf_revision

    def build(self):
        hint = f"TRACE data: {SOURCE}"
        directory, source = locate(
            self.root, self.hf_repo, self.hf_revision, cache_name="TRACE", subfolders=("", self.folder),
            holds=lambda d: any((d / name / "train.json").is_file() for name in self.tasks),
            patterns=[f"{p}{name}/*.json" for name in self.tasks for p in ("", f"{self.folder}/")],
            missing=f"TRACE task folders ({', '.join(self.tasks)}, each with train.json and test.json; "
                    f"{SOURCE}, folder {self.folder})")
        tasks = []
        for index, name in enumerate(self.tasks):
            splits = [records(directory / name / f"{split}.json", ("prompt", "answer"), hint)
                      for split in ("train", "test")]
            train, test = (Examples([r["prompt"] for r in rows], [r["answer"] for r in rows]) for rows in splits)
            tasks.append(Task(index, name, train, test, instruction=INSTRUCTIONS[name] + "{input}",
                              scorer=SCORERS[name], max_new_tokens=self.max_new_tokens or MAX_NEW_TOKENS[name]))
        provenance = {"source": f"TRACE (arXiv:2310.06762) from {source}", "data_folder": str(directory),
                      "order": self.order}
        return tasks, [], provenance
