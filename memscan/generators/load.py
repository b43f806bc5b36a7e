"""Turn a ``--model`` spec into a generator.

- ``py:module:attribute`` or ``py:path/to/file.py:attribute`` — a callable
  ``fn(prompt, seeds) -> uint8 N×H×W×C``, a zero-argument factory returning one, or an object
  with a ``generate(prompt, seeds)`` method (or a factory returning such an object).
- a directory saved with ``save_pretrained`` (diffusers ``UNet2DModel`` + scheduler, or a
  ``DDPMPipeline``/``DDIMPipeline``), or a hub id for users with a network.
- a text-to-image pipeline (``model_index.json`` with a text encoder or tokenizer: Stable
  Diffusion, SDXL, what ``AutoPipelineForText2Image`` loads), directory or hub id →
  :mod:`memscan.generators.text2image`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from memscan.devices import check_device
from memscan.errors import InputError
from memscan.generators.base import CallableGenerator
from memscan.generators.diffusers_models import check_model_dir, hub_pipeline_index, read_model_json


def load_generator(spec: str, *, device: str = "cpu", batch_size: int = 64, **options):
    """Load the generator named by ``spec`` (see module docstring)."""
    check_device(device)
    if spec.startswith("py:"):
        _refuse_pipeline_options(spec, options)
        return _load_python(spec)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {spec} is a file", "pass a diffusers directory or py:module:attribute")
        check_model_dir(path)  # a damaged config: one error naming it, before anything loads
        index = path / "model_index.json"
        if index.exists():
            components = read_model_json(index)
            cls = components.get("_class_name", "")
            from memscan.generators.text2image import is_text2image_index, load_text2image_generator

            if is_text2image_index(components):
                return load_text2image_generator(spec, device=device, batch_size=batch_size, **options)
            if "unet" not in components or cls not in ("DDPMPipeline", "DDIMPipeline", ""):
                raise InputError(
                    f"model {spec} is a {cls}; this build attacks unconditional and class-conditional UNet2DModel pipelines",
                    "pass a DDPM/DDIM pipeline directory, or wrap your model as py:module:function",
                )
        from memscan.generators.diffusers_unet import load_unet_generator

        _refuse_t2i_options(spec, options)
        return load_unet_generator(spec, device=device, batch_size=batch_size, **options)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from memscan.generators.diffusers_unet import load_unet_generator
        from memscan.generators.text2image import is_text2image_index, load_text2image_generator

        hub_index = hub_pipeline_index(spec)  # {} without one: try a bare UNet below
        if is_text2image_index(hub_index):
            return load_text2image_generator(spec, device=device, batch_size=batch_size, **options)
        try:
            return load_unet_generator(spec, device=device, batch_size=batch_size, **options)
        except OSError as exc:
            raise InputError(
                f"cannot load model {spec!r} from the hub ({str(exc).splitlines()[0]})",
                "check the id and your network, or pass a local directory",
            ) from None
    raise InputError(
        f"model {spec!r} is not a directory, a hub id or py:module:attribute",
        "e.g. --model ./my-ddpm or --model py:mypkg.gen:sample",
    )


#: The sampling options of a diffusers pipeline, as the command line names them.
_PIPELINE_OPTIONS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "dtype": "--dtype",
    "scheduler": "--scheduler",
    "height": "--height",
    "width": "--width",
}


def _refuse_pipeline_options(spec: str, options: dict) -> None:
    """A ``py:`` generator samples as its own code does: pipeline options would be dropped silently."""
    extra = [flag for k, flag in _PIPELINE_OPTIONS.items() if options.get(k) is not None]
    if extra:
        raise InputError(
            f"option(s) {', '.join(extra)} apply to diffusers pipelines; {spec} is a py: generator",
            "drop them and set the sampling in your py: function",
        )


def _refuse_t2i_options(spec: str, options: dict) -> None:
    extra = [k for k in ("dtype", "scheduler", "height", "width") if options.get(k) is not None]
    if extra:
        raise InputError(
            f"option(s) {', '.join(extra)} apply to text-to-image pipelines; {spec} is a UNet2DModel",
            "drop them (the UNet generator takes num_inference_steps and guidance_scale)",
        )


def _load_python(spec: str):
    from memscan.user_code import import_object

    return as_generator(import_object(spec, "a function, a factory or a generator object"), name=spec)


def as_generator(obj, name: str | None = None):
    """Wrap a callable, a factory or a generator object as a generator."""
    if hasattr(obj, "generate") and not inspect.isclass(obj):
        return obj
    if callable(obj) and _is_factory(obj):
        made = obj()
        if hasattr(made, "generate"):
            return made
        if callable(made):
            return CallableGenerator(made, name=name)
        raise InputError(
            f"factory {name} returned {type(made).__name__}", "return fn(prompt, seeds) or an object with generate()"
        )
    if callable(obj):
        return CallableGenerator(obj, name=name)
    raise InputError(f"{name} is not callable", "name fn(prompt, seeds), a factory, or a generator object")


def _is_factory(obj) -> bool:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return inspect.isclass(obj) or len(required) == 0
