"""Reading diffusers model directories: where the UNet and the scheduler are, the UNet itself,
the scheduler, and memscan's ``memscan.json`` beside them. One place for the generators,
membership inference (:mod:`memscan.generators.noise`) and triage.

A model directory is what ``save_pretrained`` writes: a pipeline (``unet/``, ``scheduler/``,
``model_index.json``) or a bare UNet (``config.json`` + weights, with its
``scheduler_config.json`` beside it or in ``scheduler/``), optionally with a ``memscan.json``
(class captions, null class, sampler and resolution defaults).

A damaged directory is one :class:`~memscan.errors.InputError` naming the file, raised when the
model is opened (:func:`check_model_dir`, :func:`read_model_json`): a JSON file that does not
parse, a scheduler config diffusers refuses, a missing scheduler. Nothing falls back to
defaults: the noise schedule changes every generation and every loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memscan.errors import InputError, first_line
from memscan.safe_load import low_mem_kwargs

__all__ = [
    "FIT_HINT",
    "UNET_CLASSES",
    "check_model_dir",
    "hub_pipeline_index",
    "load_scheduler",
    "load_unet",
    "load_weights_only",
    "misfit",
    "model_dirs",
    "read_meta",
    "read_model_json",
    "scheduler_from_config",
]

#: UNet classes memscan loads from a directory (``_class_name`` of its ``config.json``).
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")

#: What to do about a damaged file of a model directory.
RESAVE_HINT = "fix the JSON, or re-save the model with diffusers' save_pretrained"

#: What to do when a UNet's config.json and its weights disagree.
FIT_HINT = (
    "check that config.json and the weights come from the same model, or re-save it with diffusers' save_pretrained"
)

#: The JSON files of a model directory (and of its component folders) that loading reads.
MODEL_JSON_FILES = (
    "model_index.json",
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)


def misfit(exc: BaseException) -> str:
    """The first sentence of diffusers' error about weights that do not fit a config."""
    return first_line(exc).split(". ")[0]


def read_model_json(path: str | Path, hint: str = RESAVE_HINT) -> dict:
    """The JSON object in ``path``, a file of a model directory; an :class:`InputError` naming
    the file (and the line and column of a syntax error) when it cannot be read, is not JSON or
    is not an object.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     f = Path(d) / "config.json"
    ...     _ = f.write_text('{"x": ')
    ...     try:
    ...         read_model_json(f)
    ...     except InputError as e:
    ...         print(e.message.replace(d, "D"))
    D/config.json is not valid JSON (Expecting value at line 1 column 7)
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start})", hint) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", hint) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", hint
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object (it holds a {type(data).__name__})", hint)
    return data


def check_model_dir(root: str | Path) -> None:
    """Read every JSON file that loading the model directory ``root`` reads (``model_index.json``,
    and ``config.json``, ``scheduler_config.json``, tokenizer and preprocessor configs in ``root``
    and in its component folders), so that a damaged one is one :class:`InputError` naming it
    before anything loads or any run is written."""
    root = Path(root)
    folders = [root, root / "unet", root / "scheduler"]
    index = root / "model_index.json"
    if index.exists():
        components = read_model_json(index)
        _refuse_code_in_index(index, components)
        folders += [root / k for k, v in components.items() if not k.startswith("_") and isinstance(v, list)]
    for folder in dict.fromkeys(folders):
        if folder.is_dir():
            code = sorted(folder.glob("*.py"))
            if code:  # a custom pipeline or component: diffusers may import it (older releases did so
                # without trust_remote_code): memscan loads model directories as data only
                raise InputError(f"model directory {root} holds code ({code[0]}): memscan does not run code from "
                                 "a model directory", CODE_HINT)  # fmt: skip
            for name in MODEL_JSON_FILES:
                if (folder / name).exists():
                    read_model_json(folder / name)


#: What to do with a model directory that would run its own code.
CODE_HINT = (
    "load the model yourself where you trust it and pass it as py:module:attribute, or remove the custom "
    "code and use diffusers' own classes"
)


def _refuse_code_in_index(index: Path, components: dict) -> None:
    """Refuse a ``model_index.json`` naming a custom pipeline (``_class_name`` as ``[module,
    class]``) or a component from a library other than diffusers (or one of its pipeline
    modules) and transformers: loading it would import code named by the directory."""
    cls = components.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise InputError(f"{index}: _class_name {cls!r} names a custom pipeline (code)", CODE_HINT)
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library = value[0]
        if library in ("diffusers", "transformers") or _is_diffusers_pipeline_module(library):
            continue
        raise InputError(
            f"{index}: component {name!r} comes from {library!r}, not from diffusers or transformers "
            "(loading it would import that code)",
            CODE_HINT,
        )


def _is_diffusers_pipeline_module(library) -> bool:
    """True for a diffusers pipeline module such as ``stable_diffusion`` (its safety checker)."""
    import importlib.util

    if not isinstance(library, str) or not library.isidentifier():
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
    except (ImportError, ValueError):
        return False


def model_dirs(root: str | Path) -> tuple[Path, Path]:
    """``(unet_dir, scheduler_dir)`` of a pipeline directory (``unet/``, ``scheduler/``) or of a
    bare UNet directory (both ``root``).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     (Path(d) / "unet").mkdir()
    ...     u, s = model_dirs(d)
    ...     u.name, s == Path(d)
    ('unet', True)
    """
    root = Path(root)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    return unet_dir, sched_dir


def read_meta(root: str | Path) -> dict:
    """memscan's ``memscan.json`` of a model directory (``{}`` when there is none).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     empty = read_meta(d)
    ...     _ = (Path(d) / "memscan.json").write_text('{"null_class": 10}')
    ...     empty, read_meta(d)
    ({}, {'null_class': 10})
    """
    f = Path(root) / "memscan.json"
    if not f.exists():
        return {}
    return read_model_json(f, "fix or remove memscan.json")


def load_unet(unet_dir: Path, spec: str) -> Any:
    """The ``UNet2DModel`` or ``UNet2DConditionModel`` of ``unet_dir``: safetensors, or a
    ``.bin``/``.pt`` file without one through weights-only loading (as ``memscan extract`` loads
    a UNet: :func:`memscan.safe_load.load_state_dict`); ``spec`` names the model in errors."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from memscan.safe_load import PICKLE_SUFFIXES, find_weights

    cfg_path = unet_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{spec}: no UNet found (expected unet/config.json or config.json)",
            "save the model with save_pretrained (UNet or pipeline)",
        )
    cls_name = read_model_json(cfg_path).get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if cls_name not in classes:
        raise InputError(
            f"{spec}: the UNet is a {cls_name}",
            "memscan loads UNet2DModel and UNet2DConditionModel; wrap others as py:",
        )
    weights = find_weights(unet_dir)
    if weights is not None and weights.name.endswith(PICKLE_SUFFIXES):
        return load_weights_only(classes[cls_name], unet_dir, weights)
    try:
        return classes[cls_name].from_pretrained(unet_dir, use_safetensors=True, **low_mem_kwargs())
    except OSError as exc:
        raise InputError(
            f"{spec}: cannot load the UNet ({str(exc).splitlines()[0]})",
            "memscan reads safetensors weights only (save_pretrained(..., safe_serialization=True))",
        ) from None
    except (ValueError, RuntimeError) as exc:  # the weights do not fit the config (shapes, names)
        raise InputError(f"{cfg_path} does not fit the UNet's weights ({misfit(exc)})", FIT_HINT) from None


def load_weights_only(cls: Any, model_dir: Path, weights: Path) -> Any:
    """A diffusers model of class ``cls`` built from ``model_dir/config.json``, its weights read
    from the pickle-format file ``weights`` with ``torch.load(weights_only=True)``: tensors and
    plain containers only, a pickle holding anything else is refused before any of it runs."""
    from memscan.safe_load import load_state_dict

    state = load_state_dict(weights)  # refused here: a pickle of more than tensors
    model = cls.from_config(cls.load_config(model_dir))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the config
        raise InputError(
            f"{model_dir / 'config.json'} does not fit the UNet's weights ({misfit(exc)})", FIT_HINT
        ) from None
    if missing or unexpected:
        raise InputError(
            f"{model_dir / 'config.json'} does not fit the UNet's weights in {weights.name} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)",
            FIT_HINT,
        )
    return model.eval()


def scheduler_from_config(config: dict, where: str | Path) -> Any:
    """The diffusers scheduler ``config`` describes: the class its ``_class_name`` names
    (``DDPMScheduler`` when it names none), built from its settings. ``where`` (the config's file)
    is named in errors: a class diffusers does not have, settings it refuses, or a scheduler
    without a DDPM noise schedule (``alphas_cumprod`` or ``betas``), which memscan needs.

    Examples
    --------
    >>> type(scheduler_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"}, "x")).__name__
    'DDIMScheduler'
    >>> scheduler_from_config({"beta_schedule": "squaredcos_cap_v2"}, "x").config.beta_schedule
    'squaredcos_cap_v2'
    """
    import diffusers
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    name = config.get("_class_name")
    cls = DDPMScheduler
    if name is not None:
        cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
        # a scheduler that needs a package this environment lacks is a diffusers "dummy" class
        dummy = isinstance(cls, type) and type(cls).__name__ == "DummyObject"
        if not (isinstance(cls, type) and (dummy or issubclass(cls, SchedulerMixin))):
            raise InputError(
                f"{where} names the scheduler {name!r}, which diffusers {diffusers.__version__} does not have",
                "set _class_name to the scheduler the model was trained with (e.g. DDPMScheduler), upgrade "
                "diffusers if a newer version saved the model, or re-save it with diffusers' save_pretrained",
            )
    try:
        scheduler = cls.from_config(config)
    except ImportError as exc:  # a scheduler that needs a package this environment lacks
        raise InputError(
            f"{where}: diffusers' {cls.__name__} needs a package ({first_line(exc)})", "install it"
        ) from None
    except Exception as exc:  # diffusers refuses the settings (NotImplementedError, TypeError, RuntimeError, …)
        raise InputError(
            f"{where}: diffusers' {cls.__name__} refuses its settings ({first_line(exc)})",
            "fix the setting it names, or re-save the model with diffusers' save_pretrained",
        ) from None
    if not (hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "betas")):
        raise InputError(
            f"{where}: the {cls.__name__} has no DDPM noise schedule (betas / alphas_cumprod)",
            "memscan samples and scores UNet directories whose scheduler defines one (DDPM, DDIM, PNDM, Euler, "
            "…); wrap other models as py:module:function",
        )
    return scheduler


def load_scheduler(sched_dir: str | Path) -> Any:
    """The scheduler saved in ``sched_dir`` (its ``scheduler_config.json``), of the class the
    config names (:func:`scheduler_from_config`). A missing or damaged config is an
    :class:`InputError` naming the file: no default schedule is assumed.

    ``sched_dir`` is the ``scheduler/`` folder of a pipeline, or the folder of a bare UNet (where
    :func:`model_dirs` points when there is no ``scheduler/``)."""
    sched_dir = Path(sched_dir)
    path = sched_dir / "scheduler_config.json"
    if not path.exists():
        expected = path if sched_dir.name == "scheduler" else sched_dir / "scheduler" / "scheduler_config.json"
        raise InputError(
            f"{expected} is missing: the noise schedule the model was trained with is unknown",
            f"save its scheduler there (scheduler.save_pretrained('{expected.parent}'), or the whole pipeline with "
            "save_pretrained); memscan does not assume diffusers' defaults",
        )
    return scheduler_from_config(read_model_json(path), path)


def hub_pipeline_index(spec: str) -> dict:
    """The ``model_index.json`` of hub id ``spec`` (``{}`` when it has none, or there is no network)."""
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(spec)
    except Exception:  # no pipeline index on the hub (or no network): the caller tries a bare UNet
        return {}
