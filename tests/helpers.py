"""Protocol variants for tests: the shipped file with one key changed."""

from __future__ import annotations

import copy

import yaml

from protocol.definition import DEFAULT_PROTOCOL_FILE

RAW = yaml.safe_load(DEFAULT_PROTOCOL_FILE.read_text(encoding="utf-8"))
DELETE = object()


def protocol_data_with(path: str, value) -> dict:
    """A deep copy of the shipped protocol data with the dotted `path` set to `value` (or deleted)."""
    data = copy.deepcopy(RAW)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data
