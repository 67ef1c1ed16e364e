"""An instruction stream built only from data that installs offline: WordNet 3.0 (Debian
``wordnet-base``) and the English ChatterBot corpus (PyPI ``chatterbot-corpus``).

Five tasks, each with its own instruction format and a scorer that fits its answers:

1. ``category``  a noun's definition -> its WordNet category among six named ones  (accuracy)
2. ``define``    a monosemous noun -> its WordNet definition                       (ROUGE-L)
3. ``antonym``   an adjective -> its direct antonym (WordNet ``!`` pointer)        (exact match, any antonym)
4. ``topic``     a ChatterBot utterance -> the topic file it comes from, of five    (accuracy)
5. ``spelling``  a noun with one seeded typo -> the noun                           (edit similarity)

General suite, scored before training and after every task (general-ability retention):
``trivia``, held-out ChatterBot trivia questions scored by the share of the reference answer's
words found in the reply (``answer_recall``), so a chatty but correct answer counts.

Every task's examples are split into train/test with ``split_seed``; ``order`` permutes the tasks
(a list of task names). Definitions are the gloss text before its first example sentence.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from cl_bench.errors import UserError, check_ranges
from cl_bench.scenarios._scenario import InstructionScenario
from cl_bench.scenarios.base import Examples, Task
from cl_bench.scenarios.chatterbot import PACKAGE
from cl_bench.scenarios.wordnet import DEFAULT_ROOT, LEXNAMES

CATEGORIES = ("animal", "food", "plant", "artifact", "person", "body")
TOPICS = ("ai", "emotion", "literature", "money", "psychology")
TASK_NAMES = ("category", "define", "antonym", "topic", "spelling")
PROMPTS = {
    "category": "Which category does this definition belong to? Answer with one of: {options}.\n"
                "Definition: {text}",
    "define": "Define the noun \"{text}\" in one short phrase.",
    "antonym": "Give the antonym of the adjective \"{text}\". Answer with one word.",
    "topic": "Which topic does this chat message come from? Answer with one of: {options}.\nMessage: {text}",
    "spelling": "Correct the spelling of this word: {text}",
    "trivia": "Answer the question briefly.\nQuestion: {text}",
}
SCORERS = {"category": "accuracy", "define": "rouge_l", "antonym": "exact_match", "topic": "accuracy",
           "spelling": "edit_similarity", "trivia": "answer_recall"}
MAX_NEW_TOKENS = {"category": 6, "define": 32, "antonym": 8, "topic": 6, "spelling": 8, "trivia": 32}
WORD = re.compile(r"^[a-z]+$")
POINTER_POS = {"noun": ("n",), "adj": ("a", "s")}  # ss_type of a pointer target, by part of speech


def parse_synsets(path: Path) -> list[dict]:
    """Synset records of a WordNet data.* file: lexname, words, pointers (symbol, offset, pos, source/target), gloss."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or " | " not in line:
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            try:
                count = int(fields[3], 16)
                words = [fields[4 + 2 * i].lower() for i in range(count)]
                at = 4 + 2 * count
                pointers = [tuple(fields[at + 1 + 4 * i: at + 5 + 4 * i]) for i in range(int(fields[at]))]
                records.append({"offset": fields[0], "lexname": LEXNAMES[int(fields[1])], "words": words,
                                "pointers": pointers, "gloss": " ".join(gloss.split())})
            except (IndexError, ValueError) as error:
                raise UserError(f"{path} has a line that is not a WordNet synset line: {line[:60]!r}") from error
    return records


def definition(gloss: str) -> str:
    """The definition part of a gloss (before the first quoted example), without a trailing ';'."""
    return gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()


def misspell(word: str, rng: np.random.Generator) -> str:
    """One seeded typo: swap two neighbouring letters, drop one, or double one."""
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


class InstructOffline(InstructionScenario):
    """Five WordNet/ChatterBot instruction tasks and a trivia general suite, all offline."""

    description = "offline instruction stream: WordNet + ChatterBot tasks (5) and a trivia general suite"
    # the task table; a subclass with other tasks overrides these and ``task_items``
    task_names, prompts, scorers, max_new_tokens = TASK_NAMES, PROMPTS, SCORERS, MAX_NEW_TOKENS

    def __init__(self, *, root: str | None = None, order: list | None = None, test_per_task: int = 30,
                 general_size: int = 40, split_seed: int = 0, data_seed: int = 0,
                 max_train_per_task: int | None = 100, **caps):
        super().__init__(max_train_per_task=max_train_per_task, **caps)
        order = list(order) if order is not None else list(self.task_names)
        if sorted(order) != sorted(set(order)) or set(order) - set(self.task_names) or not order:
            raise UserError(f"scenario.order must list distinct tasks out of {', '.join(self.task_names)}, "
                            f"got {order}")
        check_ranges("scenario", test_per_task=(test_per_task, ">= 1"), general_size=(general_size, ">= 1"))
        self.root, self.order = root, order
        self.test_per_task, self.general_size = test_per_task, general_size
        self.split_seed, self.data_seed = split_seed, data_seed

    def wordnet(self) -> tuple[list[dict], dict]:
        directory = Path(self.root).expanduser() if self.root is not None else DEFAULT_ROOT
        paths = [directory / f"data.{pos}" for pos in ("noun", "adj")]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"WordNet 3.0 files {', '.join(missing)} not in {directory}; install them with "
                            "`apt-get install --no-install-recommends wordnet-base` or pass scenario.root=DIR")
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in paths}
        return [r for p in paths for r in parse_synsets(p)], files

    def chatterbot(self) -> tuple[dict[str, list[list[str]]], str]:
        import importlib.resources

        import yaml
        try:
            import chatterbot_corpus
        except ImportError:
            raise UserError(f"scenario {self.name} needs `pip install chatterbot-corpus==1.3.3`") from None
        folder = importlib.resources.files(PACKAGE) / "data" / "english"
        conversations = {}
        for topic in (*TOPICS, "trivia"):
            data = yaml.safe_load((folder / f"{topic}.yml").read_text(encoding="utf-8")) or {}
            conversations[topic] = [[" ".join(str(u).split()) for u in c] for c in data.get("conversations") or []]
        return conversations, chatterbot_corpus.__version__

    def build(self):
        synsets, files = self.wordnet()
        conversations, version = self.chatterbot()
        items = self.task_items(synsets, conversations, np.random.default_rng(self.data_seed))
        split = np.random.default_rng(self.split_seed)
        tasks = []
        for index, name in enumerate(self.order):
            train, test = self.split(items[name], self.test_per_task, split)
            tasks.append(self.task(index, name, train, test))
        trivia = [(q, (a,)) for q, a, *_ in conversations["trivia"] if q and a]
        _, held_out = self.split(trivia, self.general_size, split)
        general = [self.task(0, "trivia", [], held_out)]
        provenance = {"source": f"WordNet 3.0 ({', '.join(f'{k} {v}' for k, v in files.items())}); "
                                f"chatterbot-corpus {version} (English)",
                      "split_seed": self.split_seed, "data_seed": self.data_seed,
                      "available": {k: len(v) for k, v in items.items()}}
        return tasks, general, provenance

    def task_items(self, synsets, conversations, rng) -> dict[str, list]:
        """(input text, accepted answers) of every task, by task name."""
        return {
            "category": self.category_items(synsets),
            "define": self.define_items(synsets),
            "antonym": self.antonym_items(synsets),
            "topic": self.topic_items(conversations),
            "spelling": self.spelling_items(synsets, rng),
        }

    @staticmethod
    def split(items: list, test_size: int, rng: np.random.Generator) -> tuple[list, list]:
        if len(items) <= test_size:
            raise UserError(f"only {len(items)} examples, fewer than the {test_size + 1} a train/test split needs")
        order = rng.permutation(len(items))
        return [items[i] for i in sorted(order[test_size:])], [items[i] for i in sorted(order[:test_size])]

    def task(self, index: int, name: str, train: list, test: list) -> Task:
        options = ", ".join(CATEGORIES if name == "category" else TOPICS)
        template = self.prompts[name].replace("{options}", options)

        def examples(items):
            return Examples([template.format(text=text) for text, _ in items], [refs[0] for _, refs in items],
                            tuple(tuple(refs) for _, refs in items))
        return Task(index, name, examples(train), examples(test), instruction=template, scorer=self.scorers[name],
                    max_new_tokens=self.max_new_tokens[name])

    @staticmethod
    def category_items(synsets):
        by_category = {f"noun.{c}": c for c in CATEGORIES}
        return [(definition(s["gloss"]), (by_category[s["lexname"]],)) for s in synsets
                if s["lexname"] in by_category and 3 <= len(definition(s["gloss"]).split()) <= 25]

    @staticmethod
    def define_items(synsets, part: str = "noun"):
        """Monosemous words of one part of speech (``noun``, ``adj``) with their definitions."""
        words = [s for s in synsets if s["lexname"].startswith(f"{part}.")]
        senses = Counter(w for s in words for w in set(s["words"]))
        return [(s["words"][0], (definition(s["gloss"]),)) for s in words
                if WORD.match(s["words"][0]) and senses[s["words"][0]] == 1 and 3 <= len(definition(s["gloss"]).split()) <= 15]

    @staticmethod
    def antonym_items(synsets, part: str = "adj"):
        """Words of one part of speech (``adj``, ``noun``) with their direct antonyms."""
        same_part = {s["offset"]: s for s in synsets if s["lexname"].startswith(f"{part}.")}
        antonyms = defaultdict(set)
        for s in same_part.values():
            for symbol, offset, pos, source_target in s["pointers"]:
                if symbol == "!" and pos in POINTER_POS[part] and offset in same_part:
                    source, target = int(source_target[:2], 16), int(source_target[2:], 16)
                    word = s["words"][source - 1].split("(")[0]
                    other = same_part[offset]["words"][target - 1].split("(")[0]
                    if WORD.match(word) and WORD.match(other):
                        antonyms[word].add(other)
        return [(word, tuple(sorted(others))) for word, others in sorted(antonyms.items())]

    @staticmethod
    def topic_items(conversations):
        topics_of = defaultdict(set)
        for topic in TOPICS:
            for conversation in conversations[topic]:
                for utterance in conversation:
                    if len(utterance.split()) >= 3:
                        topics_of[utterance].add(topic)
        return [(text, (next(iter(t)),)) for text, t in sorted(topics_of.items()) if len(t) == 1]

    @staticmethod
    def spelling_items(synsets, rng):
        words = sorted({s["words"][0] for s in synsets if s["lexname"].startswith("noun.")
                        and WORD.match(s["words"][0]) and 6 <= len(s["words"][0]) <= 12})
        chosen = rng.choice(len(words), size=min(len(words), 2000), replace=False)
        return [(misspell(words[i], rng), (words[i],)) for i in sorted(chosen)]
