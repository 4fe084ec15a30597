"""Start-up: `recipe --help` and `recipe validate` on the quickstart against `python -c pass`, alternated,
median of 7 each. `validate` runs twice: with timm's answers cached (every run after the first with this timm and
torch) and with an empty cache (the first run: it imports torch and timm and fills the cache).

    python benchmarks/startup.py [--smoke]
Goals: `--help` under 0.5 s more than a bare interpreter; `validate` (cached) under 1.5 s on 2 cores.
"""
import os
import subprocess
import sys
import tempfile
import time

from _common import REPO, median, parser

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def wall(cmd, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__).parse_args()
    cli = [sys.executable, "-m", "framework.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        warm_env = {**os.environ, "RECIPE_CACHE": os.path.join(tmp, "warm")}
        wall(cli + ["validate", QUICKSTART], warm_env)  # fills the cache the warm runs read
        bare, recipe, warm, cold = [], [], [], []
        for i in range(1 if args.smoke else 7):  # alternate, so machine noise hits all alike
            bare.append(wall([sys.executable, "-c", "pass"]))
            recipe.append(wall(cli + ["--help"]))
            warm.append(wall(cli + ["validate", QUICKSTART], warm_env))
            cold.append(wall(cli + ["validate", QUICKSTART], {**os.environ, "RECIPE_CACHE": os.path.join(tmp, f"cold{i}")}))
    b, r, v, c = median(bare), median(recipe), median(warm), median(cold)
    print(f"python -c pass                    {b:.3f} s")
    print(f"recipe --help                     {r:.3f} s   (+{r - b:.3f} s, {r / b:.1f}x)   goal: under +0.5 s")
    print(f"recipe validate quickstart        {v:.3f} s   ({v / r:.1f}x --help)   goal: under 1.5 s")
    print(f"  the same, timm's answers not cached  {c:.3f} s   ({c / v:.1f}x the cached run)")


if __name__ == "__main__":
    main()
