"""Served checkpoints: round trip, and one clear error for every way a file can be wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, CheckpointMeta, build_model, load_checkpoint, save_checkpoint
from models.checkpoint import META_KEY, Provenance


def make_meta(arch="convnext_atto", num_classes=3, **kw) -> CheckpointMeta:
    return CheckpointMeta(
        task="classify",
        arch=arch,
        head="linear",
        num_classes=num_classes,
        labels=[f"c{i}" for i in range(num_classes)],
        provenance=Provenance(source="trained", dataset="unit-test"),
        **kw,
    )


@pytest.fixture
def saved(tmp_path):
    model = build_model("convnext_atto", num_classes=3).eval()
    path = save_checkpoint(model, tmp_path / "atto.safetensors", make_meta(image_size=64))
    return model, path


def test_round_trip_gives_the_same_model_and_meta(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta.image_size == 64 and meta.labels == ["c0", "c1", "c2"]
    assert meta.provenance.source == "trained" and meta.provenance.created
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_header_is_the_documented_json(saved):
    from safetensors import safe_open

    _, path = saved
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    assert set(meta) >= {
        "format_version",
        "task",
        "arch",
        "head",
        "num_classes",
        "labels",
        "image_size",
        "crop_pct",
        "interpolation",
        "mean",
        "std",
        "provenance",
    }
    assert meta["format_version"] == 1 and meta["head"] == "linear"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(saved, keep):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"atto\.safetensors: .*(truncated|not a readable)"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors"):
        load_checkpoint(path)


def test_tensors_of_another_arch(tmp_path):
    femto = build_model("convnext_femto", num_classes=3)
    path = save_checkpoint(femto, tmp_path / "lie.safetensors", make_meta("convnext_atto"))
    with pytest.raises(CheckpointError, match=r"lie\.safetensors: tensors do not match.*shape"):
        load_checkpoint(path)


def test_missing_tensors(saved):
    model, path = saved
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_file(tensors, path, metadata={META_KEY: make_meta().model_dump_json()})
    with pytest.raises(CheckpointError, match="2 missing: head.weight, head.bias"):
        load_checkpoint(path)


def test_no_metadata(saved):
    model, path = saved
    save_file(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="no 'convnext_serve' metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "meta, problem",
    [
        ("{not json", "bad metadata"),
        (json.dumps({"task": "classify"}), "bad metadata"),
        (make_meta().model_dump_json().replace('"c2"', '"c2","c3"'), "4 labels"),
        (make_meta().model_dump_json().replace("convnext_atto", "resnet50"), "unknown arch"),
        # below the backbone's stride of 32 it would load, then fail on every image
        (
            make_meta().model_dump_json().replace('"image_size":224', '"image_size":16'),
            "image_size",
        ),
    ],
)
def test_bad_metadata(saved, meta, problem):
    model, path = saved
    save_file(model.state_dict(), path, metadata={META_KEY: meta})
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "arch, head, task",
    [("convnext_atto", "linear", "classify"), ("maskrcnn_convnext_atto", "maskrcnn", "detect")],
)
def test_unknown_model_kwargs_fail_at_load(tmp_path, arch, head, task):
    # torchvision's MaskRCNN would pass an unknown keyword on to its transform and ignore it
    model = build_model(arch, num_classes=3)
    meta = make_meta().model_copy(
        update={
            "arch": arch,
            "head": head,
            "task": task,
            "model_kwargs": {"rpn_post_nms_top_n_tset": 150},
        }
    )
    path = save_checkpoint(model, tmp_path / "typo.safetensors", meta)
    with pytest.raises(CheckpointError, match=r"typo\.safetensors: cannot build.*top_n_tset"):
        load_checkpoint(path)
