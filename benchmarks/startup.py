"""Start-up: `recipe --help` against `python -c pass`, alternated, median of 7 each.

    python benchmarks/startup.py [--smoke]
Goal: under 0.5 s more than a bare interpreter.
"""
import subprocess
import sys
import time

from _common import REPO, median, parser


def wall(cmd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__).parse_args()
    bare, recipe, validate = [], [], []
    for _ in range(1 if args.smoke else 7):  # alternate, so machine noise hits both alike
        bare.append(wall([sys.executable, "-c", "pass"]))
        recipe.append(wall([sys.executable, "-m", "framework.cli", "--help"]))
        validate.append(wall([sys.executable, "-m", "framework.cli", "validate", str(REPO / "recipes" / "quickstart.yaml")]))
    b, r, v = median(bare), median(recipe), median(validate)
    print(f"python -c pass           {b:.3f} s")
    print(f"recipe --help            {r:.3f} s   (+{r - b:.3f} s, {r / b:.1f}x)   goal: under +0.5 s")
    print(f"recipe validate (quick)  {v:.3f} s   (+{v - b:.3f} s)")


if __name__ == "__main__":
    main()
