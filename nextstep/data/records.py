"""From the files of one sample to a training sample: which file is what, captions, images.

All real-data formats name a sample's files the same way, as a key plus an
extension (the WebDataset convention), e.g. `0001.jpg` + `0001.txt`, or for an
edit `0001.source.png` + `0001.target.png` + `0001.txt`:

| extension                                   | role                       |
|---------------------------------------------|----------------------------|
| jpg, jpeg, png, webp, bmp, tif, tiff        | image (text-to-image)      |
| source.* / src.* / input.* (an image ext)   | source image (edit)        |
| target.* / tgt.* / output.* / edited.*      | target image (edit)        |
| txt, caption.txt                            | caption (or instruction)   |
| instruction.txt                             | edit instruction           |
| json                                        | metadata: a caption under  |
|                                             | "caption", "text" or       |
|                                             | "prompt"; an instruction   |
|                                             | under "instruction"        |

A field's value is its bytes (from a tar), a `Path` (a file on disk) or a `str`
(text already read, e.g. from a JSONL line). Decoders raise `SkipSample` with a
short reason ("missing caption: ...") for a sample that cannot be used; Pillow's
own errors for an unreadable image propagate and are counted by type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..io.images import to_pixels
from .buckets import closest_bucket, fit_to_bucket, load_bucketed, open_image
from .stream import SkipSample

Field = Union[bytes, Path, str]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SOURCE_WORDS = ("source", "src", "input")
TARGET_WORDS = ("target", "tgt", "output", "edited")
CAPTION_KEYS = ("caption", "text", "prompt")
INSTRUCTION_KEYS = ("instruction", "edit", "caption", "text", "prompt")
TASKS = ("t2i", "edit")


def field_role(ext: str) -> str | None:
    """The role of a file extension (without the leading dot), or None if it is not ours."""
    parts = ext.lower().split(".")
    last, before = parts[-1], parts[-2] if len(parts) > 1 else None
    if last in IMAGE_EXTS:
        if before is None:
            return "image"
        if before in SOURCE_WORDS:
            return "source"
        if before in TARGET_WORDS:
            return "target"
        return None
    if last == "txt":
        return {None: "text", "caption": "text", "instruction": "instruction"}.get(before)
    if last == "json" and before is None:
        return "json"
    return None


def split_file_name(name: str) -> tuple[str, str]:
    """A file name in a folder -> (key, extension): the known two-part extensions first
    (`x.source.png`, `x.instruction.txt`), else the last dot, so `photo.2023.jpg` keeps its key."""
    stem, dot, last = name.rpartition(".")
    if not dot:
        return name, ""
    stem2, dot2, middle = stem.rpartition(".")
    if dot2 and field_role(f"{middle}.{last}") is not None:
        return stem2, f"{middle}.{last}"
    return stem, last


def roles(fields: dict[str, Field]) -> dict[str, Field]:
    """Extension -> value becomes role -> value (unknown extensions dropped)."""
    out: dict[str, Field] = {}
    for ext, value in fields.items():
        role = field_role(ext)
        if role is not None and role not in out:
            out[role] = value
    return out


def read_text(value: Field) -> str:
    if isinstance(value, str):
        return value
    data = value.read_bytes() if isinstance(value, Path) else value
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample("unreadable text: not UTF-8") from None


def _json(fields: dict[str, Field]) -> dict[str, Any] | None:
    if "json" not in fields:
        return None
    try:
        obj = json.loads(read_text(fields["json"]))
    except json.JSONDecodeError as e:
        raise SkipSample(f"bad json: {e}") from None
    if not isinstance(obj, dict):
        raise SkipSample(f"bad json: expected an object, got {type(obj).__name__}")
    return obj


def _text(fields: dict[str, Field], roles_: tuple[str, ...], keys: tuple[str, ...], what: str) -> str:
    text = None
    for role in roles_:
        if role in fields:
            text = read_text(fields[role])
            break
    else:
        meta = _json(fields)
        for k in keys if meta is not None else ():
            v = meta.get(k)
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                v = v[0]  # several captions: the first
            if isinstance(v, str):
                text = v
                break
    if text is None:
        raise SkipSample(f"missing {what}: no .txt file and no {'/'.join(keys)} in a .json")
    text = text.strip()
    if not text:
        raise SkipSample(f"empty {what}")
    return text


def caption_of(fields: dict[str, Field]) -> str:
    return _text(fields, ("text",), CAPTION_KEYS, "caption")


def instruction_of(fields: dict[str, Field]) -> str:
    return _text(fields, ("instruction", "text"), INSTRUCTION_KEYS, "instruction")


def _image(fields: dict[str, Field], role: str) -> bytes | Path:
    if role not in fields:
        what, prefix = ("image", "") if role == "image" else (f"{role} image", f"{role}.")
        raise SkipSample(f"missing {what}: no {prefix}jpg/png/webp/... file")
    return fields[role]


def decode_sample(fields: dict[str, Field], task: str, base: int) -> dict[str, Any]:
    """Role -> value fields of one sample -> the training sample.

    t2i: {"caption", "pixels"} (and "plan" where the fields hold one); edit: {"instruction", "source", "target"}.
    Pixels are (3, h, w) in [-1, 1] at the image's aspect-ratio bucket for
    `base`; an edit's source is fitted to its target's bucket.
    """
    if task == "t2i":
        caption = caption_of(fields)  # text first: it is cheaper to find missing than to decode
        image = load_bucketed(_image(fields, "image"), base)
        sample = {"caption": caption, "pixels": to_pixels(np.asarray(image))}
        if "plan" in fields:  # a manifest line's thought (the reader skips a line whose plan is not text)
            sample["plan"] = fields["plan"]
        return sample
    if task == "edit":
        instruction = instruction_of(fields)
        target = open_image(_image(fields, "target"))
        bucket = closest_bucket(target.height, target.width, base)
        source = fit_to_bucket(open_image(_image(fields, "source")), bucket)
        return {"instruction": instruction, "source": to_pixels(np.asarray(source)),
                "target": to_pixels(np.asarray(fit_to_bucket(target, bucket)))}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task
