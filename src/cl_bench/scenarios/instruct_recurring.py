"""An offline instruction stream whose instructions recur: the same sources as ``instruct_offline``
(WordNet 3.0 and the English ChatterBot corpus), six tasks, two of which bring back a paraphrase of
an earlier task's instruction on new data.

1. ``define_noun``        a monosemous noun -> its definition               (ROUGE-L)
2. ``antonym_adjective``  an adjective -> its direct antonym                (exact match, any antonym)
3. ``define_adjective``   a monosemous adjective -> its definition          (ROUGE-L)     recurs 1's instruction
4. ``topic``              a ChatterBot utterance -> its topic, of five      (accuracy)
5. ``antonym_noun``       a noun -> its direct antonym                      (exact match)  recurs 2's instruction
6. ``spelling``           a noun with one seeded typo -> the noun           (edit similarity)

Trivia is the held-out general suite; splits, seeds and ``order`` work as in ``instruct_offline``.
A recurring instruction says the same thing in other words ("Define the word ..." / "In one short
phrase, define this word ..."), so an instruction-similarity method such as CoIN (``coin_ema``,
TF-IDF cosine, τ = 0.9) retrains the earlier task's group on tasks 3 and 5 (similarity 1.00 and
0.98) and opens a new group for the others (best similarity 0.34, 0.08, 0.37): four groups for six
tasks. ``instruct_offline`` has five unrelated instructions (best at most 0.29), so there CoIN only
ever opens groups. ``benchmarks/coin_groups.py`` prints these numbers.
"""
from __future__ import annotations

from cl_bench.scenarios.instruct_offline import PROMPTS, SCORERS, InstructOffline

TASK_NAMES = ("define_noun", "antonym_adjective", "define_adjective", "topic", "antonym_noun", "spelling")
RECURS = {"define_adjective": "define_noun", "antonym_noun": "antonym_adjective"}  # task -> task it paraphrases


class InstructRecurring(InstructOffline):
    """Six WordNet/ChatterBot instruction tasks whose instructions recur as paraphrases, all offline."""

    description = ("offline instruction stream whose instructions recur: 6 WordNet + ChatterBot tasks, "
                   "2 paraphrasing an earlier task's instruction, and a trivia general suite")
    task_names = TASK_NAMES
    prompts = {
        "define_noun": 'Define the word "{text}" in one short phrase.',
        "antonym_adjective": 'Give the antonym of the word "{text}", the word that means its opposite. '
                             'Answer with one word.',
        "define_adjective": 'In one short phrase, define this word: "{text}".',
        "topic": PROMPTS["topic"],
        "antonym_noun": 'Answer with one word: which word means the opposite of "{text}"? Give its antonym.',
        "spelling": PROMPTS["spelling"],
        "trivia": PROMPTS["trivia"],
    }
    scorers = {"define_noun": "rouge_l", "antonym_adjective": "exact_match", "define_adjective": "rouge_l",
               "topic": SCORERS["topic"], "antonym_noun": "exact_match", "spelling": SCORERS["spelling"],
               "trivia": SCORERS["trivia"]}
    max_new_tokens = {"define_noun": 32, "antonym_adjective": 8, "define_adjective": 32, "topic": 6,
                      "antonym_noun": 8, "spelling": 8, "trivia": 32}

    def task_items(self, synsets, conversations, rng) -> dict[str, list]:
        return {
            "define_noun": self.define_items(synsets, "noun"),
            "antonym_adjective": self.antonym_items(synsets, "adj"),
            "define_adjective": self.define_items(synsets, "adj"),
            "topic": self.topic_items(conversations),
            "antonym_noun": self.antonym_items(synsets, "noun"),
            "spelling": self.spelling_items(synsets, rng),
        }
