"""The embedded default data: built offline on first use, cached, opened as a :class:`MetaDataset`.

* ``"synthetic"``: :func:`medmeta.recipes.synthetic.build_synthetic_meta_dataset` (seed 0, 32 px,
  600 images per dataset: enough test images per class for the MedIMeta protocol's 5 shots +
  10 queries, so every experiment preset runs on it unchanged);
* ``"real"``: :func:`medmeta.recipes.real_mini.build_real_mini_meta_dataset` (seed 0), a small
  meta-dataset of real images that installed packages ship.

Nothing is downloaded. The data live in ``$MEDMETA_DATA_DIR`` (default ``~/.cache/medmeta``)
under a versioned folder such as ``synthetic-v1/``; a new version of a generator writes a new
folder instead of reusing stale files. Each build goes to a temporary folder beside the final
one and is renamed into place with ``os.replace``; if two processes race, one rename wins and
the other process discards its copy and opens the winner's, so a reader never sees a partial
build.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from medmeta.data.meta_dataset import MetaDataset
from medmeta.errors import UnknownNameError, known_names

__all__ = ["EMBEDDED", "data_dir", "embedded_path", "open_default", "build_embedded"]

ENV_VAR = "MEDMETA_DATA_DIR"

SYNTHETIC_VERSION = 2
"""Bump when :mod:`medmeta.recipes.synthetic` changes what it writes for the default arguments."""


def _build_synthetic(root: Path) -> Path:
    from medmeta.recipes.synthetic import build_synthetic_meta_dataset

    return build_synthetic_meta_dataset(root, seed=0, image_size=32, num_images=600)


def _build_real(root: Path) -> Path:
    from medmeta.recipes.real_mini import build_real_mini_meta_dataset

    return build_real_mini_meta_dataset(root, seed=0)


def _real_version() -> str:
    from medmeta.recipes.real_mini import REAL_MINI_VERSION

    return str(REAL_MINI_VERSION)


EMBEDDED: dict[str, tuple[Callable[[], str], Callable[[Path], Path]]] = {
    "synthetic": (lambda: str(SYNTHETIC_VERSION), _build_synthetic),
    "real": (_real_version, _build_real),
}
"""Name -> (version of the generated files, builder writing the meta-dataset under a root)."""


def data_dir() -> Path:
    """The cache folder: ``$MEDMETA_DATA_DIR``, else ``~/.cache/medmeta``."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "medmeta"


def _check_name(name: str) -> None:
    if name not in EMBEDDED:
        raise UnknownNameError(f"embedded data set {name!r} does not exist; {known_names(name, EMBEDDED)}")


def embedded_path(name: str) -> Path:
    """Where the embedded data set ``name`` lives (built or not): ``<data_dir>/<name>-v<version>``."""
    _check_name(name)
    version, _ = EMBEDDED[name]
    return data_dir() / f"{name}-v{version()}"


def build_embedded(name: str) -> Path:
    """Build ``name`` into its cache folder unless it is there; returns the folder (race-safe)."""
    final = embedded_path(name)
    if final.is_dir():
        return final
    _, builder = EMBEDDED[name]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        built = Path(builder(tmp / "data"))
        if not built.is_dir():
            raise RuntimeError(f"building embedded data {name!r}: the builder returned {built}, which is no folder")
        os.chmod(built, 0o755)
        try:
            os.replace(built, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_default(name: str = "real") -> MetaDataset:
    """The embedded data set ``name`` (``"synthetic"`` or ``"real"``) as a :class:`MetaDataset`,
    built on first use (see module doc)."""
    _check_name(name)
    path = build_embedded(name)
    try:
        return MetaDataset(path)
    except (OSError, ValueError) as err:
        raise type(err)(
            f"the cached embedded data set {name!r} at {path} cannot be read ({err}); delete that folder to have it "
            f"rebuilt"
        ) from err
