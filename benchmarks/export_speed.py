"""Prediction speed of an exported model: onnxruntime against the run's torch model, on this CPU, side by side.

    python benchmarks/export_speed.py [--smoke]
For the quickstart (resnet10t, 32 px), kaggle_crops_mask (resnet10t, 64 px) and kaggle_crops_mask_pretrained
(tf_efficientnet_lite0, 96 px): a run of the recipe (RECIPE_FAST_DEV_RUN, one epoch: the weights do not change the
speed), exported to ONNX, then the model alone (decoding and resizing are the same for both and left out) on the
same batches of real resized images: images per second at batch 1 and 32, median of 5 rounds, each framework with
its default threads. The outputs are also compared (the export's own check, printed as the max abs difference).
"""
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, median, parser, real_photos

RECIPES = [("quickstart", []), ("kaggle_crops_mask", []), ("kaggle_crops_mask_pretrained", [])]


def images_per_second(forward, batch: np.ndarray, rounds: int) -> float:
    forward(batch)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        forward(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / median(times)


def main() -> None:
    args = parser(__doc__).parse_args()
    recipes, rounds, sizes = (RECIPES[:1], 1, (1, 4)) if args.smoke else (RECIPES, 5, (1, 32))
    os.environ["RECIPE_FAST_DEV_RUN"] = "2"
    from framework import api
    from framework.inference.exported import load_export
    from framework.inference.predict import prepared
    from framework.inference.run import load_run

    tmp = Path(tempfile.mkdtemp(prefix="recipe-export-bench-"))
    photos = [str(p) for p in real_photos(max(sizes))]
    print(f"{os.cpu_count()} cores; images per second of the model alone (median of {rounds} rounds)")
    print(f"{'recipe':<30} {'batch':>5} {'torch':>9} {'onnxruntime':>12} {'ratio':>7}")
    for name, overrides in recipes:
        run = api.run(REPO / "recipes" / f"{name}.yaml", overrides + ["train.epochs=1", f"output.root={tmp}"],
                      name=name, log=lambda *_: None)
        info = api.export(run, out=tmp / f"{name}-onnx", log=lambda *_: None)
        torch_run, onnx_run = load_run(run), load_export(tmp / f"{name}-onnx")
        images, ok, _ = prepared(torch_run, photos)
        tta = None if info["tta"] == "none" else info["tta"]  # the run's eval.tta, inside the export
        for n in sizes:
            batch = np.stack([np.ascontiguousarray(images[i]).transpose(2, 0, 1) for i in ok[:n]])
            a = images_per_second(lambda b: torch_run.forward(b, tta), batch, rounds)
            b = images_per_second(lambda b: onnx_run.forward(b, tta), batch, rounds)
            print(f"{name:<30} {n:>5} {a:>9.1f} {b:>12.1f} {b / a:>6.2f}x" + (f"  (tta {tta})" if tta else ""))
        print(f"{'':<30} (export check: max abs difference {info['check']['max_abs_difference']:.1e} on "
              f"{info['check']['images']} validation images)")


if __name__ == "__main__":
    main()
