"""In-process pieces of the service: config, the model runtime, rendering."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, save_checkpoint
from models.checkpoint import CheckpointMeta, Provenance
from models.cpu import cpu_description, has_native_bf16
from models.masks import encode_rle
from service import render
from service.config import AppConfig, app_configs, read_serve_config
from service.runtime import INFERENCE_THREAD, BatchItem, ModelRunner
from service.tasks import ClassifyOptions, SegmentOptions


def test_the_shipped_serve_config_parses():
    """Its server settings in `args`, its models under the server deployment's user_config."""
    config = read_serve_config("deploy/serve_config.yaml")
    [app] = app_configs(config)
    assert [m.name for m in app.models] == [
        "shapes-classifier",
        "shapes-detector",
        "shapes-segmenter",
    ]
    assert app.server.max_body_bytes == 20 * 1024 * 1024
    assert AppConfig.from_args(config["applications"][0]["args"]).models == []


def test_environment_overrides_the_config(monkeypatch):
    monkeypatch.setenv("CONVNEXT_SERVE_PRECISION", "bf16")
    monkeypatch.setenv("CONVNEXT_SERVE_MAX_PIXELS", "1234")
    app = AppConfig.from_args(
        {"models": [{"name": "a", "checkpoint": "x.safetensors"}], "server": {"max_pixels": 99}}
    )
    assert app.models[0].precision == "bf16"
    assert app.server.max_pixels == 1234  # the environment wins over the file


def test_the_old_name_gateway_is_read_with_a_warning():
    """A serve config written for an earlier version (`args.gateway`) still deploys."""
    old = {"models": [{"name": "a", "checkpoint": "x"}], "gateway": {"max_in_flight": 9}}
    with pytest.warns(DeprecationWarning, match="`args.gateway` is now `args.server`"):
        app = AppConfig.from_args(old)
    assert app.server.max_in_flight == 9
    with pytest.raises(ValueError, match="`server` and `gateway`"):
        AppConfig.from_args({**old, "server": {}})


def test_a_model_to_serve_once_trained_is_sized_for_and_overridden(monkeypatch):
    monkeypatch.setenv("CONVNEXT_SERVE_PRECISION", "bf16")
    later = {
        "name": "b",
        "task": "detect",
        "progress_file": "b.progress.json",
        "serve_as": {"name": "b", "checkpoint": "y", "timeout_s": 99, "num_replicas": 3},
    }
    app = AppConfig.from_args({"models": [{"name": "a", "checkpoint": "x"}], "training": [later]})
    assert [m.name for m in app.every_model()] == ["a", "b"]
    assert app.longest_request_s() == 99 and app.training[0].serve_as.precision == "bf16"
    with pytest.raises(ValueError, match="serve_as names 'c'"):
        AppConfig.from_args(
            {
                "models": [{"name": "a", "checkpoint": "x"}],
                "training": [{**later, "serve_as": {"name": "c", "checkpoint": "y"}}],
            }
        )


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unique"):
        AppConfig.from_args({"models": [{"name": "a", "checkpoint": "x"}] * 2})
    with pytest.raises(ValueError):
        AppConfig.from_args({"models": [{"name": "a", "checkpoint": "x", "precision": "int4"}]})


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model = build_model("convnext_atto", num_classes=3)
    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=3,
        labels=["a", "b", "c"],
        image_size=32,
        provenance=Provenance(source="trained"),
    )
    return save_checkpoint(model, tmp_path_factory.mktemp("rt") / "cls.safetensors", meta)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_runner_batches_with_per_item_top_k(classifier, precision):
    from service.config import ModelConfig

    if precision == "bf16" and not has_native_bf16():
        pytest.skip(f"bf16 is refused on this CPU ({cpu_description()}): see the next test")

    runner = ModelRunner(
        ModelConfig(name="c", checkpoint=str(classifier), precision=precision, max_batch_size=4)
    )
    runner.warmup()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    out = runner.run_batch(
        [BatchItem(img, ClassifyOptions(k)) for img, k in zip(images, (1, 3, 2), strict=True)]
    )
    assert [len(o) for o in out] == [1, 3, 2]
    for o in out:
        scores = [s for _, s in o]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    # batching does not change an answer
    alone = runner.run_batch([BatchItem(images[1], ClassifyOptions(3))])[0]
    assert [c for c, _ in alone] == [c for c, _ in out[1]]
    assert runner.describe()["precision"] == precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_is_refused_at_load_where_the_cpu_has_none(classifier, precision):
    """A CPU without oneDNN bf16 kernels would run bf16 ten times slower than fp32 (fp16 runs
    as bf16 on a CPU): the runner refuses it at load, naming the CPU and what it lacks."""
    from service.config import ModelConfig
    from service.runtime import UnsupportedPrecision

    config = ModelConfig(name="c", checkpoint=str(classifier), precision=precision)
    if has_native_bf16():
        assert ModelRunner(config).precision == "bf16"
        return
    with pytest.raises(UnsupportedPrecision) as refused:
        ModelRunner(config)
    message = str(refused.value)
    assert "'c'" in message and "no native bf16" in message and "fp32" in message
    assert torch.backends.cpu.get_cpu_capability() in message


def test_runner_segments_at_the_original_size(tmp_path):
    model = build_model("upernet_convnext_atto", num_classes=2)
    meta = CheckpointMeta(
        task="segment",
        arch="upernet_convnext_atto",
        head="upernet",
        num_classes=2,
        labels=["bg", "x"],
        image_size=64,
        crop_pct=1.0,
        provenance=Provenance(source="trained"),
    )
    path = save_checkpoint(model, tmp_path / "seg.safetensors", meta)
    from service.config import ModelConfig

    runner = ModelRunner(ModelConfig(name="s", checkpoint=str(path)))
    buf = io.BytesIO()
    Image.new("RGB", (450, 300), (90, 120, 30)).save(buf, "PNG")
    (out,) = runner.run_batch([BatchItem(buf.getvalue(), SegmentOptions())])
    assert out.shape == (300, 450) and out.dtype == np.uint8 and out.max() <= 1


def test_render_draws_boxes_and_masks():
    pixels = np.full((60, 80, 3), 255, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:50] = True
    det = {
        "label": "x",
        "class_id": 0,
        "score": 0.9,
        "box": [20, 10, 50, 30],
        "mask": encode_rle(mask),
    }
    png = render.render_detections(pixels, [det], ["x"], (1.0, 1.0))
    out = np.asarray(Image.open(io.BytesIO(png)))
    assert out.shape == (60, 80, 3)
    assert out[20, 35].tolist() != [255, 255, 255]  # tinted inside the mask
    assert out[55, 5].tolist() == [255, 255, 255]  # untouched far away
    seg = render.render_segmentation(pixels, mask.astype(np.uint8), 2)
    assert Image.open(io.BytesIO(seg)).size == (80, 60)


def test_class_map_png_keeps_ids():
    ids = (np.arange(300 * 2) % 300).reshape(20, 30).astype(np.uint16)
    back = np.asarray(Image.open(io.BytesIO(render.class_map_png(ids))))
    assert back.dtype != np.uint8 and np.array_equal(back.astype(np.uint16), ids)
    small = (np.arange(600) % 7).reshape(20, 30).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.class_map_png(small)))), small)


def test_cpu_threads_follow_the_config(classifier):
    from service.config import ModelConfig

    before = torch.get_num_threads()
    try:
        one = ModelRunner(ModelConfig(name="c", checkpoint=str(classifier), torch_threads=1))
        two = ModelRunner(ModelConfig(name="d", checkpoint=str(classifier), torch_threads=2))
        # the count is per OpenMP master thread: read it where the models run, which share
        # that thread and each set their own count for their batches
        img = np.zeros((32, 32, 3), np.uint8)
        for runner, threads in ((one, 1), (two, 2), (one, 1)):
            runner.run_batch([BatchItem(img, ClassifyOptions(1))])
            assert INFERENCE_THREAD.submit(torch.get_num_threads).result() == threads
    finally:
        torch.set_num_threads(before)


def test_all_torch_work_runs_on_one_thread(classifier):
    """One OpenMP team per process: loading, warm-up and every batch on the runner's thread."""
    import threading

    from service.config import ModelConfig

    runner = ModelRunner(ModelConfig(name="c", checkpoint=str(classifier), max_batch_size=2))
    threads = set()
    runner.model.register_forward_hook(lambda *_: threads.add(threading.get_ident()))
    img = np.zeros((32, 32, 3), np.uint8)
    runner.warmup()
    runner.run_batch([BatchItem(img, ClassifyOptions(1))])
    runner.submit([BatchItem(img, ClassifyOptions(1))] * 2).result()
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_batch_buckets_pad_without_changing_answers(classifier):
    from service.config import ModelConfig
    from service.runtime import _batch_buckets

    assert _batch_buckets(1) == [1]
    assert _batch_buckets(6) == [1, 2, 4, 6]
    assert _batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    runner = ModelRunner(ModelConfig(name="c", checkpoint=str(classifier), max_batch_size=8))
    assert runner.buckets == []  # on the CPU batches run at their own size
    rng = np.random.default_rng(1)
    items = [
        BatchItem(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), ClassifyOptions(3))
        for _ in range(3)
    ]
    plain = runner.run_batch(items)
    runner.buckets = _batch_buckets(8)  # what a GPU replica uses: 3 items run as a batch of 4
    padded = runner.run_batch(items)
    assert len(padded) == 3
    for a, b in zip(plain, padded, strict=True):
        assert [c for c, _ in a] == [c for c, _ in b]
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
