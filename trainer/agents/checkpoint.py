"""Training state on disk without pickle: any nest of dicts, lists and scalars with tensors and
numpy arrays in it (a Tianshou algorithm's state dict with its optimizer, RNG states, counters)
becomes `state.safetensors` (every array) and `state.json` (the rest, arrays replaced by their
keys), written beside the old checkpoint and swapped in (`lm_eval_rlae.files`), so a kill at any
moment, or a second writer, leaves one whole checkpoint. Loading checks the pair before use: a
damaged checkpoint is a clear error, never half a state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm_eval_rlae.files import reading_directory, replacing_directory

_TENSOR, _ARRAY, _DICT, _TUPLE = "__tensor__", "__ndarray__", "__dict__", "__tuple__"


def _flatten(value, tensors: dict, path: str):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {_ARRAY: path}
    if isinstance(value, dict):  # keys keep their type (optimizer states are keyed by int)
        return {_DICT: [[key, _flatten(item, tensors, f"{path}/{key}")] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_flatten(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _ARRAY in value:
            return tensors[value[_ARRAY]].numpy()
        if _DICT in value:
            return {key: _unflatten(item, tensors) for key, item in value[_DICT]}
        if _TUPLE in value:
            return tuple(_unflatten(item, tensors) for item in value[_TUPLE])
    if isinstance(value, list):
        return [_unflatten(item, tensors) for item in value]
    return value


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read; the message names the file and what to do."""


def save_state(directory: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "")
    with replacing_directory(directory) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))


def load_state(directory: Path) -> dict | None:
    """The checkpoint in `directory` (or the one a kill left beside it mid-swap), else None."""
    with reading_directory(directory) as current:
        if not current.exists():
            return None
        try:
            return _unflatten(json.loads((current / "state.json").read_text()), load_file(str(current / "state.safetensors")))
        except (OSError, SafetensorError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"the training checkpoint in {current} is damaged ({error!r}): run with --restart to train from scratch "
                "(or restore the directory from a copy)"
            ) from error
