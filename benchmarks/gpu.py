"""GPU training throughput: recipe's training loop (Accelerate, autocast, whole-epoch metrics, scheduler) against a
plain timm + torch loop on the same GPU, data, batch and settings, in one run, epochs alternating.

    python benchmarks/gpu.py [--backbones resnet50,tf_efficientnet_lite0] [--size 224] [--batch 64] [--rounds 3]
                             [--configs fp32,bf16,bf16+cl,bf16+cl+compile] [--smoke]
Settings are added one at a time: fp32 eager, then bf16 autocast, then channels_last, then torch.compile. Images
are real UTKFace faces, decoded and resized once (cached in memory, as `recipe run` does), no augmentation, so the
GPU step is what is measured. --smoke runs test_resnet at 32 px on whatever device there is (CI: the CPU); its
figures mean nothing. Goal: recipe within 5% of the plain loop in every setting.
"""
import time

import torch
import torch.nn.functional as F

from _common import built_run, median, parser, utk_gender

CONFIGS = {"fp32": {}, "bf16": {"mixed_precision": "bf16"},
           "bf16+cl": {"mixed_precision": "bf16", "channels_last": True},
           "bf16+cl+compile": {"mixed_precision": "bf16", "channels_last": True, "compile": True}}


def _recipe(backbone: str, size: int, batch: int, config: dict, workers: int) -> dict:
    recipe = utk_gender(backbone, size, batch, channels_last=config.get("channels_last", False),
                        compile=config.get("compile", False))
    recipe["validation"] = {"type": "holdout", "ratio": 0.1}
    recipe["train"] |= {"mixed_precision": config.get("mixed_precision", "no"), "num_workers": workers}
    return recipe


def _plain(b, backbone: str, config: dict, batch: int, workers: int):
    """One epoch of a hand-written loop: timm's model, AdamW, cross-entropy, autocast, on the framework's dataset."""
    import timm

    device = b.accelerator.device
    fmt = torch.channels_last if config.get("channels_last") else torch.contiguous_format
    model = timm.create_model(backbone, num_classes=2).to(device, memory_format=fmt)
    step_model = torch.compile(model) if config.get("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    ds, sampler = b.loaders.train_ds, b.loaders.sampler
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    amp = config.get("mixed_precision") == "bf16" and device.type == "cuda"

    def epoch(n: int) -> None:
        model.train()
        sampler.set_epoch(n)
        for images, labels, _ in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            x = (images.float() - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(step_model(x), labels[:, 0].long().to(device, non_blocking=True))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return epoch


def compare(backbone: str, name: str, args) -> tuple[float, float]:
    """Images/s of the plain loop and of recipe's loop (median of the rounds, after one warm-up epoch each)."""
    from framework.engine.loop import train_epoch

    config = CONFIGS[name]
    b = built_run(_recipe(backbone, args.size, args.batch, config, args.workers))
    plain_epoch = _plain(b, backbone, config, args.batch, args.workers)

    def framework_epoch(n: int) -> None:
        b.train_loader.set_epoch(n)
        train_epoch(b, n, False)
        if b.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    n_images = len(b.loaders.train_ds)
    plain_epoch(0), framework_epoch(1)  # warm-up: compile, cudnn autotuning, the loaders' first pass
    times = {"plain": [], "recipe": []}
    for r in range(args.rounds):
        for side, fn in (("plain", plain_epoch), ("recipe", framework_epoch)):
            start = time.perf_counter()
            fn(r + 2)
            times[side].append(time.perf_counter() - start)
    b.accelerator.free_memory()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the next setting builds its own Accelerator
    return n_images / median(times["plain"]), n_images / median(times["recipe"])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--backbones", default="resnet50,tf_efficientnet_lite0")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    if args.smoke:
        args.backbones, args.configs, args.size, args.batch, args.rounds, args.workers = \
            "test_resnet", "fp32", 32, 16, 1, 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    print(f"{gpu}; torch {torch.__version__}; {args.size} px, batch {args.batch}, {args.workers} loader workers, "
          f"median of {args.rounds} epochs each after a warm-up", flush=True)
    print(f"{'backbone':<24} {'settings':<17} {'plain img/s':>12} {'recipe img/s':>13} {'recipe/plain':>13}", flush=True)
    for backbone in args.backbones.split(","):
        for name in args.configs.split(","):
            plain, ours = compare(backbone, name, args)
            print(f"{backbone:<24} {name:<17} {plain:>12.0f} {ours:>13.0f} {ours / plain:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
