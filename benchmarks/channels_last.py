"""`model.channels_last` on this machine: steps/s of `recipe run`'s training loop with the model in the
channels-last memory format against the default, same recipe otherwise (real UTKFace images, batch 64).

    python benchmarks/channels_last.py [--backbone resnet10t] [--size 64] [--rounds 3]
Epochs of the two alternate, so machine noise hits both alike. The two runs start from the same weights but do not
compute bit-identical steps (other kernels), which is why the option is off by default.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import DATA, median


def main() -> None:
    from framework.build import build_data
    from framework.engine import runner
    from framework.recipe.schema import Recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    def setup(channels_last: bool):
        recipe = Recipe.model_validate({
            "data": {"root": str(DATA), "sources": [{"type": "csv", "name": "utk",
                                                     "manifest": "utkface_subset/manifest.csv",
                                                     "group_column": "group"}], "target": {"column": "gender"}},
            "validation": {"type": "holdout", "ratio": 0.5}, "transforms": {"image_size": args.size, "train": []},
            "model": {"backbone": args.backbone, "channels_last": channels_last},
            "train": {"batch_size": 64, "num_workers": 0, "epochs": 10},
            "logging": {"trackers": [], "progress": False}})
        return runner.build_setup(recipe, build_data(recipe), Path(tempfile.mkdtemp()))

    setups = {"default (NCHW)": setup(False), "channels_last": setup(True)}
    times = {name: [] for name in setups}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, s in setups.items():
            s.train_loader.set_epoch(r)
            start = time.perf_counter()
            runner.train_epoch(s, r, False, None)
            if r:
                times[name].append(time.perf_counter() - start)
    steps = len(setups["default (NCHW)"].train_loader)
    rate = {name: steps / median(t) for name, t in times.items()}
    print(f"{args.backbone} at {args.size} px, batch 64, {steps} steps per epoch, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} epochs each")
    for name, v in rate.items():
        print(f"{name:16s} {v:6.2f} steps/s")
    print(f"ratio channels_last / default: {rate['channels_last'] / rate['default (NCHW)']:.3f}")


if __name__ == "__main__":
    main()
