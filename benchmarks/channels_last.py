"""`model.channels_last` on this machine: steps/s of `recipe run`'s training loop with the model in the
channels-last memory format against the default, same recipe otherwise (real UTKFace images, batch 64).

    python benchmarks/channels_last.py [--backbone resnet10t] [--size 64] [--rounds 3] [--smoke]
Epochs of the two alternate, so machine noise hits both alike. The two runs start from the same weights but do not
compute bit-identical steps (other kernels), which is why the option is off by default.
"""
import time

import torch

from _common import built_run, median, parser, utk_gender


def main() -> None:
    from framework.engine.loop import train_epoch

    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.backbone, args.size = 1, "test_resnet", 32
    builds = {"default (NCHW)": built_run(utk_gender(args.backbone, args.size, 64, channels_last=False)),
              "channels_last": built_run(utk_gender(args.backbone, args.size, 64, channels_last=True))}
    times = {name: [] for name in builds}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, b in builds.items():
            b.train_loader.set_epoch(r)
            start = time.perf_counter()
            train_epoch(b, r, False)
            if r:
                times[name].append(time.perf_counter() - start)
    steps = len(builds["default (NCHW)"].train_loader)
    rate = {name: steps / median(t) for name, t in times.items()}
    print(f"{args.backbone} at {args.size} px, batch 64, {steps} steps per epoch, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} epochs each")
    for name, v in rate.items():
        print(f"{name:16s} {v:6.2f} steps/s")
    print(f"ratio channels_last / default: {rate['channels_last'] / rate['default (NCHW)']:.3f}")


if __name__ == "__main__":
    main()
