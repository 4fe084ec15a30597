"""The base of every recipe section: unknown keys are errors."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    # unknown keys are errors; so are inf and nan anywhere numeric (a learning rate of .inf trained "fine" on nan)
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


def _default_tag(data, key: str, tag: str, value: str):
    """`--set train.optimizer.lr=0.01` on a recipe without an optimizer means the default one: fill in its tag."""
    if isinstance(data, dict) and isinstance(data.get(key), dict) and tag not in data[key]:
        data = {**data, key: {tag: value, **data[key]}}
    return data
