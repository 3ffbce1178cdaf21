"""The task student: what pruning starts from and what evaluate times as the dense student.

Its own module, so that evaluate's code fingerprint does not reach the pruning code.
"""

from __future__ import annotations

from pathlib import Path

from evlm_cli.data.loader import PreparedData
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.student import paired_layer_map
from evlm_cli.models.vlm import VLM, with_heads
from evlm_cli.tasks import TASKS


def task_student(distilled: Path, teacher: VLM, task: str, data: PreparedData) -> VLM:
    """The distilled student with the task's heads, shaped as the task teacher's: what pruning
    starts from (and what evaluate times as the dense student).

    The distilled student knows no task. A classifier starts fresh; retrieval keeps the
    pre-trained ITC and ITM heads, captioning the MLM head as its LM head. A task at another
    image size than the pairs resamples the positions, as the task teacher did.
    """
    return with_heads(load_model(distilled), list(TASKS[task].heads),
                      num_answers=teacher.config.num_answers, pool=teacher.config.pool,
                      image_size=data.meta["image_size"])


def task_layer_maps(layer_maps: dict[str, list[int]], task: str) -> dict[str, list[int]]:
    """The distilled student's layer maps (onto the pre-trained teacher) as they apply to the
    task's student and teacher: NLVR2's models pair their fusion layers (`with_heads`)."""
    if "nlvr2" not in TASKS[task].heads:
        return layer_maps
    return {**layer_maps, "fusion": paired_layer_map(layer_maps["fusion"])}
