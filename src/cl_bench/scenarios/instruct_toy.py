"""A synthetic instruction stream for tests: three tasks on random lowercase words, each with its own
prompt format, answer and scorer (exact match, edit similarity, accuracy), and one held-out general
suite (repeat a word twice: ROUGE-L). Each task's answer depends only on its prompt format, so the
tiny random LLaMA learns a task in a few steps, and a model that overwrites an earlier task's
answer with a later one shows forgetting plainly."""
from __future__ import annotations

import numpy as np

from cl_bench.scenarios._scenario import InstructionScenario
from cl_bench.scenarios.base import Examples, Task

def _words(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(3, 6)))) for _ in range(count)]


TASKS = {
    "colour": ("Colour of {w}?", lambda w: "red", "exact_match"),
    "shape": ("Shape of {w}?", lambda w: "round", "edit_similarity"),
    "size": ("Size of {w}?", lambda w: "big", "accuracy"),
}


class InstructToy(InstructionScenario):
    """Three synthetic word tasks and a general suite; ``train_size``/``test_size`` examples each."""

    description = "synthetic word tasks (colour, shape, size) for tests, no data needed"
    default_model = "tiny_llama"

    def __init__(self, *, train_size: int = 48, test_size: int = 12, data_seed: int = 0, **caps):
        super().__init__(**caps)
        self.train_size, self.test_size, self.data_seed = train_size, test_size, data_seed

    def examples(self, template: str, answer, words: list[str]) -> Examples:
        return Examples([template.format(w=w) for w in words], [answer(w) for w in words])

    def build(self):
        rng = np.random.default_rng(self.data_seed)
        tasks = []
        for index, (name, (template, answer, scorer)) in enumerate(TASKS.items()):
            words = _words(rng, self.train_size + self.test_size)
            tasks.append(Task(index, name, self.examples(template, answer, words[: self.train_size]),
                              self.examples(template, answer, words[self.train_size:]),
                              instruction=template, scorer=scorer, max_new_tokens=8))
        general_template = "Twice: {w}\nAnswer:"
        general = [Task(0, "twice", Examples([], []),
                        self.examples(general_template, lambda w: w + w, _words(rng, self.test_size)),
                        instruction=general_template, scorer="rouge_l", max_new_tokens=12)]
        return tasks, general, {"source": "synthetic", "data_seed": self.data_seed}
