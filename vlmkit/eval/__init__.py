"""Evaluation: exact-match VQA accuracy with a report and a confusion matrix."""
from __future__ import annotations

from dataclasses import dataclass

from vlmkit.config import option

TASKS = ("rec", "reg", "caption", "vqa", "retrieval", "pope", "tamp")


@dataclass
class EvalOptions:
    """`vlmkit eval`'s settings (its flags are made from these fields)."""
    task: str | None = option(None, "grounding evaluation on generated scenes (see above); retrieval: a Q-Former's "
                                    "image-text retrieval (ITC ranking, ITM re-ranking of the top 16), R@1/R@5 both "
                                    "ways, among --limit (default 100) held-out scenes with distinct captions, or a "
                                    "caption JSON's records; tamp: PaLM-E's tabletop questions and plans (plans "
                                    "executed against the scene), default data tabletop:VIEW:test:n500", kind=str,
                       choices=TASKS)
    data: str | None = option(None, "without --task: 'easy-vqa' (default) or a LLaVA JSON file (last turn = "
                                    "reference); with --task: a scene source (default scenes:TASK:test:n1000 at the "
                                    "size and shape count the run trained on, e.g. scenes:rec:test:n500) or a JSON "
                                    "written by `vlmkit data scenes`", kind=str)
    split: str | None = option(None, "easy-VQA split, or with --task the scenes' split (default test)", kind=str,
                               choices=("train", "test"))
    image_folder: str | None = option(None, "folder the JSON's image paths are relative to (with --task: default "
                                            "the JSON's folder)", kind=str)
    skip_bad: bool = option(False, "skip bad records and count them")
    limit: int = option(0, "only the first N records (0 = all)")
    batch_size: int = option(128, "prompts per generation batch")
    max_new_tokens: int = option(0, "answer token budget (0 = 8 without --task; with it 1.25 x the longest "
                                    "reference + 4)")
