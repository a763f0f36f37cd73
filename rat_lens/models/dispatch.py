"""Checked ``device_map`` / ``max_memory`` / ``offload_folder`` for :func:`rat_lens.models.load`,
and their command-line forms.

A Hugging Face model loaded with a ``device_map`` is *dispatched* by accelerate: its layers live on
several devices, or are *offloaded* (their weights wait in CPU memory or on disk, as meta
placeholders, and are loaded around each module's own forward). rat_lens passes these through
to ``TransformerBridge.boot_transformers``; everything it runs on such a model computes on each
layer's own device.
"""

import re
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import RatLensError

__all__ = ["STRATEGIES", "check_dispatch", "parse_device_map", "parse_max_memory"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMG]iB|[KMG]B|[KMG]b)", re.IGNORECASE)
_MEMORY_KEYS = "GPU indices (0, 1, ...), 'cpu', 'mps' and 'disk'"

DeviceMap = Union[str, dict]


def check_dispatch(
    device=None,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Union[str, Path, None] = None,
) -> dict:
    """The keywords to dispatch a model with (empty when none is given), each checked.

    ``max_memory`` or ``offload_folder`` alone mean ``device_map="auto"`` (accelerate reads them
    only with a map). A device string as the map puts the whole model there.

    Examples:
        >>> check_dispatch(max_memory={"cpu": "2GiB"})
        {'device_map': 'auto', 'max_memory': {'cpu': '2GiB'}}
        >>> check_dispatch(device_map="cpu")
        {'device_map': {'': 'cpu'}}
        >>> check_dispatch(max_memory={"gpu": "2GiB"})
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: max_memory key 'gpu' is not a device: ...
    """
    if device_map is None and max_memory is None and offload_folder is None:
        return {}
    if device is not None:
        raise RatLensError(
            f"device={device!r} and device_map/max_memory/offload_folder exclude each other: "
            "the map says where each layer goes"
        )
    out: dict = {"device_map": _checked_map("auto" if device_map is None else device_map)}
    if max_memory is not None:
        out["max_memory"] = _checked_memory(max_memory)
    if offload_folder is not None:
        folder = Path(offload_folder)
        if folder.exists() and not folder.is_dir():
            raise RatLensError(f"offload_folder={str(offload_folder)!r} is a file, not a folder")
        out["offload_folder"] = str(folder)
    return out


def parse_device_map(text: str) -> DeviceMap:
    """``--device-map``: a strategy (``auto``, ``balanced``, ...), one device for the whole model
    (``cpu``, ``0``, ``disk``), or ``MODULE=DEVICE`` pairs separated by commas.

    Examples:
        >>> parse_device_map("auto")
        'auto'
        >>> parse_device_map("model.embed_tokens=0,model.layers=cpu,lm_head=disk")
        {'model.embed_tokens': 0, 'model.layers': 'cpu', 'lm_head': 'disk'}
    """
    text = text.strip()
    if text in STRATEGIES:
        return text
    if "=" not in text:
        return {"": _device_value(text)}
    return {key: _device_value(value) for key, value in _pairs("device_map", text)}


def parse_max_memory(text: str) -> dict:
    """``--max-memory``: ``DEVICE=SIZE`` pairs, e.g. ``0=2GiB,cpu=4GiB`` (a plain number is bytes).

    Examples:
        >>> parse_max_memory("0=2GiB, cpu=4GiB,disk=1000")
        {0: '2GiB', 'cpu': '4GiB', 'disk': 1000}
    """
    return {
        _device_value(key): int(value) if value.isdigit() else value
        for key, value in _pairs("max_memory", text)
    }


def _pairs(what: str, text: str) -> list[tuple[str, str]]:
    pairs = [part.strip().partition("=") for part in text.split(",") if part.strip()]
    bad = [f"{key}{eq}{value}" for key, eq, value in pairs if not eq or not value.strip()]
    if bad or not pairs:
        example = "0=2GiB,cpu=4GiB" if what == "max_memory" else "model.layers=0,lm_head=cpu"
        raise RatLensError(f"{what}={text!r}: {bad or 'nothing'} is not KEY=VALUE (e.g. {example})")
    return [(key.strip(), value.strip()) for key, _, value in pairs]


def _device_value(text: str) -> Union[int, str]:
    """A GPU index as accelerate writes it (an int), any other device as given."""
    return int(text) if text.isdigit() else text


def _checked_map(device_map) -> DeviceMap:
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return device_map
        return _checked_map({"": device_map})
    if not isinstance(device_map, dict) or not device_map:
        raise RatLensError(
            f"device_map={device_map!r} must be one of {list(STRATEGIES)}, a device, or a "
            "non-empty dict of module name -> device"
        )
    for module, where in device_map.items():
        if not isinstance(module, str):
            raise RatLensError(f"device_map key {module!r} must be a module name (str)")
        _check_target(f"device_map[{module!r}]", where)
    return dict(device_map)


def _checked_memory(max_memory) -> dict:
    if not isinstance(max_memory, dict) or not max_memory:
        raise RatLensError(
            f"max_memory={max_memory!r} must be a non-empty dict of device -> size, "
            "e.g. {0: '2GiB', 'cpu': '4GiB'}"
        )
    for key, size in max_memory.items():
        if isinstance(key, bool) or not (
            (isinstance(key, int) and key >= 0) or key in ("cpu", "mps", "disk")
        ):
            raise RatLensError(
                f"max_memory key {key!r} is not a device: accelerate knows {_MEMORY_KEYS}"
            )
        if key != "disk":
            _check_target(f"max_memory key {key!r}", key)
        fits = (isinstance(size, int) and not isinstance(size, bool) and size >= 0) or (
            isinstance(size, str) and _SIZE.fullmatch(size.strip())
        )
        if not fits:
            raise RatLensError(
                f"max_memory[{key!r}]={size!r} is not a size: bytes (int) or a number with "
                "a unit, e.g. '2GiB', '500MiB', '4GB'"
            )
    return dict(max_memory)


def _check_target(what: str, where) -> None:
    """A device this machine has (an int is a GPU index), or ``"disk"``."""
    from . import check_device  # the package imports this module first

    if where == "disk":
        return
    if isinstance(where, bool) or not isinstance(where, (int, str, torch.device)):
        raise RatLensError(f"{what}={where!r} is not a device (e.g. 0, 'cuda:1', 'cpu', 'disk')")
    try:
        checked = check_device(f"cuda:{where}" if isinstance(where, int) else where)
    except RatLensError as err:
        raise RatLensError(f"{what}: {err}") from None
    if torch.device(checked).type == "meta":
        raise RatLensError(f"{what}='meta' would hold no weights: use a GPU, 'cpu' or 'disk'")
