"""A GPU replica decodes JPEGs with nvJPEG and resizes on the GPU: the same geometry as the CPU
path (Pillow, draft mode), pixels within the decoders' rounding. Skipped without CUDA."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from service.config import ModelConfig
from service.runtime import BatchItem, ModelRunner
from service.tasks import ClassifyOptions, DetectOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def jpeg(size, orientation=1, progressive=False, mode="RGB") -> bytes:
    rng = np.random.default_rng(size[0])
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).convert(mode)
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes(), progressive=progressive)
    return buf.getvalue()


def runners(tmp_path, task):
    arch = "convnext_atto" if task == "classify" else "maskrcnn_convnext_atto"
    meta = CheckpointMeta(
        task=task,
        arch=arch,
        head="linear" if task == "classify" else "maskrcnn",
        num_classes=3,
        labels=["a", "b", "c"],
        image_size=64,
        provenance=Provenance(source="trained"),
    )
    path = save_checkpoint(build_model(arch, num_classes=3), tmp_path / f"{task}.st", meta)
    return [
        ModelRunner(ModelConfig(name=d, checkpoint=str(path), device=d)) for d in ("cpu", "cuda")
    ]


IMAGES = [
    jpeg((640, 480)),
    jpeg((480, 640), orientation=6),
    jpeg((300, 200), orientation=3),
    jpeg((500, 400), progressive=True),
    jpeg((320, 240), mode="L"),
    jpeg((90, 70)),
]


@pytest.mark.parametrize("task", ["classify", "detect"])
def test_gpu_prepare_matches_the_cpu_geometry(tmp_path, task):
    cpu, gpu = runners(tmp_path, task)
    options = ClassifyOptions() if task == "classify" else DetectOptions()
    entries = [BatchItem(data, options) for data in IMAGES]
    a, b = cpu.prepare(entries), gpu.prepare(entries)
    torch.cuda.synchronize()
    assert not a.errors and not b.errors
    assert a.sizes == b.sizes  # the upright original sizes, EXIF included
    for x, y in zip(a.images, b.images, strict=True):
        assert y.device.type == "cuda" and x.shape == y.shape
        diff = (x.float() - y.cpu().float()).abs().mean().item()
        assert diff < 6, diff  # draft-mode DCT scaling and the decoders round differently


def test_gpu_batch_runs_with_a_bad_image_failing_alone(tmp_path):
    cpu, gpu = runners(tmp_path, "classify")
    entries = [BatchItem(d, ClassifyOptions(2)) for d in (IMAGES[0], IMAGES[0][:300], IMAGES[1])]
    results = gpu.forward(gpu.prepare(entries))
    assert isinstance(results[1], ValueError) and results[1].code == "invalid_image"
    expected = cpu.forward(cpu.prepare(entries))
    assert [r[0][0] for r in (results[0], results[2])] == [
        r[0][0] for r in (expected[0], expected[2])
    ]
