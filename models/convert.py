"""Turn upstream ConvNeXt weights into served checkpoints.

Three source layouts are recognised from their keys and renamed to this project's (which is the
official facebookresearch layout): the official `.pth` (`{"model": state_dict}`), timm
`convnext_*` state dicts (including the 1x1-conv MLP of timm's atto..nano) and torchvision
`convnext_*` state dicts. Known official release names (e.g. `convnext_tiny_1k`) are downloaded
first; `CONVNEXT_SERVE_WEIGHTS_URL` points those downloads at a mirror (or a `file://` folder).
"""

from __future__ import annotations

import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoint import CheckpointError, CheckpointMeta, Provenance, save_checkpoint
from .checkpoint import state_dict_mismatch as _mismatch
from .labels import default_labels, read_labels_file
from .registry import build_model, list_models

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/convnext"
# how long a download may wait for the mirror to answer or to send its next bytes
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class Release:
    """An official facebookresearch/ConvNeXt checkpoint and the preprocessing it was trained for."""

    arch: str
    filename: str
    num_classes: int
    image_size: int
    dataset: str

    @property
    def crop_pct(self) -> float:
        # The official eval: resize to size/0.875 and center-crop at 224, a plain resize at 384.
        return 0.875 if self.image_size == 224 else 1.0


def _releases() -> dict[str, Release]:
    releases = {}
    for size in ("tiny", "small", "base", "large"):
        releases[f"convnext_{size}_1k"] = Release(
            f"convnext_{size}", f"convnext_{size}_1k_224_ema.pth", 1000, 224, "imagenet-1k"
        )
    for size in ("base", "large"):
        releases[f"convnext_{size}_1k_384"] = Release(
            f"convnext_{size}", f"convnext_{size}_1k_384.pth", 1000, 384, "imagenet-1k"
        )
    for size in ("tiny", "small", "base", "large", "xlarge"):
        ema = "_ema" if size == "xlarge" else ""
        releases[f"convnext_{size}_22k"] = Release(
            f"convnext_{size}", f"convnext_{size}_22k_224.pth", 21841, 224, "imagenet-22k"
        )
        for res in (224, 384):
            releases[f"convnext_{size}_22k_1k" + ("" if res == 224 else "_384")] = Release(
                f"convnext_{size}",
                f"convnext_{size}_22k_1k_{res}{ema}.pth",
                1000,
                res,
                "imagenet-22k -> imagenet-1k",
            )
    for size in ("small", "base", "large"):
        releases[f"convnext_iso_{size}_1k"] = Release(
            f"convnext_iso_{size}", f"convnext_iso_{size}_1k_224_ema.pth", 1000, 224, "imagenet-1k"
        )
    return releases


OFFICIAL_RELEASES: dict[str, Release] = _releases()

# torchvision's weights resize to this before the 224 center crop, bilinear (its weight metadata).
TORCHVISION_RESIZE = {
    "convnext_tiny": 236,
    "convnext_small": 230,
    "convnext_base": 232,
    "convnext_large": 232,
}


def weights_url(path: str) -> str:
    """An official file's URL: under `CONVNEXT_SERVE_WEIGHTS_URL` (a mirror) where it is set."""
    base = os.environ.get("CONVNEXT_SERVE_WEIGHTS_URL", OFFICIAL_BASE_URL).rstrip("/")
    return f"{base}/{path}"


def release_url(name: str) -> str:
    return weights_url(OFFICIAL_RELEASES[name].filename)


def fetch(src: str | os.PathLike, release_path: str | None = None) -> tuple[Path, str]:
    """(local file, where it came from) of an upstream checkpoint: the official file at
    `release_path`, a URL, or a local path; downloads land in the cache."""
    if release_path is not None:
        url = weights_url(release_path)
        return download(url, cache_dir() / release_path), url
    if re.match(r"^(https?|file)://", str(src)):
        return download(str(src), cache_dir() / Path(str(src)).name), str(src)
    return Path(src), str(src)


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "convnext-serve"
    return Path(os.environ.get("CONVNEXT_SERVE_CACHE", default))


def pretrained_checkpoint(name: str) -> Path:
    """The served checkpoint of an official release (`convnext_tiny_1k`, or a released detector
    or segmenter such as `cascade_maskrcnn_convnext_tiny_1k_3x_coco`): downloaded and converted
    on first use into the cache, with the release's labels and preprocessing."""
    from .convert_dense import DENSE_RELEASES

    if name not in OFFICIAL_RELEASES and name not in DENSE_RELEASES:
        known = ", ".join([*OFFICIAL_RELEASES, *DENSE_RELEASES])
        raise ValueError(f"{name!r} is not an official release; one of: {known}")
    out = cache_dir() / "served" / f"{name}.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part.safetensors")
        convert_checkpoint(name, tmp)
        os.replace(tmp, out)
    return out


class DownloadError(OSError):
    """A download that did not arrive whole; the message names the URL and what went wrong."""


def download(url: str, dest: Path) -> Path:
    """Fetch `url` (http(s) or file://) to `dest` with a progress bar; reuse `dest` if present.

    Only a whole file lands at `dest`: a refused request, or a connection that closes before
    the Content-Length it announced, raises `DownloadError` and leaves no partial file behind
    (one would be taken for the whole file on the next run).
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except OSError as e:  # URLError, a refused connection, a timeout
        raise DownloadError(f"{url}: cannot reach it ({getattr(e, 'reason', e)})") from None
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        received = 0
        try:
            with (
                os.fdopen(fd, "wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar,
            ):
                try:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                        received += len(chunk)
                except (OSError, http.client.HTTPException):
                    pass  # a cut connection: counted as a short file below
            if total is not None and received != total:
                raise DownloadError(
                    f"{url}: the connection closed after {received / 1e6:.1f} MB "
                    f"of {total / 1e6:.1f} MB"
                )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an upstream checkpoint (`.pth`/`.pt`/`.bin` or `.safetensors`), unwrapped.

    `.pth` files load with `weights_only=True`: no arbitrary object is ever unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(path, f"cannot read upstream weights ({_first_line(e)})") from None
    for key in ("model", "state_dict", "model_ema"):  # official, mmcv/lightning, EMA wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'official', 'timm' or 'torchvision', from the keys."""
    if "downsample_layers.0.0.weight" in sd or "stem.weight" in sd:
        return "official"
    if "stem.0.weight" in sd and any(k.startswith("stages.0.blocks.") for k in sd):
        return "timm"
    if "features.0.0.weight" in sd:
        return "torchvision"
    raise ValueError("unrecognised layout: not an official, timm or torchvision ConvNeXt")


def _squeeze_1x1(key: str, v: torch.Tensor) -> torch.Tensor:
    # timm's atto..nano use 1x1 convs for the MLP; the official layout uses Linear.
    if re.search(r"pwconv[12]\.weight$", key) and v.dim() == 4:
        return v.flatten(1)
    return v


_TIMM_RULES = [
    (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.(?:ls\.)?gamma$", r"stages.\1.\2.gamma"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^head\.norm\.", "norm."),
    (r"^norm_pre\.", "norm."),
    (r"^head\.fc\.", "head."),
]

_TORCHVISION_RULES = [
    (r"^features\.0\.(\d)\.", r"downsample_layers.0.\1."),
    (r"^features\.([246])\.(\d)\.", lambda m: f"downsample_layers.{int(m[1]) // 2}.{m[2]}."),
    (
        r"^features\.([1357])\.(\d+)\.block\.0\.",
        lambda m: f"stages.{int(m[1]) // 2}.{m[2]}.dwconv.",
    ),
    (r"^features\.([1357])\.(\d+)\.block\.2\.", lambda m: f"stages.{int(m[1]) // 2}.{m[2]}.norm."),
    (
        r"^features\.([1357])\.(\d+)\.block\.3\.",
        lambda m: f"stages.{int(m[1]) // 2}.{m[2]}.pwconv1.",
    ),
    (
        r"^features\.([1357])\.(\d+)\.block\.5\.",
        lambda m: f"stages.{int(m[1]) // 2}.{m[2]}.pwconv2.",
    ),
    (
        r"^features\.([1357])\.(\d+)\.layer_scale$",
        lambda m: f"stages.{int(m[1]) // 2}.{m[2]}.gamma",
    ),
    (r"^classifier\.0\.", "norm."),
    (r"^classifier\.2\.", "head."),
]


def _rename(sd: dict[str, torch.Tensor], rules: list) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            raise ValueError(f"unexpected key {key!r}")
        if new.endswith(".gamma"):
            value = value.flatten()  # torchvision keeps layer scale as (C, 1, 1)
        out[new] = _squeeze_1x1(new, value)
    return out


def to_official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm or torchvision ConvNeXt state dict to the official (this project's) keys."""
    layout = detect_layout(sd)
    if layout == "official":
        return {k: _squeeze_1x1(k, v) for k, v in sd.items()}
    return _rename(sd, _TIMM_RULES if layout == "timm" else _TORCHVISION_RULES)


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    arch: str | None = None,
    labels: list[str] | str | os.PathLike | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> CheckpointMeta:
    """Convert `src` (a file, a URL, or an official release name) into a served checkpoint.

    Preprocessing defaults follow the source: the official release table, torchvision's weight
    metadata (bilinear, its resize size), otherwise 224 / 0.875 / bicubic. The paper's released
    detectors and segmenters (a dense release name, or a detect/segment `arch`) go to
    `models.convert_dense`.
    """
    from .convert_dense import DENSE_RELEASES, convert_dense_checkpoint
    from .registry import model_task

    if isinstance(labels, (str, os.PathLike)):
        labels = read_labels_file(labels)
    if str(src) in DENSE_RELEASES or (arch is not None and model_task(arch) != "classify"):
        return convert_dense_checkpoint(src, out, arch, labels, image_size)
    release = OFFICIAL_RELEASES.get(str(src))
    path, source = fetch(src, release.filename if release else None)
    dataset = release.dataset if release else ""
    if release is not None:
        arch = arch or release.arch
    if arch is None:
        raise ValueError(f"{src}: give --arch (one of {', '.join(list_models('classify'))})")

    sd = read_state_dict(path)
    try:
        layout = detect_layout(sd)
        sd = to_official_layout(sd)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    if "head.weight" not in sd:
        raise CheckpointError(path, "no classifier head (head.weight) in the weights")
    num_classes = sd["head.weight"].shape[0]
    kwargs = _layer_scale_kwargs(arch, sd)
    model = build_model(arch, num_classes=num_classes, **kwargs)
    problem = _mismatch(model.state_dict(), sd)
    if problem:
        raise CheckpointError(path, f"weights do not match {arch}: {problem}")
    model.load_state_dict(sd, strict=True)

    labels = list(labels) if labels is not None else default_labels(num_classes)
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for a head of {num_classes} classes")

    defaults = {"image_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"}
    if release is not None:
        defaults.update(image_size=release.image_size, crop_pct=release.crop_pct)
    elif layout == "torchvision" and arch in TORCHVISION_RESIZE:
        defaults.update(crop_pct=224 / TORCHVISION_RESIZE[arch], interpolation="bilinear")
    meta = CheckpointMeta(
        task="classify",
        arch=arch,
        head="linear",
        num_classes=num_classes,
        labels=labels,
        image_size=image_size or defaults["image_size"],
        crop_pct=crop_pct or defaults["crop_pct"],
        interpolation=interpolation or defaults["interpolation"],
        provenance=Provenance(
            source="converted", dataset=dataset, upstream=source, upstream_layout=layout
        ),
        model_kwargs=kwargs,
    )
    save_checkpoint(model, out, meta)
    return meta


def _layer_scale_kwargs(arch: str, sd: dict[str, torch.Tensor]) -> dict:
    """Build arguments that make the model's layer scale match the weights (iso S/B vs L)."""
    has_gamma = any(k.endswith(".gamma") for k in sd)
    with torch.device("meta"):
        reference = build_model(arch, num_classes=1).state_dict()
    wants_gamma = any(k.endswith(".gamma") for k in reference)
    if has_gamma == wants_gamma:
        return {}
    return {"layer_scale_init_value": 1e-6 if has_gamma else 0.0}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
