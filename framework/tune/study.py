"""One tuning worker: join (or start) the study, then run trials until it has its trials.

Every worker on every machine runs the same loop against the same storage, so trial numbers never repeat and the
trial count adds up over all of them. Before each trial a worker:
- fails trials whose worker stopped sending heartbeats (killed: SIGKILL, out of memory, a lost machine) and
  enqueues them again, resuming their run folder from its last saved epoch (`tune.retries` times at most);
- runs the enqueued retries first, then new trials while the study has fewer than `tune.trials` (finished,
  pruned, running or waiting).
Ctrl-C saves the trial's run (resumable), fails the trial and enqueues it the same way, so the same command run
again continues the study: finished trials are kept, the interrupted one resumes.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from framework.errors import Interrupted, Issue, Pruned, RecipeError, RunError
from framework.tune import space as sp

LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
TRIAL_FOLDER = "{study}-t{number:03d}"


@dataclass
class Plan:
    """What a worker needs: the base recipe and its overrides, the section, the metric and where things go."""

    recipe: Path
    overrides: list[str]
    spec: object  # framework.recipe.schema.tune.TuneSection
    metric: str
    direction: str  # maximize | minimize
    root: Path  # output.root, where the trials' run folders go
    name: str  # the study
    storage: str  # a journal file path or a database URL
    checkpoint: list[str] = field(default_factory=list)  # overrides that make each run keep its best by `metric`
    epochs: int = 1
    every: int = 1

    @property
    def folder(self) -> Path:
        """Where the study's sheet and best.yaml are written (and its journal, by default)."""
        return self.root / f"{self.name}-tune"

    def trial_overrides(self, params: dict) -> list[str]:
        return list(self.overrides) + self.checkpoint + sp.overrides(params)

    def trials_wanted(self) -> int:
        wanted = self.spec.trials or 10**9
        if self.spec.sampler.name == "grid":
            wanted = min(wanted, math.prod(len(v) for v in sp.grid(self.spec.space).values()))
        return wanted


# ------------------------------------------------------------------------------------------- the worker
def work(plan: Plan, study, run, log=print) -> dict:
    """Run trials of `study` with `run` (framework.api.run) until the study has its trials (or this worker's
    timeout passes); returns how many trials this worker ran, by state."""
    ran: dict[str, int] = {}
    deadline = time.monotonic() + plan.spec.timeout if plan.spec.timeout else None
    worker, failures = _join(study), 0
    while True:
        _fail_stale(study, plan, log)
        if deadline is not None and time.monotonic() > deadline:
            log(f"tune: this worker's timeout ({plan.spec.timeout:g} s) has passed; it starts no new trial")
            break
        if not _wants_more(study, plan):
            break
        study.sampler = make_sampler(plan, seed_offset=worker * 100003 + len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        if _surplus(study, trial, plan):
            study.tell(trial, state=_state("FAIL"))
            break
        state = run_trial(plan, study, trial, run, log)
        ran[state] = ran.get(state, 0) + 1
        failures = failures + 1 if state == "FAIL" else 0
        if failures >= 3:
            raise RunError(Issue(f"three trials in a row failed (the last: trial {trial.number}); the study "
                                 "stops rather than fail every trial.", field="tune",
                                 fix="read the errors above (`recipe tune RECIPE --report` lists them), fix the "
                                     "recipe or the space, and run the same command again."))
    return ran


def run_trial(plan: Plan, study, trial, run, log) -> str:
    """One trial as an ordinary run folder; tells the study how it ended and returns the state's name."""
    params = sp.suggest(trial, plan.spec.space)
    resume = _resumable(trial.user_attrs.get("resume"))
    run_dir = resume or plan.root / TRIAL_FOLDER.format(study=plan.name, number=trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    shown = " ".join(f"{k.split('.')[-1]}={sp.as_yaml(v)}" for k, v in params.items())
    log(f"trial {trial.number}: {shown}" + (f" (resuming {run_dir})" if resume else f" -> {run_dir}"))
    started = time.perf_counter()
    hook = PruneHook(study, trial, plan)
    beat = Heartbeat(trial, plan.spec.stale_after / 5)
    try:
        with beat:
            if resume:
                hook.replay(run_dir)
                run(resume=run_dir, log=log, hooks=[hook])
            else:
                run(plan.recipe, plan.trial_overrides(params), name=run_dir.name, log=log, hooks=[hook])
    except Pruned as e:
        study.tell(trial, state=_state("PRUNED"))
        _said(log, trial, f"pruned at epoch {e.epoch}", e.why, started)
        return "PRUNED"
    except (Interrupted, KeyboardInterrupt) as e:
        _again(study, trial, params, run_dir, "interrupted", plan)
        study.tell(trial, state=_state("FAIL"))
        raise _stopped(trial, run_dir, e) from None
    except Exception as e:  # noqa: BLE001 - a failed trial is recorded and the study goes on
        message = e.format() if isinstance(e, RecipeError) else f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", message[:1000])
        study.tell(trial, state=_state("FAIL"))
        _said(log, trial, "failed", message, started)
        return "FAIL"
    return _tell_finished(study, trial, run_dir, log, started)


def _tell_finished(study, trial, run_dir: Path, log, started: float) -> str:
    from framework.folders import RunFolder

    value = RunFolder(run_dir).summary().get("best_value")
    if value is None or not math.isfinite(value):
        trial.set_user_attr("error", f"the run ended without a finite value of the metric ({value})")
        study.tell(trial, state=_state("FAIL"))
        _said(log, trial, "failed", f"no finite value of the metric ({value})", started)
        return "FAIL"
    study.tell(trial, value)
    best = study.best_trial
    _said(log, trial, "finished", f"{value:.4f} (best so far: {best.value:.4f}, trial {best.number})", started)
    return "COMPLETE"


def _said(log, trial, state: str, what: str, started: float) -> None:
    log(f"trial {trial.number} {state} in {time.perf_counter() - started:.0f} s: {what}")


def _stopped(trial, run_dir: Path, e) -> Interrupted:
    how = e.issues[0].message.split(";")[0] if isinstance(e, Interrupted) else "stopped by Ctrl-C"
    return Interrupted(Issue(f"tuning {how} (trial {trial.number}); its run keeps a resumable checkpoint "
                             f"({run_dir}).", fix="run the same `recipe tune` command again: the study continues, "
                                                  "finished trials are kept and this one resumes."))


def _resumable(run_dir: str | None) -> Path | None:
    """The run folder of the trial this one retries, when it saved an epoch (else the retry starts afresh)."""
    from framework.folders import RunFolder

    if run_dir and RunFolder(Path(run_dir)).checkpoint("last").is_file():
        return Path(run_dir)
    return None


def _again(study, trial, params: dict, run_dir: Path, why: str, plan: Plan) -> None:
    """Enqueue a retry of a trial that did not end by itself (interrupted, or its worker died)."""
    attempt = int(trial.user_attrs.get("attempt", 0)) + 1
    if attempt > plan.spec.retries:
        return
    study.enqueue_trial(sp.to_optuna(plan.spec.space, params), skip_if_exists=False,
                        user_attrs={"retry_of": trial.number, "attempt": attempt, "resume": str(run_dir),
                                    "why_retried": why})


# --------------------------------------------------------------------------------- the study's bookkeeping
def _state(name: str):
    from optuna.trial import TrialState

    return TrialState[name]


def _join(study) -> int:
    """This worker's index among the study's workers (seeds its sampler apart from theirs)."""
    import os
    import platform

    me = f"worker:{platform.node()}:{os.getpid()}:{time.time():.6f}"
    study.set_user_attr(me, time.time())
    workers = sorted((t, k) for k, t in study.user_attrs.items() if k.startswith("worker:"))
    return [k for _, k in workers].index(me)


def _wants_more(study, plan: Plan) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state.name == "WAITING" for t in trials):
        return True  # retries run whatever the count
    return sum(t.state.name in LIVE for t in trials) < plan.trials_wanted()


def _surplus(study, trial, plan: Plan) -> bool:
    """Two workers that asked at the same moment for the last trial: the later number gives way."""
    if "retry_of" in trial.user_attrs:
        return False
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state.name in LIVE]
    if len(before) >= plan.trials_wanted():
        trial.set_user_attr("surplus", True)
        return True
    return False


def _fail_stale(study, plan: Plan, log) -> None:
    """Trials whose worker sent no heartbeat for `tune.stale_after` seconds: failed (by exactly one worker) and
    enqueued again, resuming their run folder."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
        beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - beat <= plan.spec.stale_after:
            continue
        try:
            study.tell(t.number, state=_state("FAIL"))
        except Exception:  # noqa: BLE001 - another worker failed it first
            continue
        log(f"tune: trial {t.number} sent no heartbeat for {now - beat:.0f} s (its worker was killed); "
            "it is failed and tried again")
        params = sp.from_optuna(plan.spec.space, t.params)
        _again(study, t, params, Path(t.user_attrs.get("run_dir", "")), "its worker stopped", plan)


class Heartbeat:
    """Records the time on the trial every few seconds while it runs (a thread), so other workers can tell a
    running trial from one whose worker was killed."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval, self.stop = trial, max(0.5, interval), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="tune-heartbeat")

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial ended meanwhile, or the storage hiccuped: try again
                pass
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class PruneHook:
    """Reports the metric to the trial after each validation and ends the run when the pruner says so."""

    def __init__(self, study, trial, plan: Plan):
        self.study, self.trial, self.plan = study, trial, plan

    def replay(self, run_dir: Path) -> None:
        """A resumed trial reports the validations its run already did (the pruner judges the whole curve)."""
        from framework.engine.metrics import flat_metrics
        from framework.folders import RunFolder

        for record in RunFolder(run_dir).metrics():
            value = flat_metrics(record).get(self.plan.metric)
            if value is not None and math.isfinite(value):
                self.trial.report(value, record["epoch"])

    def after_validation(self, ctx) -> None:
        value = ctx.metrics.get(self.plan.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, ctx.epoch)
        if ctx.epoch < self.plan.epochs and self.trial.should_prune():
            raise Pruned(ctx.epoch, self._why(value, ctx.epoch))

    def _why(self, value: float, epoch: int) -> str:
        """In the median pruner's own terms: this trial's best value so far against the median of the finished
        trials' values at this epoch."""
        import numpy as np

        said = f"{self.plan.metric} {value:.4f} at epoch {epoch}"
        if self.plan.spec.pruner.name != "median":
            return f"{said}: the {self.plan.spec.pruner.name} pruner stopped it"
        mine = list(self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),)))
        mine = [t for t in mine if t.number == self.trial.number]
        seen = list(mine[0].intermediate_values.values()) if mine else [value]
        others = [t.intermediate_values[epoch] for t in self.study.get_trials(deepcopy=False,
                  states=(_state("COMPLETE"),)) if epoch in t.intermediate_values]
        if not others:
            return f"{said}: the median pruner stopped it"
        best = max(seen) if self.plan.direction == "maximize" else min(seen)
        worse = "below" if self.plan.direction == "maximize" else "above"
        return (f"its best {self.plan.metric} so far, {best:.4f}, is {worse} the median {float(np.median(others)):.4f} "
                f"of {len(others)} finished trial(s) at epoch {epoch}")


# ------------------------------------------------------------------------------ sampler, pruner, storage
def make_sampler(plan: Plan, seed_offset: int = 0):
    import optuna

    s = plan.spec.sampler
    seed = None if s.seed is None else (s.seed + seed_offset) % 2**32
    if s.name == "grid":
        return optuna.samplers.GridSampler(sp.grid(plan.spec.space), seed=seed)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(plan: Plan):
    import optuna

    p = plan.spec.pruner
    if p.name == "median":
        # Optuna judges steps >= n_warmup_steps; epochs count from 1, so epochs 1..warmup_epochs are never judged
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs + 1)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=plan.every, max_resource=plan.epochs)
    return optuna.pruners.NopPruner()
