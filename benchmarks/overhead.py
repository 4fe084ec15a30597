"""Framework overhead: steps/s of `recipe run`'s training loop (Accelerate, whole-epoch metrics, scheduler, the
works) against a minimal hand-written PyTorch loop with the same model, data, batch size and threads.

    python benchmarks/overhead.py [--rounds 3]
Goal: the framework within 5% of the plain loop. Epochs of the two alternate, so machine noise hits both alike.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import DATA, median


def main() -> None:
    from framework.build import build_data
    from framework.engine import runner
    from framework.models import build_model
    from framework.recipe.schema import Recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbone", default="resnet10t")
    args = ap.parse_args()
    recipe = Recipe.model_validate({
        "data": {"root": str(DATA), "sources": [{"type": "csv", "name": "utk", "manifest": "utkface_subset/manifest.csv",
                                                 "group_column": "group"}], "target": {"column": "gender"}},
        "validation": {"type": "holdout", "ratio": 0.5}, "transforms": {"image_size": 64, "train": []},
        "model": {"backbone": args.backbone}, "train": {"batch_size": 32, "num_workers": 0, "epochs": 10},
        "logging": {"trackers": [], "progress": False}})
    plan = build_data(recipe)
    s = runner.build_setup(recipe, plan, Path(tempfile.mkdtemp()))
    size, mean, std = runner.model_inputs(recipe)
    plain_model, _ = build_model(recipe.model, {"label": 2}, mean, std)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(s.train_ds, batch_size=32, sampler=s.sampler)

    def plain_epoch(epoch):
        plain_model.train()
        s.sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            loss = F.cross_entropy(plain_model(images)["label"], labels[:, 0])
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    def framework_epoch(epoch):
        s.train_loader.set_epoch(epoch)
        runner.train_epoch(s, epoch, False, None)

    steps = len(loader)
    plain_epoch(0), framework_epoch(0)  # warm-up
    plain_t, frame_t = [], []
    for r in range(1, args.rounds + 1):
        for fn, out in ((plain_epoch, plain_t), (framework_epoch, frame_t)):
            start = time.perf_counter()
            fn(r)
            out.append(time.perf_counter() - start)
    p, f = steps / median(plain_t), steps / median(frame_t)
    print(f"{args.backbone} at 64 px, batch 32, {len(s.train_ds)} real face images, {torch.get_num_threads()} threads,"
          f" {steps} steps per epoch, median of {args.rounds} epochs each")
    print(f"plain PyTorch loop   {p:6.2f} steps/s")
    print(f"recipe's train loop  {f:6.2f} steps/s   ratio {f / p:.3f}  (overhead {100 * (1 - f / p):+.1f}%)   "
          "goal: within 5%")


if __name__ == "__main__":
    main()
