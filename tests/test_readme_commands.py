"""The README's commands are what CI runs (.ci/readme_commands.py): the extraction finds every one of them, and the
tables of skipped, failing-on-purpose and interrupted commands match the README as it is."""
from pathlib import Path

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script(REPO / ".ci" / "readme_commands.py")


def test_every_readme_command_is_found_and_the_tables_match_the_readme():
    script = _script()
    commands = [c for _, c in script.readme_commands((REPO / "README.md").read_text(encoding="utf-8"))]
    for c in (*script.SKIP, *script.EXPECTED, *script.INTERRUPT, *script.FULL):
        assert c in commands, f"{c!r} is in a table of .ci/readme_commands.py but not in the README"
    # the sweep over image sizes (its 96 px members crashed once), continued lines and inline commands are found
    assert ("recipe sweep recipes/hard_aug.yaml --grid model.backbone=resnet10t,resnet18 "
            "--grid transforms.image_size=64,96") in commands
    assert any(c.startswith("torchrun --nnodes 2") and c.endswith("--name big") for c in commands)
    assert "bash docs/three_vs_one.sh" in commands and "recipe evaluate runs/age-reg --set tasks.age.bins=[30,58]" in commands
    assert "recipe compare" not in commands  # a command's name in the prose is not a command
    skipped = [c for c in commands if c in script.SKIP]
    # skipped: the test command, 4 GPUs, two machines (torchrun, and tune's shared PostgreSQL), a placeholder, and
    # the example of what not to do
    assert len(skipped) <= 6 and len(commands) - len(skipped) >= 30


def test_block_commands_join_continuations_and_drop_comments():
    block = "recipe run a.yaml   # train\n# a comment line\ntorchrun --x 1 \\\n  -m framework.cli run b.yaml  # two\n"
    assert _script()._block_commands(block) == ["recipe run a.yaml", "torchrun --x 1 -m framework.cli run b.yaml"]


def test_ci_runs_the_readme_commands_after_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("python -m pytest -q") < ci.index("python .ci/readme_commands.py")
