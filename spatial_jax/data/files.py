"""Reading dataset files with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image


def read_json(path: Path) -> Any:
    """The parsed JSON at `path`; FileNotFoundError / ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: malformed JSON: {error}") from error


def open_rgb(path: Path, what: str) -> Image.Image:
    """The image at `path` as RGB, loaded; `what` names it in errors ("COCO image", ...)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from error
