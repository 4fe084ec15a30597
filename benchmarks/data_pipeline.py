"""Data pipeline: training-loader images/s with the decode-and-resize cache against without it, on real photos
re-encoded at the contest's 384x512 size, with the soft augmentation of recipes/soft_aug.yaml at 128 px.

    python benchmarks/data_pipeline.py [--images 400] [--workers 0] [--smoke]
Goal: at least 3x from the second epoch on (the first epoch of the cached loader includes filling the cache).
"""
import time

from torch.utils.data import DataLoader

from _common import loader_setup


def epoch_rate(loader, epoch: int) -> float:
    loader.sampler.set_epoch(epoch)
    start, seen = time.perf_counter(), 0
    for images, labels, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    from framework.data.dataset import DiskCache, ImageDataset, prepare
    from framework.data.loaders import EpochSampler

    args, tmp, rows, labels, resize, augment = loader_setup(__doc__)

    def loader(images=None, boxes=None):
        ds = ImageDataset(rows, labels, resize, augment, None if images is None else (images, boxes), seed=0)
        return DataLoader(ds, batch_size=64, sampler=EpochSampler([0] * len(rows), 0), num_workers=args.workers,
                          persistent_workers=args.workers > 0)

    plain = loader()
    start = time.perf_counter()
    images, boxes, _ = prepare(rows, resize, threads=2)
    fill = time.perf_counter() - start
    cached = loader(images, boxes)
    disk = DiskCache(tmp / "cache", "bench", 10**10)
    start = time.perf_counter()
    dimages, dboxes, _ = prepare(rows, resize, threads=2, cache=disk)
    disk_fill = time.perf_counter() - start
    on_disk = loader(dimages, dboxes)
    print(f"{len(rows)} photos at 384x512 -> 128x128, soft augmentation, batch 64, {args.workers} workers")
    print(f"filling the cache: memory {fill:.1f} s, disk {disk_fill:.1f} s (decode + resize once, 2 threads)")
    print(f"{'epoch':>5}  {'no cache':>10}  {'memory':>10}  {'disk':>10}  {'memory/none':>12}  {'disk/none':>10}")
    for epoch in range(1, args.epochs + 1):  # alternate, so machine noise hits all alike
        a, b, c = epoch_rate(plain, epoch), epoch_rate(cached, epoch), epoch_rate(on_disk, epoch)
        print(f"{epoch:>5}  {a:>8.0f}/s  {b:>8.0f}/s  {c:>8.0f}/s  {b / a:>11.1f}x  {c / a:>9.1f}x")


if __name__ == "__main__":
    main()
