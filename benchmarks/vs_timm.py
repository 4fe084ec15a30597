"""Against timm's own data pipeline (timm.data.create_dataset + create_loader, its training transform) on the same
real photos at 384x512, the same output size, batch and workers: images/s per epoch.

    python benchmarks/vs_timm.py [--images 400] [--workers 0] [--size 128] [--smoke]
Goal: ahead. recipe's loader decodes and resizes once (its first epoch includes that), augments the small image and
leaves normalization to the model (counted here: the benchmark normalizes each batch as the model would).
"""
import time

import torch

from _common import loader_setup


def rate(loader, epoch, normalize=None) -> float:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        images = batch[0]
        if normalize is not None:
            images = normalize(images)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    import timm.data

    from framework.data.dataset import ImageDataset, prepare
    from framework.data.loaders import EpochSampler

    args, tmp, rows, labels, resize, augment = loader_setup(__doc__, 128)
    size = args.size
    batch = 8 if args.smoke else 64  # timm's training loader drops the last partial batch
    timm_ds = timm.data.create_dataset("", root=str(tmp / "photos"))
    timm_loader = timm.data.create_loader(timm_ds, input_size=(3, size, size), batch_size=batch, is_training=True,
                                          use_prefetcher=False, num_workers=args.workers, hflip=0.5, color_jitter=0.15,
                                          persistent_workers=args.workers > 0)

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def normalize(x):
        return (x.float() - mean) / std

    print(f"{len(rows)} photos at 384x512 -> {size}x{size}, batch {batch}, {args.workers} workers, 1 torch thread")
    print(f"{'epoch':>5}  {'timm':>10}  {'recipe':>10}  {'recipe/timm':>12}")
    ours = None
    for epoch in range(1, args.epochs + 1):
        t = rate(timm_loader, epoch)
        start = time.perf_counter()
        if ours is None:  # the first epoch pays for decode + resize once
            images, boxes, _ = prepare(rows, resize, threads=1)
            ours = torch.utils.data.DataLoader(ImageDataset(rows, labels, resize, augment, (images, boxes)),
                                               batch_size=batch, sampler=EpochSampler([0] * len(rows), 0),
                                               num_workers=args.workers, persistent_workers=args.workers > 0)
            fill = time.perf_counter() - start
            r = len(rows) / (fill + len(rows) / rate(ours, epoch, normalize))
        else:
            r = rate(ours, epoch, normalize)
        print(f"{epoch:>5}  {t:>8.0f}/s  {r:>8.0f}/s  {r / t:>11.1f}x")


if __name__ == "__main__":
    main()
