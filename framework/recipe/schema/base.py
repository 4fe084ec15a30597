"""The base of every recipe section: unknown keys are errors."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


def _default_tag(data, key: str, tag: str, value: str):
    """`--set train.optimizer.lr=0.01` on a recipe without an optimizer means the default one: fill in its tag."""
    if isinstance(data, dict) and isinstance(data.get(key), dict) and tag not in data[key]:
        data = {**data, key: {tag: value, **data[key]}}
    return data
