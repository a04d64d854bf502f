"""Whether a challenger accepts what its champion's clients send: MLflow signatures compared input by input.

A challenger that needs a column the clients do not send answers 422 to every request routed to it, which no
error-ratio gate sees (a 4xx is the client's mistake). So `plan`, `pin` and `rollout` refuse two variants of one
model whose signatures differ that way, unless the model's `allowBreakingSignature` says it is deliberate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_serving.modelenv import ImageError, inputs_of, model_environment

__all__ = ["SignatureError", "breaking_changes", "check_model", "check_variants", "inputs_of", "unsigned"]

if TYPE_CHECKING:
    from ml_serving.registry import ResolvedVersion
    from ml_serving.settings import Model


class SignatureError(ValueError):
    """Two variants of a model are not interchangeable for its clients; the message names the inputs."""


def _key(spec: dict[str, Any], index: int) -> str:
    return str(spec.get("name", f"#{index}"))


def _type(spec: dict[str, Any]) -> str:
    if spec.get("type") == "tensor":
        tensor = spec.get("tensor-spec", {})
        return f"tensor {tensor.get('dtype')} {tuple(tensor.get('shape', ()))}"
    return str(spec.get("type"))


def breaking_changes(champion: list[dict[str, Any]] | None, challenger: list[dict[str, Any]] | None) -> list[str]:
    """What a client of the champion would have refused by the challenger: inputs it must now send, changed types.

    Without a signature on either side nothing can be compared, and nothing is reported.
    """
    if champion is None or challenger is None:
        return []
    before = {_key(s, i): s for i, s in enumerate(champion)}
    problems = []
    for index, spec in enumerate(challenger):
        name = _key(spec, index)
        required = spec.get("required", True)
        if name not in before:
            if required:
                problems.append(f"requires input {name!r} ({_type(spec)}), which the champion does not take")
            continue
        if _type(spec) != _type(before[name]):
            problems.append(f"input {name!r} changed from {_type(before[name])} to {_type(spec)}")
        elif required and not before[name].get("required", True):
            problems.append(f"input {name!r} was optional and is now required")
    return problems


def check_variants(where: str, signatures: dict[str, list[dict[str, Any]] | None], champion: str) -> None:
    """Every other variant against `champion`; raises `SignatureError` naming each variant and input."""
    problems = []
    for variant, inputs in signatures.items():
        if variant == champion:
            continue
        for problem in breaking_changes(signatures.get(champion), inputs):
            problems.append(f"{where}.variants.{variant} {problem}")
    if problems:
        raise SignatureError(
            "; ".join(problems) + f": clients of {champion} would be refused (4xx). Keep the inputs compatible, or set "
            f"{where}.allowBreakingSignature: true if the break is deliberate"
        )


def unsigned(where: str, registered_model: str, version: str) -> str:
    """The warning for a version logged without a signature: a team should know its requests go unchecked."""
    return (
        f"{where}: {registered_model} version {version} has no signature: requests reach the model unchecked "
        "(the server checks only their form) and no challenger can be compared with it; log the model with a "
        "signature (mlflow.models.infer_signature)"
    )


def check_model(
    where: str, model: Model, versions: dict[str, ResolvedVersion], lock_dir: Path, warn: Any = None
) -> None:
    """`check_variants` for `model`, reading each resolved version's signature from model-lock/ or the store;
    `warn(message)` hears of each version without a signature.

    A version whose files cannot be read is left out (`plan` reports those itself).
    """
    signatures: dict[str, list[dict[str, Any]] | None] = {}
    for variant, found in versions.items():
        try:
            inputs = model_environment(
                model.registered_model, found.version, found.model_uri, lock_dir
            ).signature_inputs
        except ImageError:
            continue
        signatures[variant] = list(inputs) if inputs is not None else None
        if inputs is None and warn is not None:
            warn(unsigned(f"{where}.variants.{variant}", model.registered_model, found.version))
    if not model.allow_breaking_signature:
        check_variants(where, signatures, model.champion)
