"""The demo models on the held-out drawn shapes (`tests/drawn_shapes.py`), beside their own val
figures: how right they are on what people show them, not only on their generator.

    python bench/demo_quality.py [--demo-dir DIR]

DIR defaults to the service's demo folder (`make demo-models` trains it). Prints one row a
model, then the demo pipeline (the detector's boxes, each crop classified) on held-out scenes
of several shapes; what each got wrong follows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import read_checkpoint_meta
from models.demo import DEMO_RECIPES, demo_checkpoint, demo_dir
from tests.demo_quality import SCORES, pipeline_scores, runner_for
from tests.drawn_shapes import held_out, held_out_scenes

VAL_METRICS = ("top1", "bbox_AP", "bbox_AP50", "segm_AP50", "mIoU", "pixel_acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=None)
    parser.add_argument(
        "--tasks", nargs="+", choices=list(DEMO_RECIPES), default=list(DEMO_RECIPES)
    )
    args = parser.parse_args()
    drawn = held_out()
    print(f"held-out drawn shapes: {len(drawn)} one-shape images (4 of them the page's samples)")
    print(f"{'model':<10} {'val (its generator)':<42} held-out")
    wrong = {}
    for task in args.tasks:
        path = demo_checkpoint(task, args.demo_dir or demo_dir())
        if not path.is_file():
            print(f"{task:<10} (no checkpoint at {path})")
            continue
        meta = read_checkpoint_meta(path)
        metrics = meta.provenance.metrics or {}
        val = {k: round(v, 3) for k, v in metrics.items() if k in VAL_METRICS}
        scores = SCORES[task](runner_for(path, task), drawn)
        figures = ", ".join(f"{k} {v:.3f}" for k, v in scores.figures.items())
        print(f"{task:<10} {val!s:<42} {figures}")
        wrong[task] = scores.wrong
    paths = {task: demo_checkpoint(task, args.demo_dir or demo_dir()) for task in DEMO_RECIPES}
    if paths["detect"].is_file() and paths["classify"].is_file():
        scenes = held_out_scenes()
        objects = sum(len(s.shapes) for s in scenes)
        detector = runner_for(paths["detect"], "detect")
        scores = pipeline_scores(detector, runner_for(paths["classify"], "classify"), scenes)
        figures = ", ".join(f"{k} {v:.3f}" for k, v in scores.figures.items())
        print(f"\npipeline shapes-inside-boxes, {len(scenes)} scenes, {objects} shapes: {figures}")
        wrong["pipeline"] = scores.wrong
    for task, lines in wrong.items():
        print(f"\n{task}: {len(lines)} wrong")
        for line in lines:
            print("  " + line)


if __name__ == "__main__":
    main()
