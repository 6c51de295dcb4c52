"""What every chapter's setup cell calls: versions, device, preset and data folder.

The preset is ``tiny`` on a CPU and ``colab`` on a GPU unless ``KPSSL_PRESET`` names another; the data
folder is ``KPSSL_DATA``, else the repository's ``data/`` when running inside a checkout, else ``data/``
in the working folder.

Chapters that read committed results (``book/results``) get them with :func:`fetch_results`: the
checkout's files, or outside a checkout (a notebook opened on Colab) copies downloaded once from the
repository into ``./kpssl_results``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .settings import Settings, preset

__all__ = ["ChapterEnvironment", "setup", "data_root", "ensure_synthetic", "fetch_results", "REPOSITORY"]

SYNTHETIC_PATIENTS = 20
SYNTHETIC_SEED = 0
REPOSITORY = "https://github.com/kpssl/kpssl"  # as in _config.yml (a test checks)
RESULTS_URL = "https://raw.githubusercontent.com/kpssl/kpssl/main/book/results"


@dataclass
class ChapterEnvironment:
    settings: Settings
    device: torch.device
    data: Path
    repository: Path | None

    @property
    def preset(self) -> str:
        return self.settings.name


def _repository_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "kpssl" / "__init__.py").is_file():
            return folder
    return None


def data_root(start: Path | None = None) -> Path:
    """The data folder: ``KPSSL_DATA``, the checkout's ``data/``, or ``./data``."""
    if os.environ.get("KPSSL_DATA"):
        return Path(os.environ["KPSSL_DATA"]).expanduser().resolve()
    repository = _repository_root((start or Path.cwd()).resolve())
    return (repository / "data") if repository else (Path.cwd() / "data").resolve()


def ensure_synthetic(root: Path, patients: int = SYNTHETIC_PATIENTS, seed: int = SYNTHETIC_SEED) -> Path:
    """The built-in synthetic data set under ``root/synthetic``, written on first use (seconds)."""
    from .data.synthetic import GENERATOR_VERSION, write_synthetic_acdc

    folder = Path(root) / "synthetic"
    stamp = folder / ".complete"
    expected = f"patients={patients} seed={seed} generator={GENERATOR_VERSION}"
    if not (stamp.is_file() and stamp.read_text() == expected):
        write_synthetic_acdc(folder, patients=patients, seed=seed)
        tmp = stamp.with_name(".complete.tmp")
        tmp.write_text(expected)
        tmp.replace(stamp)
    return folder


def fetch_results(env: ChapterEnvironment, *names: str) -> Path:
    """The folder holding the committed results ``names`` (paths under ``book/results``).

    Inside a checkout it is the checkout's ``book/results``, and every name must be there. Outside one
    the missing files are downloaded from the repository (``KPSSL_RESULTS_URL`` overrides the address)
    into ``./kpssl_results`` and kept; a failed download raises ``OSError`` naming the file and the
    address, and leaves no partial file."""
    import urllib.request

    from .atomic import atomic_write

    if env.repository is not None:
        folder = env.repository / "book" / "results"
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing committed results {', '.join(missing)}")
        return folder
    folder = Path.cwd() / "kpssl_results"
    base = os.environ.get("KPSSL_RESULTS_URL", RESULTS_URL).rstrip("/")
    for name in names:
        target = folder / name
        if target.is_file():
            continue
        url = f"{base}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                content = response.read()
        except (OSError, ValueError) as error:
            raise OSError(f"{name}: cannot download the committed result from {url} ({error}); run the "
                          "chapter inside a checkout of the repository, or check the network") from None
        atomic_write(target, lambda tmp: tmp.write_bytes(content))
    return folder


def setup(*, verbose: bool = True) -> ChapterEnvironment:
    """Pick device and preset, find the data folder, and print what was chosen."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = os.environ.get("KPSSL_PRESET") or ("colab" if device.type == "cuda" else "tiny")
    settings = preset(name)
    root = data_root()
    env = ChapterEnvironment(settings, device, root, _repository_root(Path.cwd().resolve()))
    if verbose:
        from . import __version__

        gpu = f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""
        print(f"kpssl {__version__}, torch {torch.__version__}, python {platform.python_version()}")
        print(f"device: {device}{gpu}, preset: {name}, data: {root}")
    return env


if __name__ == "__main__":  # python -m kpssl.book student-edition OUT
    from .edition import main

    raise SystemExit(main())
