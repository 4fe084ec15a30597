"""Everything `recipe tune` checks and opens before its first trial: the section, the space (keys and values), the
metric, the sampler's package, the storage and the study. Each problem is a located error; no trial starts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from framework.errors import FieldError, Issue, RecipeError, RunError, did_you_mean
from framework.recipe.loaded import LoadedRecipe, load_recipe
from framework.tune import space as sp
from framework.tune.study import Plan, make_pruner, make_sampler

LOWER_IS_BETTER = ("loss", "mae")
DRIVER_FIX = ('install the database driver: pip install -e ".[tune]" (psycopg 3 for postgresql://; '
              "postgresql+psycopg2:// needs psycopg2-binary), or use a journal file.")


def open_plan(path, overrides, trials: int | None = None, storage: str | None = None, study: str | None = None):
    """The checked plan and the opened study (Optuna is an extra: a located error names it when missing)."""
    if importlib.util.find_spec("optuna") is None:
        raise RunError(Issue("`recipe tune` needs Optuna, which is not installed.", field="tune",
                             fix='pip install -e ".[tune]" (optuna, and the PostgreSQL driver).'))
    plan = make_plan(path, list(overrides), trials, storage, study)
    return plan, open_study(plan, open_storage(plan))


def make_plan(path: str | Path, overrides: list[str], trials: int | None = None, storage: str | None = None,
              study: str | None = None) -> Plan:
    """The checked plan of a study of the recipe at `path`: its base recipe resolves (every check of `validate`),
    and so does every value the space may give; command-line values replace the section's."""
    from framework.resolve import resolve

    loaded = load_recipe(path, overrides)
    if loaded.recipe.tune is None:
        raise RecipeError(Issue("this recipe has no `tune` section: nothing to search.", field="tune",
                                file=str(path), fix="add one (README: Tuning), e.g. tune: {space: "
                                                    "{train.optimizer.lr: {float: [1.0e-4, 1.0e-2], log: true}}}."))
    metric, direction = check_tune(path, overrides, resolve(loaded))
    recipe, spec = loaded.recipe, loaded.recipe.tune
    root = Path(recipe.output.root)
    plan = Plan(Path(path), list(overrides), spec, metric, direction, root, study or spec.study or Path(path).stem,
                "", _checkpoint_overrides(recipe, metric, direction), recipe.train.epochs, recipe.eval.every)
    if trials is not None:
        plan.spec = spec.model_copy(update={"trials": trials})
    plan.storage = storage or spec.storage or str(plan.folder / "study.journal")
    return plan


def check_tune(path: str | Path, overrides: list[str], base) -> tuple[str, str]:
    """The `tune` section of a resolved recipe (`base`, framework.resolve.Resolved): keys are recipe paths, every
    choice and range end makes a recipe that passes the checks, the metric is one the tasks produce, the sampler is
    installed. Returns the metric and the direction. `recipe validate` runs this too."""
    from framework.resolve import check_recipe, monitor_names, resolve

    loaded, spec = base.loaded, base.recipe.tune
    with loaded.errors_located():
        sp.check_keys(spec.space)
        _check_sampler(spec)
    sources = sorted({base.plan.rows[i]["source"] for i in base.plan.indices("val")})
    metric = spec.metric or loaded.recipe.checkpoint.monitor
    names = monitor_names(loaded.recipe, base.plan.labels, sources)
    with loaded.errors_located():
        if metric not in names:
            raise FieldError(("tune", "metric"), f"no task of this recipe produces {metric!r}."
                             f"{did_you_mean(metric, names)}", f"use one of: {', '.join(names)}.")

    def check_one(variant: LoadedRecipe, key: str) -> None:
        if key.split(".")[0] in ("data", "validation", "tasks"):
            resolve(variant)  # the data plan itself changes
        else:
            check_recipe(variant)

    problems = sp.check_values(path, overrides, spec.space, check_one)
    if problems:
        raise loaded.located(FieldError.many(problems))
    return metric, _direction(loaded, metric)


def _check_sampler(spec) -> None:
    if spec.sampler.name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise FieldError(("tune", "sampler", "name"), "the cmaes sampler needs the cmaes package, which is not "
                         "installed.", "pip install cmaes, or use sampler: {name: tpe}.")
    if spec.sampler.name == "grid":
        sp.grid(spec.space)


def _direction(loaded: LoadedRecipe, metric: str) -> str:
    spec, cp = loaded.recipe.tune, loaded.recipe.checkpoint
    if spec.direction:
        return spec.direction
    if metric == cp.monitor:
        return "maximize" if cp.mode == "max" else "minimize"
    return "minimize" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "maximize"


def _checkpoint_overrides(recipe, metric: str, direction: str) -> list[str]:
    """Each trial keeps its best epoch by the tuned metric (and is scored by it)."""
    mode = "max" if direction == "maximize" else "min"
    out = [] if metric == recipe.checkpoint.monitor else [f"checkpoint.monitor={metric}"]
    return out + ([] if mode == recipe.checkpoint.mode else [f"checkpoint.mode={mode}"])


# ------------------------------------------------------------------------------------------- storage
def open_storage(plan: Plan):
    """A journal file (the default; one machine or a shared disk), SQLite, or a database server by URL."""
    import optuna

    url = plan.storage
    where = "--storage / tune.storage"
    try:
        if "://" not in url:
            file = Path(url)
            file.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(file)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return _rdb(url, {"connect_args": {"timeout": 120}})
        return _rdb(url, {"pool_pre_ping": True})
    except ModuleNotFoundError as e:
        raise RunError(Issue(f"the storage {url!r} needs the Python package {e.name!r}, which is not installed.",
                             field=where, fix=DRIVER_FIX)) from None
    except OSError as e:
        raise RunError(Issue(f"cannot open the journal file {url}: {e.strerror or e}.", field=where,
                             fix="give a path in a folder you can write.")) from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's connection errors, bad URLs
        first = str(e).strip().splitlines()[0][:300].rstrip(".") if str(e).strip() else type(e).__name__
        driver = "DB access module" in first or isinstance(e.__cause__ or e.__context__, ModuleNotFoundError)
        raise RunError(Issue(f"cannot open the study storage {url!r}: {first}.", field=where,
                             fix=DRIVER_FIX if driver else "check the URL, that the server runs and accepts you "
                                 "(host, port, user, database), or use a journal file path.")) from None


def _rdb(url: str, engine_kwargs: dict):
    """Optuna's database storage. Workers that start together race to create its tables (a UNIQUE constraint on
    alembic_version fails for all but one): the losers try again, and then find the tables made."""
    import time

    import optuna

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except ModuleNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - retried only while the tables are being made
            if attempt == 5 or not any(w in str(e) for w in ("UNIQUE", "unique", "already exists", "locked")):
                raise
            time.sleep(0.5 + attempt)


def open_study(plan: Plan, storage):
    """Create the study or join it; a study of the same name that searches another recipe or space is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=plan.name, storage=storage, load_if_exists=True,
                                direction=plan.direction, sampler=make_sampler(plan), pruner=make_pruner(plan))
    mine = identity(plan)
    theirs = {k: study.user_attrs.get(k) for k in mine}
    if not any(v is not None for v in theirs.values()):
        for k, v in mine.items():
            study.set_user_attr(k, v)
    elif theirs != mine or study.direction.name.lower() != plan.direction:
        differ = [k for k in mine if theirs[k] != mine[k]] or ["direction"]
        raise RunError(Issue(f"study {plan.name!r} in {plan.storage} already searches something else (its "
                             f"{', '.join(differ)} differ from this command's).", field="--study",
                             fix="give this search its own name (--study NAME or tune.study), or run the "
                                 "command that started it."))
    return study


def identity(plan: Plan) -> dict:
    """What makes two workers' trials comparable: the recipe (by file name: machines keep their checkouts in
    different places), its overrides, the metric and the space."""
    shared = [o for o in plan.overrides if not o.startswith("tune.")]  # a worker's own trials, timeout, ...
    return {"recipe": plan.recipe.name, "overrides": json.dumps(shared + plan.checkpoint),
            "metric": plan.metric,
            "space": json.dumps({k: v.model_dump(mode="json") for k, v in plan.spec.space.items()}, sort_keys=True)}
