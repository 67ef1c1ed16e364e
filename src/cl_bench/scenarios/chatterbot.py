"""ChatterBot: English dialog utterances classified by the topic file they come from (21 topics).

Source: the English YAML files of the ``chatterbot-corpus`` package (PyPI, version 1.3.3, BSD
licence), read from the installed package, so no download happens at run time. Every distinct
utterance of a conversation (prompts and answers alike, whitespace collapsed) is one sample,
labelled by its file (``ai``, ``computers``, ``trivia``, ...); the few utterances that occur under
more than one topic ("Hello", "Yes.") are dropped. About 1,900 short sentences: small, but a text
source unrelated to WordNet glosses, e.g. as outside data for initialising DKVB's keys.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import HeldOutScenario
from cl_bench.scenarios.base import Samples

PACKAGE = "chatterbot_corpus"


def load_utterances() -> tuple[list[str], list[int], list[str], str]:
    """(utterances, topic ids, topic names, package version) from the installed English corpus."""
    import importlib.resources

    import yaml

    try:
        import chatterbot_corpus
    except ImportError:
        raise UserError("the chatterbot scenario needs the corpus: `pip install chatterbot-corpus==1.3.3`") from None
    folder = importlib.resources.files(PACKAGE) / "data" / "english"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    topics_of: dict[str, set[int]] = defaultdict(set)
    for topic, file in enumerate(files):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{file} is not valid YAML: {str(error).splitlines()[0]}") from error
        for conversation in data.get("conversations") or []:
            for utterance in conversation:
                text = " ".join(str(utterance).split())
                if text:
                    topics_of[text].add(topic)
    texts = sorted(text for text, topics in topics_of.items() if len(topics) == 1)
    if not texts:
        raise UserError(f"no English utterances found in {folder}")
    labels = [next(iter(topics_of[text])) for text in texts]
    names = [f.name.removesuffix(".yml") for f in files]
    return texts, labels, names, chatterbot_corpus.__version__


class ChatterBot(HeldOutScenario):
    """ChatterBot English utterances labelled by topic; default 7 tasks of 3 topics."""

    description = "ChatterBot English dialog utterances by topic, 21 classes (PyPI chatterbot-corpus)"
    default_model = "minilm"
    input_kind = "text"

    def __init__(self, *, increment: int = 3, **split):
        super().__init__(increment=increment, **split)

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        texts, labels, names, version = load_utterances()
        targets = np.asarray(labels, dtype=np.int64)
        train_idx, test_idx = self.stratified_split(targets)

        def part(index: np.ndarray) -> Samples:
            return Samples([texts[i] for i in index], torch.from_numpy(targets[index]))

        provenance = {"source": f"chatterbot-corpus {version} (English)", "utterances": len(texts),
                      "test_fraction": self.test_fraction, "split_seed": self.split_seed}
        return part(train_idx), part(test_idx), names, provenance
