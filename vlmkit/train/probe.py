"""Do the frozen encoder's features separate the training answers? A linear probe, run before a stage that keeps
the encoder frozen (issue 15: a small data set of another domain on the tiny tower, which only knows easy-VQA's
shapes, trained to one answer for everything while the loss looked fine).

For each question that repeats in the training data (the same text, at least `min_examples` times, with two or
more answers that themselves repeat: classes, not free text), a multinomial logistic regression from the image's
mean-pooled features to the answer is fitted on three quarters of its examples and scored on the rest. The
held-out accuracy over all probed questions is compared with always answering each question's most frequent
training answer. A few seconds; no global RNG is touched, so training is the same with or without it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch


@dataclass
class ProbeResult:
    questions: int  # repeated questions probed
    held_out: int  # held-out examples scored
    accuracy: float  # the probe's held-out accuracy
    majority: float  # each question's most frequent training answer, on the same held-out examples

    @property
    def poor(self) -> bool:
        """The probe closes less than half of the gap between the majority answer and a perfect score."""
        return self.accuracy < self.majority + 0.5 * (1.0 - self.majority)

    def describe(self) -> str:
        return (f"a linear probe on the frozen features answers {self.accuracy:.0%} of {self.held_out:,} held-out "
                f"examples of {self.questions} repeated question{'s' * (self.questions != 1)} "
                f"(each question's most frequent answer: {self.majority:.0%})")


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int) -> torch.Tensor:
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([weight.detach(), bias.detach()[None]])


@torch.no_grad()
def _pooled(features: torch.Tensor) -> torch.Tensor:
    # pooled in fp32 without an fp32 copy of the whole cache (it may be gigabytes of bf16)
    pooled = features.mean(dim=1, dtype=torch.float32) if features.dim() == 3 else features.float()
    return (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-6)


def answer_probe(features: torch.Tensor, question_answers: list[tuple[int, str, str]], *, min_examples: int = 40,
                 max_questions: int = 20, steps: int = 150, seed: int = 0) -> ProbeResult | None:
    """Probe `features` (num_images, N, D) against (image index, question, answer) triples; None when no question
    repeats often enough to be probed (free-form instructions)."""
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for image, question, answer in question_answers:
        groups[question.lower()].append((image, answer.strip().lower()))
    # a question whose answers are classes (each seen ~5 times or more on average), not free text
    usable = [g for g in groups.values()
              if len(g) >= min_examples and 2 <= len({a for _, a in g}) <= len(g) // 5]
    if not usable:
        return None
    usable = sorted(usable, key=len, reverse=True)[:max_questions]
    pooled = _pooled(features)
    generator = torch.Generator().manual_seed(seed)
    right = majority_right = total = 0
    for group in usable:
        order = torch.randperm(len(group), generator=generator).tolist()
        cut = len(group) - max(1, len(group) // 4)
        train, test = [group[i] for i in order[:cut]], [group[i] for i in order[cut:]]
        labels = {a: k for k, a in enumerate(sorted({a for _, a in group}))}
        most = Counter(a for _, a in train).most_common(1)[0][0]
        with torch.enable_grad():
            weight = _fit(pooled[[i for i, _ in train]], torch.tensor([labels[a] for _, a in train]), len(labels),
                          steps)
        scores = pooled[[i for i, _ in test]] @ weight[:-1] + weight[-1]
        truth = torch.tensor([labels[a] for _, a in test])
        right += int((scores.argmax(1) == truth).sum())
        majority_right += sum(a == most for _, a in test)
        total += len(test)
    return ProbeResult(len(usable), total, right / total, majority_right / total)
