"""Framework overhead: steps/s of `recipe run`'s training loop (Accelerate, whole-epoch metrics, scheduler, the
works) against a minimal hand-written PyTorch loop with the same model, data, batch size and threads.

    python benchmarks/overhead.py [--rounds 3] [--smoke]
Goal: the framework within 5% of the plain loop (2% is the aim). Epochs of the two alternate, so machine noise hits
both alike.
"""
import time

import torch
import torch.nn.functional as F

from _common import built_run, median, parser, utk_gender


def main() -> None:
    from framework.engine.loop import train_epoch
    from framework.backbones import resolve_inputs
    from framework.models import build_model
    from framework.recipe.schema import Recipe

    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbone", default="resnet10t")
    args = ap.parse_args()
    size = 32 if args.smoke else 64
    spec = utk_gender("test_resnet" if args.smoke else args.backbone, size, 32)
    b, recipe = built_run(spec), Recipe.model_validate(spec)
    _, mean, std = resolve_inputs(recipe)
    plain_model, _ = build_model(recipe.model, {"label": 2}, mean, std)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.05)
    ds, sampler = b.loaders.train_ds, b.loaders.sampler
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler)

    def plain_epoch(epoch):
        plain_model.train()
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            loss = F.cross_entropy(plain_model(images)["label"], labels[:, 0].long())
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    def framework_epoch(epoch):
        b.train_loader.set_epoch(epoch)
        train_epoch(b, epoch, False)

    rounds = 1 if args.smoke else args.rounds
    steps = len(loader)
    plain_epoch(0), framework_epoch(0)  # warm-up
    plain_t, frame_t = [], []
    for r in range(1, rounds + 1):
        for fn, out in ((plain_epoch, plain_t), (framework_epoch, frame_t)):
            start = time.perf_counter()
            fn(r)
            out.append(time.perf_counter() - start)
    p, f = steps / median(plain_t), steps / median(frame_t)
    print(f"{recipe.model.backbone} at {size} px, batch 32, {len(ds)} real face images, {torch.get_num_threads()} "
          f"threads, {steps} steps per epoch, median of {rounds} epochs each")
    print(f"plain PyTorch loop   {p:6.2f} steps/s")
    print(f"recipe's train loop  {f:6.2f} steps/s   ratio {f / p:.3f}  (overhead {100 * (1 - f / p):+.1f}%)   "
          "goal: within 5% (aim 2%)")


if __name__ == "__main__":
    main()
