"""Datasets of the paper: geometry, Squares/Shapes/Objects, What'sUp, COCO-spatial, pairs, scoring.

    from spatial_jax import data
    g = data.get_geometry("qwen2_vl")
    items = data.generate("squares", g)              # 480 Items: image, prompt, answer, regions
    task = data.setup_task("squares", g, "last_token")   # the official last-token colour pool
    golden = data.last_token_pairs(task.item, list(task.entities), predict)   # one stream, 4 directions
"""
from spatial_jax.data.coco import CocoItem, load_coco_spatial, parse_caption, strict_outcome
from spatial_jax.data.geometry import GEOMETRIES, Geometry, box_to_tokens, get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.pairs import Pair, criss_cross_pair, criss_cross_pairs, last_token_pair, last_token_pairs
from spatial_jax.data.prompts import DIRECTIONS, OPPOSITE, SYSTEM_TEXT, cloze_prompt, coco_prompt
from spatial_jax.data.regions import Regions, box_regions, layout_regions
from spatial_jax.data.scoring import (Candidates, answer_probs, answers_match, is_single_token, normalize,
                                      spelling_ids, spelling_table, top1_correct, top1_tokens)
from spatial_jax.data.synthetic import (LAST_TOKEN_COLOURS, OBJECTS, SHAPES,
                                        SQUARE_COLOURS, TASKS, SyntheticTask, generate, make_task, objects_for,
                                        palette_for, setup_task, split_triples)
from spatial_jax.data.whatsup import side_objects, single_token_objects, stitch, whatsup_item, whatsup_items

__all__ = [
    "CocoItem", "load_coco_spatial", "parse_caption", "strict_outcome",
    "GEOMETRIES", "Geometry", "box_to_tokens", "get_geometry",
    "Item",
    "Pair", "criss_cross_pair", "criss_cross_pairs", "last_token_pair", "last_token_pairs",
    "DIRECTIONS", "OPPOSITE", "SYSTEM_TEXT", "cloze_prompt", "coco_prompt",
    "Regions", "box_regions", "layout_regions",
    "Candidates", "answer_probs", "answers_match", "is_single_token", "normalize", "spelling_ids", "spelling_table",
    "top1_correct", "top1_tokens",
    "LAST_TOKEN_COLOURS", "OBJECTS", "SHAPES", "SQUARE_COLOURS", "TASKS",
    "SyntheticTask", "generate", "make_task", "objects_for", "palette_for", "setup_task", "split_triples",
    "side_objects", "single_token_objects", "stitch", "whatsup_item", "whatsup_items",
]
