"""The rollout's edits of the stack file: weights, promotion, and putting its own fields back after a failed `up`.

Each is a round-trip edit (comments kept, the file replaced atomically) of one model's variants, reached through
`stackfile.variants_of`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_serving.settings import Rollout
from ml_serving.stackfile import edit, load_document, variants_of


def write_weights(path: Path, model_key: str, weights: dict[str, int]) -> str:
    def change(document: Any) -> None:
        variants = variants_of(document, model_key)
        for name, weight in weights.items():
            variants[name]["weight"] = weight

    return edit(path, change)


# What a variant serves: its version (by alias, or pinned) and the runtime that serves it; promotion moves all.
VERSION_KEYS = ("alias", "version", "modelUri", "runId", "pinnedFrom", "runtime")


def variant_fields(path: Path, model_key: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The rollout's own fields of `names` as the file has them now (to put back if an `up` fails)."""
    variants = variants_of(load_document(path), model_key)
    return {n: {k: variants[n][k] for k in (*VERSION_KEYS, "weight") if k in variants[n]} for n in names}


def restore_fields(path: Path, model_key: str, saved: dict[str, dict[str, Any]]) -> None:
    """Put back only these variants' version and weight fields: other models and comments edited since stay."""

    def change(document: Any) -> None:
        variants = variants_of(document, model_key)
        for name, fields in saved.items():
            for key in (*VERSION_KEYS, "weight"):
                variants[name].pop(key, None)
            for key, value in fields.items():
                variants[name][key] = value

    edit(path, change)


def promote_in_config(path: Path, model_key: str, plan: Rollout) -> str:
    """The challenger's version becomes the champion's; the champion serves 100 % again."""

    def change(document: Any) -> None:
        variants = variants_of(document, model_key)
        champion, challenger = variants[plan.champion], variants[plan.challenger]
        for key in VERSION_KEYS:
            champion.pop(key, None)
        for key in VERSION_KEYS:
            if key in challenger:
                champion[key] = challenger[key]
        champion["weight"], challenger["weight"] = 100, 0

    return edit(path, change)


@dataclass(frozen=True)
class Restore:
    """How to undo one edit if its `pulumi up` fails: its fields through the YAML, or its lines as text."""

    fields: Callable[[], None]
    text_before: str
    text_after: str
