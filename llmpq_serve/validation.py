"""What a user wrote (a YAML file, a config validated by pydantic) that is wrong, as one line saying what and where:
without the error type, the input echoed back and the documentation link that pydantic's own text adds, and with
the file's name where yaml's own text says "<unicode string>"."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def problem(error: dict[str, Any], location: Sequence[Any] | None = None) -> str:
    """One error of `ValidationError.errors()` (FastAPI's have the same shape); `location` replaces its `loc`."""
    path = ".".join(map(str, error["loc"] if location is None else location))
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}" if path else message  # no path: a check of the whole model


def describe(error: ValidationError) -> str:
    return "; ".join(problem(e) for e in error.errors())


def yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: {}); `what` names the file's kind in errors."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise ValueError(f"{what} {path} is not valid YAML: {e.problem}{where}") from None
    return _mapping({} if data is None else data, path, what)


def json_model(model: type[M], path: str | Path, what: str, **defaults: Any) -> M:
    """`model` validated from the JSON object of a file; `defaults` fill keys the file leaves out."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    with naming(path, what):
        return model.model_validate({**defaults, **_mapping(data, path, what)})


@contextmanager
def naming(path: str | Path, what: str) -> Iterator[None]:
    """Validation errors within, as one ValueError that names the file they came from."""
    try:
        yield
    except ValidationError as e:
        raise ValueError(f"{what} {path}: {describe(e)}") from None


def _mapping(data: Any, path: str | Path, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):  # a ValueError like every other mistake in a file: the CLI reports those
        raise ValueError(f"{what} {path} holds a {type(data).__name__}, not a mapping")  # noqa: TRY004
    return data
