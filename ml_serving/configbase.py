"""The building blocks of the stack config model, below `settings`: its error types and messages, the value types
its fields share (DNS labels, quantities, registry versions), and the engine's JSON-encoded values.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from ml_serving import PROJECT

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


class ConfigError(ValueError):
    """Invalid stack config: the message names the stack file, each bad config path and its fix."""


class PathError(ValueError):
    """A check across several keys, reported at the config path it is about rather than where it runs."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label: use at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. 'churn-v2')"
        )
    return value


def _quantity(value: Any) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not QUANTITY.match(text):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '500m' or '2' for cpu, '1Gi' for memory)")
    return text


def _version(value: Any) -> Any:
    """MLflow versions are strings; accept `version: 9` as well as `version: "9"`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _positive_version(value: str) -> str:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{value!r} is not a registry version: use the version number, e.g. '3'")
    return value


DnsLabel = Annotated[str, AfterValidator(_dns_label)]
Quantity = Annotated[str, BeforeValidator(_quantity)]
ModelVersion = Annotated[str, BeforeValidator(_version), AfterValidator(_positive_version)]


def decode(value: Any) -> Any:
    """The Pulumi engine hands structured config over as JSON text; plain strings stay strings."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def format_errors(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic's errors as one message: the stack file, then each config path and its fix."""
    lines = [f"{source}: invalid stack config ({exc.error_count()} problem{'s' * (exc.error_count() > 1)}):"]
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if p != "[key]"]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, PathError):
            loc = [*loc, *cause.path.split(".")]
        path = ".".join(loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_hint(root, error["loc"])
        elif error["type"] == "missing":
            message = "required: add this key"
        elif error["type"] in ("int_type", "int_from_float", "int_parsing"):
            message = f"{error['input']!r} is not a whole number: write an integer, e.g. 10"
        elif error["type"] in ("literal_error", "enum"):
            message = f"{error['input']!r} is not allowed: {error['msg'].removeprefix('Input should be ')}"
        elif error["type"] == "bool_type":
            message = f"{error['input']!r} is not a boolean: write true or false"
        elif error["type"] == "greater_than_equal":
            message = f"{error['input']!r} is too small: use a value of at least {error['ctx']['ge']}"
        elif error["type"] == "greater_than":
            message = f"{error['input']!r} is too small: use a value greater than {error['ctx']['gt']}"
        elif error["type"] in ("less_than_equal", "less_than"):
            bound = error["ctx"].get("le", error["ctx"].get("lt"))
            message = f"{error['input']!r} is too large: use a value of at most {bound}"
        elif error["type"] == "too_short":
            message = "is empty: add at least one entry"
        elif error["type"] == "string_pattern_mismatch":
            message = f"{error['input']!r} does not match the pattern {error['ctx']['pattern']}"
        elif error["type"] == "dict_type":
            message = f"expected a mapping of keys to values, got {type(error['input']).__name__}"
        if "[key]" in error["loc"]:
            message = f"name {error['loc'][-2]!r}: {message}" if len(error["loc"]) > 1 else message
        lines.append(f"  - {PROJECT}:{path}: {message}")
    return "\n".join(lines)


def one_problem(source: str, path: str, message: str) -> str:
    """A config error found outside the model (e.g. where the specs are built), worded like `format_errors`."""
    return f"{source}: invalid stack config (1 problem):\n  - {PROJECT}:{path}: {message}"


def _unknown_key_hint(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    allowed = _allowed_keys(root, loc[:-1])
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key '{key}': {hint}allowed keys here: {', '.join(sorted(allowed))}"


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the settings model along an error location to list the keys valid at that place."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for n, f in annotation.model_fields.items() if (f.alias or n) == part),
                None,
            )
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or n for n, f in annotation.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and Annotated[...] to reach the model class or dict type underneath."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


class ConfigModel(BaseModel):
    """camelCase keys as in the stack file; unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True, validate_default=True)
