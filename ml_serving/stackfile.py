"""Reading and editing `Pulumi.<stack>.yaml`: the only state a stack has.

Reads are strict (a duplicated key is an error, as it is for the Pulumi CLI). Edits are round-trips that keep
comments and layout, and replace the file atomically, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import difflib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from ml_serving import PROJECT
from ml_serving.settings import ConfigError, Settings, parse_settings

SECRET_PLACEHOLDER = "[secret]"


def stack_file(project_dir: Path, stack: str) -> Path:
    return project_dir / f"Pulumi.{stack}.yaml"


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.allow_duplicate_keys = False
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # block lists indented under their key, as the stack files write them
    return yaml


def load_document(path: Path) -> Any:
    """The stack file as a round-trip document (comments kept)."""
    if not path.exists():
        stacks = sorted(p.name for p in path.parent.glob("Pulumi.*.yaml"))
        raise ConfigError(f"{path.name}: no such stack file (stack files here: {', '.join(stacks) or 'none'})")
    try:
        document = _yaml().load(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path.name}: duplicate key: {_first_line(exc)}; keep one of them") from None
    except YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {_first_line(exc)}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict) or not isinstance(document.get("config", {}), dict):
        raise ConfigError(f"{path.name}: expected a mapping with a 'config:' mapping at the top")
    return document


def variants_of(document: Any, model_key: str) -> Any:
    """A model's `variants` mapping in a loaded stack document: the one place that knows the path to it."""
    return document["config"][f"{PROJECT}:models"][model_key]["variants"]


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def read_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Config values as the Pulumi engine would hand them to the program, and which keys are secret.

    Secrets cannot be decrypted without the Pulumi CLI; they are replaced with a placeholder.
    """
    return config_of(load_document(path))


def config_of(document: Any) -> tuple[dict[str, Any], list[str]]:
    """The config of a loaded stack document, plain values, secrets as a placeholder; and the secret keys."""
    config: dict[str, Any] = {}
    secrets: list[str] = []
    for key, value in (document.get("config") or {}).items():
        plain = _plain(value)
        if isinstance(plain, dict) and set(plain) == {"secure"}:
            secrets.append(str(key))
            plain = SECRET_PLACEHOLDER
        config[str(key)] = plain
    return config, secrets


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)


def load_settings(project_dir: Path, stack: str) -> Settings:
    path = stack_file(project_dir, stack)
    config, _ = read_config(path)
    return parse_settings(config, path.name)


def edit(path: Path, change: Callable[[Any], None], validate: bool = True) -> str:
    """Apply `change` to the round-trip document, check the result still parses, and replace the file atomically.

    Returns the new text. Nothing is written when `change` or the validation fails.
    """
    document = load_document(path)
    change(document)
    buffer = io.StringIO()
    _yaml().dump(document, buffer)
    text = buffer.getvalue()
    if validate:
        config, _ = config_of(_yaml().load(text))
        parse_settings(config, path.name)
    write_atomically(path, text)
    return text


def revert(path: Path, before: str, after: str) -> bool:
    """Undo the edit `before` -> `after` in the file as it is now, even in a file that no longer parses: only the
    lines that edit changed are put back, found where they are now, so lines others added or changed stay.

    False, and nothing written, when one of those lines is no longer as the edit left it.
    """
    written, wanted, current = after.splitlines(True), before.splitlines(True), path.read_text().splitlines(True)
    now = {}  # line of the written text -> the same line in the current text
    for tag, i1, i2, j1, _ in difflib.SequenceMatcher(None, written, current, autojunk=False).get_opcodes():
        if tag == "equal":
            now.update({i1 + k: j1 + k for k in range(i2 - i1)})
    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, written, wanted, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i2 > i1:
            where = [now.get(i) for i in range(i1, i2)]
            if None in where or where != list(range(where[0], where[0] + len(where))):
                return False
            changes.append((where[0], where[-1] + 1, wanted[j1:j2]))
        else:
            anchor = now.get(i1 - 1, -1) + 1 if i1 else 0
            if i1 and (i1 - 1) not in now:
                return False
            changes.append((anchor, anchor, wanted[j1:j2]))
    for start, end, lines in sorted(changes, reverse=True):
        current[start:end] = lines
    write_atomically(path, "".join(current))
    return True


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
