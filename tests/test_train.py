"""The training library and CLI: losses fall, resume is exact, lr decay ids, Ray Train, eval."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from models import build_model, load_checkpoint
from models import data as datasets_module
from models.data import synth
from models.detection import AlignedRoIAlign
from models.train import TrainConfig, train
from models.train.optim import layer_id, param_groups
from service.cli import main as cli


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synth("classify", root / "cls", n=48, seed=1, image_size=32, n_val=12)
    synth("detect", root / "det", n=8, seed=1, image_size=96, n_val=4)
    synth("segment", root / "seg", n=8, seed=1, image_size=64, n_val=4)
    return root


def history(out) -> list[dict]:
    log = out.with_name(out.stem + ".log.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()]


def eval_json(capsys, task, data, checkpoint) -> dict:
    """`convnext-serve eval TASK --json`: the last line printed is one JSON object."""
    capsys.readouterr()
    assert cli(["eval", task, "--data", str(data), "--checkpoint", str(checkpoint), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


FAST = dict(progress=False, loader_workers=0, warmup_epochs=0.5)


def test_classification_trains_and_writes_a_served_checkpoint(datasets, tmp_path, capsys):
    out = tmp_path / "cls.safetensors"
    cfg = TrainConfig.for_task(
        "classify",
        data=str(datasets / "cls"),
        arch="convnext_atto",
        out=str(out),
        epochs=4,
        batch_size=16,
        image_size=32,
        lr=2e-3,
        ema_decay=0.9,
        **FAST,
    )
    metrics = train(cfg)
    rows = history(out)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    assert {"top1", "top5", "ema_top1", "ema_top5", "lr", "images_per_s"} <= set(rows[-1])
    # 48 images in batches of 16 (the last partial one dropped): all of them, one worker
    assert [(r["images"], r["world_size"]) for r in rows] == [(48, 1)] * 4
    assert set(metrics) == {"top1", "top5"}
    _, meta = load_checkpoint(out)
    assert meta.task == "classify" and meta.labels == ["circle", "square", "star", "triangle"]
    assert meta.provenance.source == "trained" and meta.provenance.metrics == metrics
    assert meta.provenance.model_extra["recipe"]["mixup"] == 0.8  # the paper's recipe
    assert out.with_name("cls.curves.png").stat().st_size > 1000
    assert eval_json(capsys, "classify", datasets / "cls", out) == pytest.approx(metrics)


def test_a_fixed_training_view_is_decoded_once_with_the_same_pixels(datasets):
    """Whole-image resize + flips: the images are decoded once, and a batch gets exactly what
    the per-image transforms give; any other view keeps decoding per image."""
    from models.train.tasks import ClassifyTask

    fixed = dict(
        data=str(datasets / "cls"),
        arch="convnext_atto",
        out="x.safetensors",
        image_size=40,
        crop_scale=(1.0, 1.0),
        randaug_ops=0,
        reprob=0.0,
        **FAST,
    )
    for hflip in (0.0, 1.0):
        task = ClassifyTask(TrainConfig.for_task("classify", hflip=hflip, **fixed))
        assert isinstance(task.train_set, torch.utils.data.TensorDataset)
        assert task.loader_workers == 0 and task.labels[0] == "circle"
        per_image = datasets_module.classification_dataset(
            datasets / "cls", "train", task._train_view()
        )
        images, targets = task.train_set.tensors
        assert images.shape == (48, 3, 40, 40) and images.dtype == torch.uint8
        for i in (0, 17, 47):
            expected, target = per_image[i]
            torch.testing.assert_close(task._batch_view(images[i : i + 1])[0], expected)
            assert int(targets[i]) == target
    paper = ClassifyTask(TrainConfig.for_task("classify", **{**fixed, "crop_scale": (0.08, 1.0)}))
    assert not isinstance(paper.train_set, torch.utils.data.TensorDataset)


def test_detection_training_lowers_the_loss(datasets, tmp_path, capsys):
    out = tmp_path / "det.safetensors"
    cfg = TrainConfig.for_task(
        "detect",
        data=str(datasets / "det"),
        arch="maskrcnn_convnext_atto",
        out=str(out),
        epochs=3,
        batch_size=2,
        min_size=96,
        max_size=96,
        lr=3e-4,
        roi_batch_size=64,
        roi_positive_fraction=0.5,
        rpn_train_proposals=300,
        rpn_test_proposals=150,
        fpn_channels=64,
        box_head_dim=256,
        mask_head_dim=64,
        roi_align="mmdet",
        **FAST,
    )
    metrics = train(cfg)
    rows = history(out)
    assert rows[-1]["loss_classifier"] < rows[0]["loss_classifier"]
    assert sum(v for k, v in rows[-1].items() if k.startswith("loss_")) < sum(
        v for k, v in rows[0].items() if k.startswith("loss_")
    )
    assert set(metrics) == {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"}
    model, meta = load_checkpoint(out)
    assert meta.task == "detect" and meta.model_kwargs == {
        "min_size": 96,
        "max_size": 96,
        "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_test": 150,
        "fpn_channels": 64,
        "box_head_dim": 256,
        "mask_head_dim": 64,
        "roi_align": "mmdet",
    }
    assert model.backbone.out_channels == 64  # the served model has the trained widths
    assert isinstance(model.roi_heads.mask_roi_pool, AlignedRoIAlign)  # and the trained RoIAlign
    assert model.rpn.post_nms_top_n() == 150  # the served model proposes what it was given
    assert meta.labels == ["circle", "square", "triangle", "star"]
    assert eval_json(capsys, "detect", datasets / "det", out) == pytest.approx(metrics)


def test_segmentation_training_lowers_the_loss(datasets, tmp_path, capsys):
    out = tmp_path / "seg.safetensors"
    cfg = TrainConfig.for_task(
        "segment",
        data=str(datasets / "seg"),
        arch="upernet_convnext_atto",
        out=str(out),
        epochs=3,
        batch_size=4,
        image_size=64,
        lr=1e-3,
        **FAST,
    )
    metrics = train(cfg)
    rows = history(out)
    assert rows[-1]["loss_seg"] < rows[0]["loss_seg"]
    assert set(metrics) == {"mIoU", "pixel_acc"}
    _, meta = load_checkpoint(out)
    assert meta.task == "segment" and meta.labels[0] == "background" and meta.num_classes == 5
    last = eval_json(capsys, "segment", datasets / "seg", out)
    assert last == pytest.approx(metrics) and all(0 <= v <= 1 for v in last.values())
    # a segmenter is not a classifier: one clear line, exit 2
    assert cli(["eval", "classify", "--data", str(datasets / "cls"), "--checkpoint", str(out)]) == 2


def test_layer_ids_follow_the_official_scheme():
    expect = {
        "downsample_layers.0.0.weight": 0,
        "downsample_layers.0.1.bias": 0,
        "stages.0.2.dwconv.weight": 1,
        "downsample_layers.1.1.weight": 2,
        "stages.1.0.gamma": 2,
        "downsample_layers.2.0.weight": 3,
        "stages.2.0.pwconv1.weight": 3,
        "stages.2.2.norm.weight": 3,
        "stages.2.3.norm.weight": 4,
        "stages.2.26.pwconv2.bias": 11,
        "downsample_layers.3.1.weight": 12,
        "stages.3.2.gamma": 12,
        "norm.weight": 13,
        "head.weight": 13,
        "backbone.body.stages.2.5.dwconv.weight": 4,  # Mask R-CNN's backbone
        "backbone.fpn.layer_blocks.0.0.weight": 13,
        "decode_head.conv_seg.weight": 13,
    }
    assert {name: layer_id(name) for name in expect} == expect
    assert layer_id("blocks.4.dwconv.weight", iso_depth=18) == 5
    assert layer_id("stem.weight", iso_depth=18) == 0
    assert layer_id("head.weight", iso_depth=18) == 19


def test_param_groups_decay_lr_by_layer_and_skip_weight_decay_on_norms():
    model = build_model("convnext_small", num_classes=10)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["downsample_layers.0.0.weight"]["lr"] == pytest.approx(1e-3 * 0.8**13)
    assert by_name["stages.2.10.pwconv1.weight"]["lr"] == pytest.approx(1e-3 * 0.8 ** (13 - 6))
    for name in ("stages.0.0.gamma", "stages.0.0.norm.weight", "head.bias", "norm.weight"):
        assert by_name[name]["weight_decay"] == 0.0
    assert by_name["stages.0.0.pwconv1.weight"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _train_cmd(datasets, out, epochs, *extra):
    return [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "classify",
        "--data",
        str(datasets / "cls"),
        "--arch",
        "convnext_atto",
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--lr",
        "1e-3",
        "--ema-decay",
        "0.9",
        "--loader-workers",
        "0",
        "--no-progress",
        "--warmup-epochs",
        "1",
        *extra,
    ]


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(datasets, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight.safetensors"
    subprocess.run(_train_cmd(datasets, straight, 3), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed.safetensors"
    state = tmp_path / "resumed.safetensors.state" / "last.pt"
    proc = subprocess.Popen(
        _train_cmd(datasets, resumed, 3),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a test run started in the background (`make test &`) ignores SIGINT, and a child
        # would inherit that: give it the default disposition, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C during epoch 2 (or 3, on a fast machine)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert b"--resume" in err and not resumed.exists()
    assert torch.load(state, weights_only=True)["epoch"] in (1, 2)  # the last full epoch

    assert cli(["train", "classify", "--resume", str(state.parent)]) == 0
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_two_ray_train_workers_on_cpu(datasets, tmp_path):
    import ray

    out = tmp_path / "ray.safetensors"
    cfg = TrainConfig.for_task(
        "classify",
        data=str(datasets / "cls"),
        arch="convnext_atto",
        out=str(out),
        epochs=1,
        batch_size=8,
        image_size=32,
        num_workers=2,
        ema_decay=0,
        **FAST,
    )
    try:
        metrics = train(cfg)
    finally:
        ray.shutdown()
    assert set(metrics) == {"top1", "top5"}
    _, meta = load_checkpoint(out)
    assert meta.provenance.model_extra["recipe"]["num_workers"] == 2
    # each rank counts what it trained on and rank 0 logs the sum: 24 images each, 48 in all
    (row,) = [json.loads(line) for line in out.with_name("ray.log.jsonl").read_text().splitlines()]
    assert (row["world_size"], row["images"]) == (2, 48)


def test_the_cli_picks_the_small_data_recipe_which_learns_real_digits(tmp_path, capsys):
    """scikit-learn's handwritten digits (real 8 px scans, 1,437 train / 360 val) with the
    CLI's defaults: it says it picks the small-data recipe, and ConvNeXt-atto learns them from
    scratch in 12 epochs (the paper's ImageNet recipe, `--recipe paper`, stays far below:
    bench/small_data.py)."""
    from models.train.recipes import choose_recipe

    from .digits import write_digits

    data = write_digits(tmp_path / "digits")
    out = tmp_path / "digits.safetensors"
    cmd = [
        "train",
        "classify",
        "--data",
        str(data),
        "--arch",
        "convnext_atto",
        "--out",
        str(out),
        "--epochs",
        "12",
        "--hflip",
        "0",
        "--no-progress",
    ]
    assert cli(cmd) == 0
    said = capsys.readouterr().err
    assert "the small recipe (1,437 training images, 8 px short side (median))" in said
    assert "--recipe paper for the other" in said
    _, meta = load_checkpoint(out)
    recipe = meta.provenance.model_extra["recipe"]
    assert (recipe["recipe"], recipe["image_size"], recipe["mixup"]) == ("small", 32, 0.0)
    assert recipe["hflip"] == 0.0  # what the user typed wins over the recipe
    assert meta.image_size == 32 and meta.labels == [str(d) for d in range(10)]
    assert meta.provenance.metrics["top1"] >= 0.9
    assert choose_recipe("paper", data, 20) == ("paper", {}, "asked for")


def test_a_demo_model_is_trained_after_the_one_it_starts_from(tmp_path, monkeypatch):
    """`build_demo_models(tasks=["segment"])` on an empty folder trains what the segmenter's
    backbone starts from first (smoke recipes: two steps an epoch), and its training starts
    from that checkpoint."""
    from models import demo
    from models.checkpoint import read_tensors

    monkeypatch.setenv("CONVNEXT_SERVE_DEMO_SMOKE", "1")
    assert demo.with_prerequisites(["classify"]) == ["classify"]
    chain = demo.with_prerequisites(["segment"])
    assert chain[-1] == "segment" and chain[0] == "classify"
    assert demo.with_prerequisites(["segment", "detect"]) == [
        t for t in demo.DEMO_RECIPES if t in {*chain, "detect"}
    ]
    paths = demo.build_demo_models(tmp_path, tasks=["segment"])
    assert list(paths) == chain
    for task in chain:
        assert load_checkpoint(paths[task])[1].task == task
    # a stem that no training from scratch would give: the segmenter started from its source
    source = read_tensors(paths[demo.DEMO_INIT["segment"]])
    stem = next(k for k in source if k.endswith("downsample_layers.0.0.weight"))
    start = source[stem]
    trained = read_tensors(paths["segment"])["backbone.downsample_layers.0.0.weight"]
    assert (trained - start).abs().max() < 0.05 < start.abs().max()
