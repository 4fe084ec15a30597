"""Two trainings on one machine: each alone, then two at once with OpenMP's default wait policy (idle threads spin)
and with OMP_WAIT_POLICY=PASSIVE (idle threads sleep; what the `recipe` command sets before torch loads).

    python benchmarks/paired_runs.py [--smoke]
Each training is resnet10t steps on 64 px batches of 32 in its own process, with torch's default thread count; the
figure is its wall time for the steps, after two warm-up steps. Printed side by side, as ratios to the solo time.
"""
import os
import subprocess
import sys
import time

from _common import median, parser

WORKER = r"""
import sys, time, torch, timm
steps = int(sys.argv[1])
torch.manual_seed(0)
model = timm.create_model("resnet10t", num_classes=3)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 3, (32,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(2):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(time.perf_counter() - start, torch.get_num_threads())
"""


def _env(policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env | ({"OMP_WAIT_POLICY": policy} if policy else {})


def together(n: int, policy: str | None, steps: int) -> tuple[float, int]:
    """n workers started at once: the median of their wall times for the steps, and their thread count."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(steps)], env=_env(policy), stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    outs = [p.communicate()[0].split() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    return median([float(o[0]) for o in outs]), int(outs[0][1])


def main() -> None:
    args = parser(__doc__).parse_args()
    steps = 2 if args.smoke else 20
    start = time.perf_counter()
    solo, threads = together(1, "PASSIVE", steps)
    spin, _ = together(2, None, steps)
    passive, _ = together(2, "PASSIVE", steps)
    print(f"{steps} training steps per process, {threads} threads each, {os.cpu_count()} cores")
    rows = [("one alone", solo), ("two at once, default (idle threads spin)", spin),
            ("two at once, OMP_WAIT_POLICY=PASSIVE", passive)]
    for name, t in rows:
        print(f"{name:<42} {t:6.2f} s each   {t / solo:.2f}x the time alone   (fair share of the cores: 2.00x)"
              if name != "one alone" else f"{name:<42} {t:6.2f} s        1.00x")
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
