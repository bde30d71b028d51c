"""torchvision's ImageNet checkpoints in the torch hub cache: found there, or downloaded there.

``--weights imagenet`` means torchvision's own checkpoint file for the arch (the original V1
weights the papers used), at ``<torch hub dir>/checkpoints/<file>``, the place torchvision itself
caches it (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default). When
the file is missing it is downloaded there from torchvision's URL with a progress bar; the file
name carries the first hex digits of its sha256 (torchvision's convention) and the download is
checked against them before it is moved into place, so a truncated or altered file is never used.

Offline, a missing file is a :class:`FileNotFoundError` that names the file, the folder and the URL:
copy the file there from a machine that has it and nothing is fetched
(``python -c "import torch; print(torch.hub.get_dir())"`` prints the hub folder).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# torchvision's IMAGENET1K_V1 checkpoints (``torchvision.models.<Arch>_Weights.IMAGENET1K_V1.url``)
IMAGENET_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")

Fetch = Callable[[str, str], None]
"""``fetch(url, destination_file)``: writes the body of ``url`` to the file (may show progress)."""


def hub_checkpoint_dir() -> Path:
    """torchvision's checkpoint cache: ``<torch.hub.get_dir()>/checkpoints``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix(url_or_name: str) -> str:
    """The sha256 prefix a torchvision checkpoint name carries (``resnet18-f37072fd.pth``)."""
    match = _HASH_IN_NAME.search(Path(url_or_name).name)
    if match is None:
        raise ValueError(f"{url_or_name!r} carries no sha256 prefix (expected NAME-<hex>.pth)")
    return match.group(1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_fetch(url: str, dst: str) -> None:
    import torch

    torch.hub.download_url_to_file(url, dst, hash_prefix=None, progress=True)


def _check_arch(arch: str) -> str:
    if arch not in IMAGENET_URLS:
        raise ValueError(
            f"no ImageNet checkpoint is known for arch {arch!r}; "
            f"torchvision checkpoints exist for {', '.join(sorted(IMAGENET_URLS))}"
        )
    return IMAGENET_URLS[arch]


def cached_checkpoint(arch: str, folder: Path | None = None) -> Path | None:
    """The cached checkpoint for ``arch`` (the V1 file preferred, else any ``<arch>-*.pth``)."""
    url = _check_arch(arch)
    folder = hub_checkpoint_dir() if folder is None else folder
    v1 = folder / Path(url).name
    if v1.is_file():
        return v1
    found = sorted(Path(p) for p in glob.glob(str(folder / f"{arch}-*.pth")))
    return found[0] if found else None


def imagenet_checkpoint(
    arch: str, *, download: bool = True, fetch: Fetch | None = None, folder: Path | None = None
) -> Path:
    """The path of torchvision's ImageNet checkpoint for ``arch``, downloading it when missing.

    ``folder`` defaults to torchvision's cache (:func:`hub_checkpoint_dir`). ``fetch`` replaces the
    HTTP download (``torch.hub.download_url_to_file`` with a progress bar). With ``download=False``
    or when the download fails, a missing file is a :class:`FileNotFoundError` saying which file to
    put where; a download whose sha256 does not start with the prefix in the file name is a
    :class:`ValueError` and leaves nothing behind.
    """
    url = _check_arch(arch)
    folder = hub_checkpoint_dir() if folder is None else folder
    cached = cached_checkpoint(arch, folder)
    if cached is not None:
        return cached
    target = folder / Path(url).name
    remedy = (
        f"copy {target.name} (from {url}) into {folder}, or pass --weights PATH (a {arch} "
        "state dict), or --weights random explicitly"
    )
    if not download:
        raise FileNotFoundError(f"ImageNet weights {target.name} are not in {folder}: {remedy}")
    log.info("downloading %s to %s", url, target)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            (fetch or _torch_fetch)(url, str(tmp))
        except OSError as exc:  # URLError, socket errors, DNS failures: all OSError
            reason = getattr(exc, "reason", None) or exc
            raise FileNotFoundError(
                f"ImageNet weights {target.name} are not in {folder} and could not be downloaded "
                f"from {url} ({reason}): {remedy}"
            ) from exc
        digest = _sha256(tmp)
        expected = hash_prefix(url)
        if not digest.startswith(expected):
            raise ValueError(
                f"the download of {url} is corrupt: its sha256 {digest[:16]}... does not start "
                f"with {expected} (the prefix in the file name); nothing was kept, try again"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
