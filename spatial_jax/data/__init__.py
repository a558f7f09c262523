"""Datasets of the paper: geometry, Squares/Shapes/Objects, What'sUp, COCO-spatial, pairs, scoring.

    from spatial_jax import data
    g = data.get_geometry("qwen2_vl")
    items = data.generate("squares", g)              # 480 Items: image, prompt, answer, regions
    golden = data.last_token_pairs(data.make_task("squares", g).item, list(data.SQUARE_COLOURS), predict)
"""
from spatial_jax.data.coco import CocoItem, load_coco_spatial, parse_caption, strict_outcome
from spatial_jax.data.geometry import GEOMETRIES, Geometry, box_to_tokens, get_geometry
from spatial_jax.data.items import Item
from spatial_jax.data.pairs import Pair, criss_cross_pair, criss_cross_pairs, last_token_pair, last_token_pairs
from spatial_jax.data.prompts import DIRECTIONS, OPPOSITE, SYSTEM_TEXT, cloze_prompt, coco_prompt
from spatial_jax.data.regions import Regions, box_regions, layout_regions
from spatial_jax.data.scoring import (answer_probs, is_single_token, spelling_ids, spelling_table, top1_correct,
                                      top1_tokens)
from spatial_jax.data.synthetic import (OBJECTS, SHAPES, SQUARE_COLOURS, TASKS, SyntheticTask, generate, make_task,
                                        split_triples)
from spatial_jax.data.whatsup import side_objects, single_token_objects, stitch, whatsup_item, whatsup_items

__all__ = [
    "CocoItem", "load_coco_spatial", "parse_caption", "strict_outcome",
    "GEOMETRIES", "Geometry", "box_to_tokens", "get_geometry",
    "Item",
    "Pair", "criss_cross_pair", "criss_cross_pairs", "last_token_pair", "last_token_pairs",
    "DIRECTIONS", "OPPOSITE", "SYSTEM_TEXT", "cloze_prompt", "coco_prompt",
    "Regions", "box_regions", "layout_regions",
    "answer_probs", "is_single_token", "spelling_ids", "spelling_table", "top1_correct", "top1_tokens",
    "OBJECTS", "SHAPES", "SQUARE_COLOURS", "TASKS", "SyntheticTask", "generate", "make_task", "split_triples",
    "side_objects", "single_token_objects", "stitch", "whatsup_item", "whatsup_items",
]
