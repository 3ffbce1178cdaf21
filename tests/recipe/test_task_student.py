"""The task student's layer maps: NLVR2 pairs the fusion layers of student and teacher alike."""

from evlm_cli.recipe.student import task_layer_maps

MAPS = {"vision": [1, 3], "text": [1], "fusion": [0, 2]}


def test_only_nlvr2_pairs_the_fusion_map():
    assert task_layer_maps(MAPS, "nlvr2") == {"vision": [1, 3], "text": [1], "fusion": [0, 1, 4, 5]}
    for task in ("vqa", "retrieval", "captioning"):
        assert task_layer_maps(MAPS, task) == MAPS
