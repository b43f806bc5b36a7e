"""What a run manifest records about the model it attacked, so that runs can be compared later.

``model_record(spec, model)`` returns ``{"id", "parameters", "training_step"}``:

- ``id``: the ``--model`` spec as given (a directory made absolute, a hub id, ``py:…``);
- ``parameters``: the number of parameters of every torch module the model holds (a diffusers
  pipeline's components, a UNet, a causal LM), or ``None`` for an opaque callable;
- ``training_step``: where the checkpoint says so — a ``trainer_state.json`` (``global_step``,
  as transformers' and diffusers' trainers save it), a ``checkpoint-N`` directory name, or a
  memscan ``memscan.json`` training record (``training.recipe.steps``, or ``steps_run`` for the
  LM demo's); else ``None``.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()) / "checkpoint-1500"
>>> d.mkdir()
>>> model_record(str(d))["training_step"]
1500
>>> model_record("py:mypkg.gen:sample")
{'id': 'py:mypkg.gen:sample', 'parameters': None, 'training_step': None}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Attribute names under which models and pipelines keep their torch modules.
_MODULE_ATTRIBUTES = ("unet", "model", "pipe", "pipeline", "text_encoder", "text_encoder_2", "vae", "net", "module")


def count_parameters(model: Any) -> int | None:
    """Parameters of the torch modules ``model`` is or holds (each module counted once)."""
    seen: set[int] = set()
    total = 0
    found = False

    def visit(obj: Any, depth: int) -> None:
        nonlocal total, found
        if obj is None or depth > 3 or id(obj) in seen:
            return
        seen.add(id(obj))
        params = getattr(obj, "parameters", None)
        if callable(params) and hasattr(obj, "named_modules"):  # a torch.nn.Module
            found = True
            total += sum(int(p.numel()) for p in params())
            return
        components = getattr(obj, "components", None)  # a diffusers pipeline
        if isinstance(components, dict):
            for value in components.values():
                visit(value, depth + 1)
            return
        for name in _MODULE_ATTRIBUTES:
            if name in getattr(obj, "__dict__", {}):
                visit(obj.__dict__[name], depth + 1)

    visit(model, 0)
    return total if found else None


def training_step(path: str | Path) -> int | None:
    """The training step a checkpoint directory records, or ``None``."""
    root = Path(path)
    if not root.is_dir():
        return None
    for candidate in (root / "trainer_state.json", root.parent / "trainer_state.json"):
        if candidate.is_file():
            try:
                step = json.loads(candidate.read_text()).get("global_step")
            except (json.JSONDecodeError, OSError, AttributeError):
                step = None
            if isinstance(step, int):
                return step
    for part in (root.name, root.parent.name):
        m = re.fullmatch(r"checkpoint[-_](\d+)", part)
        if m:
            return int(m.group(1))
    meta = root / "memscan.json"
    if meta.is_file():
        try:
            rec = json.loads(meta.read_text())
            steps = rec.get("training", {}).get("recipe", {}).get("steps")
            if steps is None:  # the LM demo's record (memscan.demo.lm.train): the steps it ran
                steps = rec.get("steps_run")
        except (json.JSONDecodeError, OSError, AttributeError):
            steps = None
        if isinstance(steps, int):
            return steps
    return None


def model_record(spec: Any, model: Any = None) -> dict:
    """``{"id", "parameters", "training_step"}`` of the model named by ``spec`` (see the module)."""
    if isinstance(spec, (str, Path)):
        ident = str(spec)
        if not ident.startswith("py:") and Path(ident).expanduser().exists():
            ident = str(Path(ident).expanduser().resolve())
    else:
        ident = getattr(spec, "spec", None) or type(spec).__qualname__
    step = training_step(ident) if not ident.startswith("py:") else None
    return {"id": ident, "parameters": count_parameters(model) if model is not None else None, "training_step": step}


def loaded_model_record(spec: Any, loaded: dict | None) -> dict:
    """:func:`model_record` of ``spec`` completed by what a worker reported after loading the model
    (``{"parameters", "describe"}``; None: nothing was loaded, e.g. a resumed run with no shard left)."""
    rec = model_record(spec)
    if loaded:
        rec.update(parameters=loaded.get("parameters"), describe=loaded.get("describe"))
    return rec
