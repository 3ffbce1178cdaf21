"""The tasks evlm knows, as the torch-free side needs them: their metrics, whether their examples
carry answers, whether they export to ONNX and what their scoring needs installed.

The spec rules, the reports and the task library all read this one table; the task library
(`evlm_cli.tasks`) adds the heads, losses and scorers, which need torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    name: str
    # The metrics `evaluate.metric` may name; the first is the default and the headline.
    metrics: tuple[str, ...]
    # Questions and statements have answers (an answer list, answer balancing); image-text
    # pairs and captions do not.
    has_answers: bool
    # Scored by one pass whose graph ONNX export captures (retrieval re-ranks, captioning
    # decodes: neither is one graph yet).
    exportable: bool
    # pycocoevalcap's tokenizer and METEOR run in Java.
    needs_java: bool = False

    @property
    def headline(self) -> str:
        return self.metrics[0]


CATALOGUE: dict[str, TaskInfo] = {
    "vqa": TaskInfo("vqa", ("vqa_accuracy",), has_answers=True, exportable=True),
    "nlvr2": TaskInfo("nlvr2", ("nlvr2_accuracy",), has_answers=True, exportable=False),
    "retrieval": TaskInfo("retrieval", ("recall_at_k",), has_answers=False, exportable=False),
    "captioning": TaskInfo("captioning", ("cider", "bleu", "meteor", "rouge_l"),
                           has_answers=False, exportable=False, needs_java=True),
}
