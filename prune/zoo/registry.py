"""Model registry: every name `--model` takes, how to build it and what input it expects.

A `ModelEntry` knows its builder, default input size, input normalisation, class count and
default weights. A single model is registered by name (`register_model`: the embedded
ones); a *family* resolves a whole namespace of names when they are looked up
(`register_family`: torchvision's bare names such as `vgg16`, and `timm:<name>`). A new
family is one registration:

    @register_family("toy", names=lambda: ["tiny", "small"], description="toy nets")
    def toy(name: str) -> ModelEntry:                    # name without the 'toy:' prefix
        return ModelEntry(f"toy:{name}", build=lambda n: ToyNet(name, n), input_size=32, num_classes=10)

after which `--model toy:tiny` works. `model_entry(name)` looks a name up (UsageError listing
the known names and the nearest ones); `list_models(pattern)` lists the names matching an
fnmatch pattern, like timm's `list_models`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from prune.errors import UsageError
from prune.zoo.transforms import DEFAULT_INTERPOLATION, IMAGENET_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, folder_transform

if TYPE_CHECKING:  # torchvision and timm are imported when one of their models is looked up, not before
    from timm.models import PretrainedCfg
    from torchvision import transforms
    from torchvision.models import WeightsEnum

Builder = Callable[[int], nn.Module]
"""num_classes → an untrained model (random init, no download)."""


@dataclass(frozen=True)
class ModelEntry:
    """One model `--model` can name.

    build(num_classes): an untrained instance. input_size: default image side in pixels.
    mean/std: the per-channel normalisation its weights expect, `(x - mean) / std` on [0, 1]
    pixels (folder images are normalised with it). num_classes: what the default weights
    predict. weights: the default state_dict file, loaded when no `--weights` is given (None:
    random init). named_weights(name): the model with a named weight set such as torchvision's
    'IMAGENET1K_V1' (None: the family has none). data: the `--data` value used when none is
    given (None: the generated shapes10 set), e.g. 'fashion-mnist' for the models trained on it.
    crop_pct / interpolation: how folder images are resized and center-cropped for it, in timm's
    vocabulary (prune.zoo.transforms; default ImageNet's 0.875 and 'bilinear', 1.0 = no crop).
    """

    name: str
    build: Builder
    input_size: int = 224
    num_classes: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: Path | None = None
    named_weights: Callable[[str], nn.Module] | None = None
    description: str = ""
    data: str | None = None
    crop_pct: float = IMAGENET_CROP_PCT
    interpolation: str = DEFAULT_INTERPOLATION

    def transform(self, input_size: int | None = None) -> transforms.Compose:
        """Folder images → [3, s, s] preprocessed as this model's weights expect (s = `input_size` or
        the default): resized with its interpolation, center-cropped by its crop_pct, normalised."""
        return folder_transform(input_size or self.input_size, mean=self.mean, std=self.std,
                                crop_pct=self.crop_pct, interpolation=self.interpolation)


Resolver = Callable[[str], ModelEntry]
"""A family's name (without its prefix) → its entry."""


@dataclass(frozen=True)
class ModelFamily:
    """Names resolved at lookup time: `prefix:name` (or a bare `name` where prefix is '').

    names(): every name of the family (listing and suggestions); contains(name): whether it
    knows `name` (default: `name in names()`); resolve(name): its entry.
    """

    prefix: str
    resolve: Resolver
    names: Callable[[], Iterable[str]]
    description: str
    contains: Callable[[str], bool] | None = None

    def qualified(self, name: str) -> str:
        """The name as `--model` takes it."""
        return f"{self.prefix}:{name}" if self.prefix else name

    def knows(self, name: str) -> bool:
        return self.contains(name) if self.contains is not None else name in set(self.names())

    def all_names(self) -> list[str]:
        return [self.qualified(n) for n in self.names()]


_MODELS: dict[str, ModelEntry] = {}
_FAMILIES: dict[str, ModelFamily] = {}


def register_model(
    name: str,
    *,
    input_size: int,
    num_classes: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    weights: Path | None = None,
    description: str = "",
    data: str | None = None,
    crop_pct: float = IMAGENET_CROP_PCT,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> Callable[[Builder], Builder]:
    """Decorator adding the builder `fn(num_classes) -> nn.Module` under `name`; a duplicate raises ValueError."""

    def wrap(build: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        prefix = name.split(":", 1)[0] if ":" in name else None
        if prefix is not None and prefix in _FAMILIES:
            raise ValueError(f"model name {name!r} falls in the registered family {prefix!r}: pick another name")
        _MODELS[name] = ModelEntry(name, build, input_size, num_classes, mean, std, weights, None, description, data,
                                   crop_pct, interpolation)
        return build

    return wrap


def register_family(
    prefix: str, *, names: Callable[[], Iterable[str]], description: str, contains: Callable[[str], bool] | None = None
) -> Callable[[Resolver], Resolver]:
    """Decorator adding a family of models under `prefix` (`''`: bare names); a duplicate raises ValueError.

    The decorated `resolve(name) -> ModelEntry` gets the name without the prefix and is
    called only for a name the family knows (`contains`, or `names()`).
    """
    if ":" in prefix:
        raise ValueError(f"family prefix {prefix!r} must not contain ':'")

    def wrap(resolve: Resolver) -> Resolver:
        if prefix in _FAMILIES:
            raise ValueError(f"model family {prefix!r} is already registered")
        _FAMILIES[prefix] = ModelFamily(prefix, resolve, names, description, contains)
        return resolve

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Every name `--model` takes that matches the fnmatch `pattern`, sorted (families included:
    torchvision's names and `timm:<name>` for each of timm's)."""
    names = [*_MODELS]
    for family in _FAMILIES.values():
        names += family.all_names()
    return sorted(n for n in set(names) if fnmatch.fnmatch(n, pattern))


def _bare_families() -> list[ModelFamily]:
    return [f for f in _FAMILIES.values() if not f.prefix]


def _unknown(name: str) -> UsageError:
    """UsageError naming what `--model` takes and the names nearest to `name`."""
    prefix, sep, rest = name.partition(":")
    family = _FAMILIES.get(prefix) if sep else None
    if family is not None:
        near = difflib.get_close_matches(rest, list(family.names()), n=3)
        hint = f" Did you mean {', '.join(repr(family.qualified(n)) for n in near)}?" if near else ""
        return UsageError(f"unknown model {name!r}; {prefix}:<name> takes {family.description}.{hint}")
    known = [*_MODELS]
    for f in _bare_families():
        known += f.all_names()
    near = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
    kinds = [repr(n) for n in sorted(_MODELS)]
    kinds += [f"{f.description} ({', '.join(sorted(f.names()))})" for f in _bare_families()]
    kinds += [f"'{f.prefix}:<name>' ({f.description})" for f in _FAMILIES.values() if f.prefix]
    return UsageError(f"unknown model {name!r}; use {', '.join(kinds)}, or one a module of yours registers "
                      f"(register_model; the CLI imports it with --import MODULE).{hint}")


def model_entry(name: str) -> ModelEntry:
    """The entry of `name`: a registered model, `prefix:name` of a family, or a bare-name family's
    name. UsageError (a ValueError) listing the known names and the nearest ones if unknown."""
    if name in _MODELS:
        return _MODELS[name]
    prefix, sep, rest = name.partition(":")
    if sep:
        family = _FAMILIES.get(prefix)
        if family is not None and family.knows(rest):
            return family.resolve(rest)
        raise _unknown(name)
    for family in _bare_families():
        if family.knows(name):
            return family.resolve(name)
    raise _unknown(name)


# ---------------------------------------------------------------- the built-in models


def _register_embedded() -> None:
    from prune.zoo import fashion, shapes
    from prune.zoo.embedded_model import VARIANTS, build_embedded

    for variant in VARIANTS.values():
        on_fashion = variant.dataset == fashion.PREFIX
        source = fashion if on_fashion else shapes
        trained_on = "Fashion-MNIST" if on_fashion else "shapes10"
        register_model(
            variant.name, input_size=variant.input_size, num_classes=len(source.CLASSES), mean=source.MEAN,
            std=source.STD,
            weights=variant.weights, data=fashion.PREFIX if on_fashion else None, crop_pct=1.0,
            description=(f"shipped ResNet-20 on {trained_on}" if variant.arch == "resnet" else
                         f"shipped VGG on {trained_on} ({'with' if variant.batch_norm else 'without'} BatchNorm)"),
        )(partial(build_embedded, variant.name))


_register_embedded()


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_build(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _torchvision_weights(name: str, weights: str) -> nn.Module:
    """torchvision model `name` with the named weight set (from the torch hub cache or the network)."""
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=weights)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"unknown weights {weights!r} for {name}: {exc}") from None
    except OSError as exc:
        raise UsageError(
            f"cannot fetch torchvision weights {weights!r} ({type(exc).__name__}); "
            "put them in the torch hub cache or pass a checkpoint path"
        ) from None


def _torchvision_preprocessing(weights: WeightsEnum | None) -> dict:
    """ModelEntry fields input_size, mean, std, crop_pct, interpolation from the preset transform
    of `weights` (built without a download); ImageNet's convention for None (no pretrained weights)."""
    if weights is None:
        return {}
    preset = weights.transforms()
    crop = int(preset.crop_size[0])
    resize = int(preset.resize_size[0]) if preset.resize_size else crop
    return {"input_size": crop, "mean": tuple(preset.mean), "std": tuple(preset.std), "crop_pct": crop / resize,
            "interpolation": preset.interpolation.value}


@register_family("", names=_torchvision_names, description="a torchvision classification model")
def _torchvision(name: str) -> ModelEntry:
    """Input size and preprocessing (crop, interpolation, normalisation) from the preset transform of
    the model's DEFAULT weights."""
    import torchvision

    default = torchvision.models.get_model_weights(name).DEFAULT
    categories = default.meta.get("categories") if default is not None else None
    return ModelEntry(
        name,
        build=partial(_torchvision_build, name),
        num_classes=len(categories or ()) or 1000,
        named_weights=partial(_torchvision_weights, name),
        description=f"torchvision {name}",
        **_torchvision_preprocessing(default),
    )


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_contains(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _timm_build(name: str, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


TAGS_SHOWN = 6
"""Pretrained tags listed in the error for an unknown timm tag."""


def _timm_bad_tag(name: str) -> UsageError:
    """UsageError for `arch.tag` whose tag timm does not know, naming the tags it has (nearest first)."""
    import timm

    arch, _, tag = name.partition(".")
    tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
    near = difflib.get_close_matches(tag, tags, n=len(tags), cutoff=0.0)[:TAGS_SHOWN]
    more = f" (all: timm.list_pretrained('{arch}.*'))" if len(tags) > TAGS_SHOWN else ""
    known = f"one of {', '.join(f'timm:{arch}.{t}' for t in near)}{more}" if near else "no tag"
    return UsageError(f"timm has no pretrained tag {tag!r} for {arch}; use --model timm:{arch} or {known}")


@register_family("timm", names=_timm_names, contains=_timm_contains,
                 description="any name of timm.list_models()")
def _timm(name: str) -> ModelEntry:
    """Input size, preprocessing (crop_pct, interpolation, mean, std) and class count from timm's
    pretrained config of `name`, ImageNet's convention for an architecture without one (UsageError
    for an `arch.tag` name whose tag timm does not know; nothing is downloaded)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag (...)"
        raise _timm_bad_tag(name) from None
    return ModelEntry(
        f"timm:{name}",
        build=partial(_timm_build, name),
        num_classes=int(cfg.num_classes or 1000) if cfg is not None else 1000,
        description=f"timm {name}",
        **_timm_preprocessing(cfg),
    )


def _timm_preprocessing(cfg: PretrainedCfg | None) -> dict:
    """ModelEntry fields input_size, mean, std, crop_pct, interpolation from a timm pretrained
    config; ImageNet's convention for None (an architecture without pretrained weights)."""
    if cfg is None:
        return {}
    return {"input_size": int(cfg.input_size[-1]), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "crop_pct": float(cfg.crop_pct or IMAGENET_CROP_PCT),
            "interpolation": cfg.interpolation or DEFAULT_INTERPOLATION}
