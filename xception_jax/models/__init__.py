"""The model registry: `create(name, **kwargs)` returns a Flax Linen module.

Every part of the project builds models through this one function, so a name in a config, on a
command line or in a script means the same network everywhere. Contract:

  model = models.create("xception", num_classes=10, segments=4)
  variables = model.init(rng, images, train=False)         # {'params', 'batch_stats'}
  logits = model.apply(variables, images, train=False)     # float32 [batch, num_classes]
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})

Names:
  xception           the paper's network (Keras Applications' Xception); every spectrum knob.
  xception_small     width 1/4, 3 middle blocks: the CPU quickstart model.
  xception_tiny      width 1/8, 1 middle block: compiles and runs in seconds, for unit tests.
  inception_v3       Keras Applications' InceptionV3 without the auxiliary tower.
  inception_v3_tiny  a small Inception V3 for unit tests.

Modules are imported when first created, so a missing optional model does not break the others.
Unknown names and unknown keyword arguments raise ValueError listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import flax.linen as nn

from xception_jax.models import layers

# name -> (module path, attribute, default keyword arguments). The attribute is a Module class or
# a functools.partial of one.
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
  "xception": ("xception_jax.models.xception", "Xception", {}),
  "xception_small": (
    "xception_jax.models.xception",
    "Xception",
    dict(width_multiplier=0.25, num_middle_blocks=3),
  ),
  "xception_tiny": (
    "xception_jax.models.xception",
    "Xception",
    dict(width_multiplier=0.125, num_middle_blocks=1),
  ),
  "inception_v3": ("xception_jax.models.inception_v3", "InceptionV3", {}),
  "inception_v3_tiny": ("xception_jax.models.inception_v3", "inception_v3_tiny", {}),
}

# Fields every Linen module has that are not model settings.
_MODULE_INTERNALS = frozenset({"parent", "name"})


def list_models() -> list[str]:
  """The registered model names."""
  return sorted(_REGISTRY)


def _factory(name: str):
  module_path, attribute, _ = _REGISTRY[name]
  try:
    module = importlib.import_module(module_path)
  except ModuleNotFoundError as e:
    if e.name != module_path:
      raise
    raise ValueError(
      f"Model {name!r} is registered but its module {module_path} is not available in this checkout"
    ) from e
  if not hasattr(module, attribute):
    raise ValueError(f"Model {name!r}: {module_path} defines no {attribute!r}")
  return getattr(module, attribute)


def _settings(factory) -> list[str]:
  """The keyword arguments a Module class (or a partial of one) accepts."""
  cls = factory.func if isinstance(factory, functools.partial) else factory
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise TypeError(f"registry entry {factory!r} is not a flax.linen.Module class")
  return [f.name for f in dataclasses.fields(cls) if f.name not in _MODULE_INTERNALS]


def create(name: str, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name` with keyword arguments overriding its defaults.

  Args:
    name: one of `list_models()`.
    **kwargs: module settings (for Xception: num_classes, segments, group_width, order,
      mid_activation, residual, fc_layers, dropout_rate, width_multiplier, num_middle_blocks,
      widths, budget, dtype). `dtype` may be a string ("float32", "bfloat16").

  Raises:
    ValueError: unknown name (listing the known ones), unknown keyword argument (listing the valid
      ones), or invalid settings (naming the setting or layer at fault).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(list_models())}")
  factory = _factory(name)
  valid = _settings(factory)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(
      f"Model {name!r} got unknown keyword argument(s) {unknown}; valid: {', '.join(valid)}"
    )
  settings = {**_REGISTRY[name][2], **kwargs}
  if "dtype" in settings:
    settings["dtype"] = layers.canonical_dtype(settings["dtype"])
  return factory(**settings)


def create_model(config, num_classes: int) -> nn.Module:
  """The module a training config describes: `config.model_name` with `config.model` as settings.

  The one place a config becomes a network, so training, export and the benchmark build the
  same one. `config` is an ml_collections.ConfigDict (model_name, model, dtype); segment settings
  given as text on a command line ("4", "entry=4,middle=8") are parsed by `parse_segments`.
  """
  kwargs = dict(config.model.to_dict())
  try:
    for key in ("segments", "group_width"):
      if isinstance(kwargs.get(key), str):
        kwargs[key] = parse_segments(kwargs[key], key)
    return create(config.model_name, num_classes=num_classes, dtype=config.dtype, **kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model_name={config.model_name!r} / config.model={kwargs}: {e}") from e


def parse_segments(value: Any, name: str = "segments") -> Any:
  """A segment setting as typed (command line, config override) -> the value models take.

  "4" -> 4, "depthwise" (any case) -> "depthwise", "entry=4,middle=depthwise" ->
  {"entry": 4, "middle": "depthwise"}; ints, dicts and None pass through. The one parser of the
  tools, the sweep and `create_model`; `name` (segments, group_width) is named in errors.

  Raises:
    ValueError: a value that is neither a positive int nor 'depthwise', or a malformed list.
  """

  def one(text: Any) -> int | str:
    if isinstance(text, int) and not isinstance(text, bool) and text >= 1:
      return text
    word = str(text).strip()
    if word.lower() == "depthwise":
      return "depthwise"
    if word.isdigit() and int(word) >= 1:
      return int(word)
    raise ValueError(f"{name}={text!r} is not valid: use a positive int or 'depthwise'")

  if value is None or isinstance(value, dict):
    return value
  if not isinstance(value, str) or "=" not in value:
    return one(value)
  flows = {}
  for item in value.split(","):
    flow, equals, setting = item.partition("=")
    if not equals:
      raise ValueError(
        f"per-flow setting {name}={value!r}: expected flow=value items, got {item!r}"
      )
    flows[flow.strip()] = one(setting)
  return flows


def segments_label(segments: Any) -> str:
  """How reports and tables name a segment setting: 4, depthwise (also for None, the default),
  or entry=4,middle=8 per flow."""
  if segments is None or (isinstance(segments, str) and segments.lower() == "depthwise"):
    return "depthwise"
  if isinstance(segments, dict):
    return ",".join(f"{k}={v}" for k, v in segments.items())
  return str(segments)


__all__ = ["create", "create_model", "list_models", "parse_segments", "segments_label"]
