"""WordNet: class-incremental text classification of WordNet 3.0 glosses by lexicographer file.

Source: the Princeton WordNet 3.0 database files ``data.noun``, ``data.verb``, ``data.adj`` and
``data.adv`` (Debian package ``wordnet-base``, installed under ``/usr/share/wordnet``). Each
synset's gloss (definition plus example sentences) is one sample, labelled by the
lexicographer file its synset lives in (45 classes such as ``noun.animal`` or ``verb.motion``).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import HeldOutScenario
from cl_bench.scenarios.base import Samples

# The lexicographer files of WordNet 3.0, indexed by the two-digit lex_filenum of data.* lines.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DEFAULT_ROOT = Path("/usr/share/wordnet")


def parse_data_file(path: Path) -> list[tuple[int, str]]:
    """(lex_filenum, gloss) for every synset line of a WordNet data.* file; licence lines are skipped."""
    entries = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, bar, gloss = line.partition(" | ")
            fields = head.split()
            if not bar or len(fields) < 4 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
                raise UserError(f"line {number} of {path} is not a WordNet synset line "
                                "(offset lex_filenum ss_type w_cnt ... | gloss)")
            gloss = " ".join(gloss.split())
            if gloss:
                entries.append((int(fields[1]), gloss))
    return entries


class WordNet(HeldOutScenario):
    """WordNet 3.0 glosses labelled by their 45 lexicographer classes; default 5 tasks of 9 classes."""

    description = "WordNet 3.0 glosses classified by lexicographer file, 45 classes (Debian wordnet-base)"
    default_model = "minilm"
    input_kind = "text"

    def __init__(self, *, root: str | None = None, test_fraction: float = 0.2, increment: int = 9,
                 max_per_class: int | None = 200, max_test_per_class: int | None = 50, **split):
        super().__init__(test_fraction=test_fraction, increment=increment, max_per_class=max_per_class,
                         max_test_per_class=max_test_per_class, **split)
        self.root = root

    def locate(self) -> list[Path]:
        directory = Path(self.root).expanduser() if self.root is not None else DEFAULT_ROOT
        paths = [directory / name for name in DATA_FILES]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            where = f"scenario.root={self.root}" if self.root is not None else str(directory)
            raise UserError(
                f"WordNet 3.0 data files missing ({', '.join(missing)} not in {where}); install them with "
                "`apt-get install --no-install-recommends wordnet-base` (Debian) or pass scenario.root=DIR "
                f"holding {', '.join(DATA_FILES)}")
        return paths

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        paths = self.locate()
        entries = [entry for path in paths for entry in parse_data_file(path)]
        # A gloss text that occurs more than once is kept once; one that occurs under several
        # classes is dropped, so no text is both a train and a test sample, nor ambiguous.
        labels_of: dict[str, set[int]] = {}
        for label, gloss in entries:
            labels_of.setdefault(gloss, set()).add(label)
        texts, targets, seen = [], [], set()
        for label, gloss in entries:
            if gloss in seen or len(labels_of[gloss]) > 1:
                continue
            seen.add(gloss)
            texts.append(gloss)
            targets.append(label)
        targets_np = np.asarray(targets, dtype=np.int64)
        counts = Counter(targets)
        thin = [LEXNAMES[c] for c in range(len(LEXNAMES)) if counts.get(c, 0) < 2]
        if thin:
            raise UserError(f"WordNet classes {', '.join(thin)} have fewer than 2 distinct glosses in "
                            f"{paths[0].parent}; need at least one train and one test sample each")
        # Per-class train/test split, fixed by split_seed and done before any subsampling.
        rng = np.random.default_rng(self.split_seed)
        train_idx, test_idx = [], []
        for c in range(len(LEXNAMES)):
            members = rng.permutation(np.flatnonzero(targets_np == c))
            n_test = min(len(members) - 1, max(1, round(len(members) * self.test_fraction)))
            test_idx.append(members[:n_test])
            train_idx.append(members[n_test:])
        train_idx, test_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))

        def part(index: np.ndarray) -> Samples:
            return Samples([texts[i] for i in index], torch.from_numpy(targets_np[index]))

        provenance = {
            "source": "WordNet 3.0 data.* files (Princeton University)",
            "data_dir": str(paths[0].parent),
            "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in paths},
            "synsets": len(entries), "distinct_glosses": len(texts),
            "test_fraction": self.test_fraction, "split_seed": self.split_seed,
        }
        return part(train_idx), part(test_idx), list(LEXNAMES), provenance
