"""Devices named on the command line: ``cpu``, ``cuda`` or ``cuda:N``, checked where local work
on them starts (model loading, detection, embedding, training), so that a missing GPU is one
clear error before any work rather than a traceback after it; and the precisions a model may run
in (``--dtype``), one set of spellings for every loader."""

from __future__ import annotations

from memscan.errors import InputError


def check_device(device, option: str = "--device") -> str:
    """``device`` as a string, after checking that it names ``cpu`` or a CUDA device torch sees.

    Examples
    --------
    >>> check_device("cpu")
    'cpu'
    >>> check_device("tpu")
    Traceback (most recent call last):
    ...
    memscan.errors.InputError: --device tpu: not a device memscan runs on (use cpu, cuda or cuda:N)
    >>> check_device("cuda:")
    Traceback (most recent call last):
    ...
    memscan.errors.InputError: --device cuda:: not a device memscan runs on (use cpu, cuda or cuda:N)
    """
    name = str(device)
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or name.endswith(":"):
        raise InputError(f"{option} {name}: not a device memscan runs on", "use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        build = torch.__version__
        raise InputError(
            f"{option} {name}: torch {build} sees no CUDA device on this machine",
            "use --device cpu, or run where a GPU and a CUDA build of torch are installed",
        )
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise InputError(f"{option} {name}: this machine has {count} CUDA device(s)", f"use cuda:0 … cuda:{count - 1}")
    return name


#: Every ``--dtype`` spelling, in any case → the precision it names: the short names and torch's.
DTYPE_SPELLINGS = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
DTYPE_CHOICES = "auto, fp32 or float32, fp16 or float16, bf16 or bfloat16"


def precision(dtype: str | None) -> str:
    """The precision ``dtype`` names (``auto``, ``float32``, ``float16`` or ``bfloat16``) from any
    spelling of :data:`DTYPE_SPELLINGS` (None: ``auto``); one error naming the accepted spellings
    for any other.

    Examples
    --------
    >>> precision("fp16"), precision("BFloat16"), precision(None)
    ('float16', 'bfloat16', 'auto')
    """
    key = "auto" if dtype is None else str(dtype).lower()
    if key not in DTYPE_SPELLINGS:
        raise InputError(
            f"--dtype {dtype!r} is not one of {DTYPE_CHOICES}", "e.g. --dtype auto (short or torch names, any case)"
        )
    return DTYPE_SPELLINGS[key]
