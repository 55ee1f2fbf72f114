"""Calibration to an accuracy budget: the profile with the fewest attention FLOPs within ``budget`` points of dense.

Calibration measures each head's recall per sparse category; thresholds turn those statistics into categories
(:func:`blindsight.categories.decide_categories`). A fixed threshold (0.95) is a guess. :func:`tune` searches the
thresholds (per category, then per layer) against what the user cares about: exact-match accuracy on held-out
question-answer examples, every candidate profile run through BlindSight itself (``attach``, or compiled) and
compared with the dense model on the same examples. Candidates are made from the stored statistics alone, never
by running the dense model again. DESIGN §10 has the search; in short:

- a candidate is *feasible* when it loses at most ``budget`` accuracy points against dense on the N held-out
  examples: at most ``floor(budget * N / 100)`` examples, net;
- the order: the profile as given; one threshold for all categories; then each category's own threshold
  (sink, intra, intra_sink); then each layer's (layers that could save the most first). Along each of these
  *ladders* (the distinct recall values, as categories change) the cheapest point is tried first, then the
  ladder is bisected for its cheapest feasible point, starting from the best profile found so far;
- a candidate is evaluated at most once (memoized on its categories), at most ``max_evals`` candidates in all,
  and an evaluation stops as soon as it cannot be feasible any more (its misses exceed what the budget allows);
  feasible candidates are always scored on every example, so every accuracy reported is exact;
- the result is the feasible candidate with the fewest attention FLOPs on the held-out prompts; held-out
  accuracy is then optimistic (the best of many tries): pass ``test`` examples (a third split) for an unbiased
  one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .attention import attach, detach, is_attached
from .categories import (
    DECISION_ORDER,
    SPARSE_CATEGORIES,
    Category,
    aggregate_recall,
    layer_thresholds,
    thresholds_setting,
)
from .fx import blindsight_backend
from .layout import Layout
from .profile import Profile
from .progress import StatusBar
from .scoring import Example, accuracy, category_pairs, compiled_language_model
from .values import is_int, is_number

__all__ = ["TuneConfig", "Trial", "TuneResult", "HoldoutError", "tune", "search", "SEARCHES", "PATHS", "SEARCH_ORDER",
           "format_tune_record", "points"]

SEARCHES = ("bisect", "full")
PATHS = ("eager", "compiled")
SEARCH_ORDER = "given profile; one threshold for all categories; per category (sink, intra, intra_sink); per layer"


class HoldoutError(ValueError):
    """The held-out (or test) examples cannot be tuned on: none, none with an image, or none the dense model gets
    right (a file made for another model?)."""


@dataclass(frozen=True)
class TuneConfig:
    """How :func:`tune` searches (validated; ``dataclasses.replace`` or keyword overrides of :func:`tune`).

    - ``budget``: accuracy points (percent of the held-out examples) the chosen profile may lose against dense,
      in [0, 100];
    - ``per_layer``: after the per-category thresholds, search each layer's own (kept only where they pay);
    - ``search``: ``bisect`` (the cheapest point of each ladder, then bisection) or ``full`` (every point of
      every ladder, each scored on every example: the whole frontier, many more evaluations);
    - ``max_evals``: candidate evaluations at most (the dense reference not counted);
    - ``early_stop``: stop scoring a candidate once it cannot meet the budget (``bisect`` only);
    - ``path``: ``eager`` (``blindsight.attach``: no compilation per candidate) or ``compiled`` (the language
      model compiled with ``blindsight_backend`` per candidate; resets Dynamo before each).
    """

    budget: float = 1.0
    per_layer: bool = True
    search: str = "bisect"
    max_evals: int = 64
    early_stop: bool = True
    path: str = "eager"

    def __post_init__(self):
        if not is_number(self.budget) or not 0.0 <= self.budget <= 100.0:  # NaN fails too
            raise ValueError(f"budget must be accuracy points in [0, 100], got {self.budget!r}")
        for name in ("per_layer", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {list(SEARCHES)}, got {self.search!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got {self.path!r}")
        if not is_int(self.max_evals) or self.max_evals < 1:
            raise ValueError(f"max_evals must be a positive int, got {self.max_evals!r}")


@dataclass(frozen=True)
class Trial:
    """One candidate profile, scored on the held-out examples."""

    number: int  # evaluation order, from 1
    stage: str  # "given", "global", a category's name, or "layer L <category>"
    thresholds: tuple[tuple[float, ...], ...]  # per layer, in SPARSE_CATEGORIES order
    categories: tuple[tuple[Category, ...], ...]
    attention_flop_reduction: float  # on the held-out prompts
    hits: int  # right answers among the examples scored
    scored: int  # examples scored: fewer than ``total`` when the evaluation stopped early
    total: int
    feasible: bool

    @property
    def complete(self) -> bool:
        return self.scored == self.total

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy, or None for an evaluation that stopped early."""
        return self.hits / self.total if self.complete else None

    @property
    def accuracy_bound(self) -> float:
        """Held-out accuracy if complete, else the most it could have reached."""
        return (self.hits + self.total - self.scored) / self.total

    def threshold_setting(self) -> dict | list[dict]:
        """The thresholds as a profile stores them (one mapping, or one per layer)."""
        return thresholds_setting([dict(zip(SPARSE_CATEGORIES, t)) for t in self.thresholds])

    def counts(self) -> dict[str, int]:
        return {c.json_name: sum(layer.count(c) for layer in self.categories) for c in Category}

    def to_dict(self) -> dict:
        return {"number": self.number, "stage": self.stage, "thresholds": self.threshold_setting(),
                "heads": self.counts(), "attention_flop_reduction": self.attention_flop_reduction,
                "accuracy": self.accuracy, "accuracy_at_most": self.accuracy_bound, "hits": self.hits,
                "scored": self.scored, "feasible": self.feasible}


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found. ``chosen`` is None when no candidate was feasible (the profile is then all
    DENSE, dense by definition)."""

    profile: Profile
    chosen: Trial | None
    given: Trial | None
    trials: tuple[Trial, ...]
    dense_accuracy: float
    holdout_size: int
    config: TuneConfig
    stopped: str | None = None  # "max_evals" when the search ran out of evaluations
    seconds: float = 0.0
    test: dict | None = None

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    @property
    def accuracy(self) -> float:
        """Held-out accuracy of the chosen profile."""
        return self.dense_accuracy if self.chosen is None else self.chosen.accuracy

    @property
    def attention_flop_reduction(self) -> float:
        return 0.0 if self.chosen is None else self.chosen.attention_flop_reduction

    def to_dict(self) -> dict:
        return {"budget": self.config.budget, "holdout_prompts": self.holdout_size,
                "accuracy_dense": self.dense_accuracy, "accuracy_chosen": self.accuracy,
                "attention_flop_reduction": self.attention_flop_reduction,
                "chosen": None if self.chosen is None else self.chosen.to_dict(),
                "given": None if self.given is None else self.given.to_dict(),
                "evaluations": self.evaluations, "stopped": self.stopped, "seconds": self.seconds,
                "test": self.test, "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
                "categories": [[c.json_name for c in layer] for layer in self.profile.categories],
                "trials": [t.to_dict() for t in self.trials]}


# ---- the search: candidates from the statistics, scored by a callback ----------------------------------------------

Categories = tuple[tuple[Category, ...], ...]
# score(categories, max_misses or None, trial number, stage) -> (hits, examples scored)
Scorer = Callable[[Categories, "int | None", int, str], "tuple[int, int]"]


def decide_array(agg: torch.Tensor, thresholds: torch.Tensor, dense: torch.Tensor) -> Categories:
    """:func:`~blindsight.categories.decide_categories` on tensors: ``agg [L, H, 3]``, ``thresholds [L, 3]`` (in
    SPARSE_CATEGORIES order), ``dense [L]`` (layers forced DENSE)."""
    passes = agg >= thresholds[:, None, :]  # NaN passes nothing
    out = torch.zeros(agg.shape[:2], dtype=torch.long)  # DENSE
    for c in reversed(DECISION_ORDER):  # the cheapest passing category is written last
        out = torch.where(passes[..., SPARSE_CATEGORIES.index(c)], int(c), out)
    out[dense] = int(Category.DENSE)
    return tuple(tuple(Category(v) for v in layer) for layer in out.tolist())


def ladder(agg: torch.Tensor, thresholds: torch.Tensor, cells: torch.Tensor, dense: torch.Tensor,
           current: Categories) -> list[tuple[torch.Tensor, Categories]]:
    """The candidates reached by lowering the thresholds of ``cells`` (``[L, 3]`` bool) from ``thresholds``: one
    per distinct category assignment, most expensive first. Each is ``(thresholds, categories)`` with thresholds
    in [0, 1]; a threshold is a recall value itself, so the head it admits passes with equality."""
    below = cells[:, None, :] & (agg < thresholds[:, None, :])
    values = sorted({min(1.0, max(0.0, v)) for v in agg[below].tolist() if not math.isnan(v)}, reverse=True)
    out, seen = [], {current}
    for v in values:
        lowered = torch.where(cells, torch.clamp(thresholds, max=v), thresholds).clamp(max=1.0)
        cats = decide_array(agg, lowered, dense)
        if cats not in seen:
            seen.add(cats)
            out.append((lowered, cats))
    return out


class _Search:
    """The state of one search: trials in order, the memo, the best feasible candidate so far."""

    def __init__(self, agg, dense, pairs: dict, score: Scorer, config: TuneConfig, total: int, dense_hits: int,
                 on_trial=None):
        self.agg, self.dense, self.score, self.config, self.total = agg, dense, score, config, total
        self.pairs, self.on_trial = pairs, on_trial
        self.min_hits = dense_hits - math.floor(config.budget * total / 100 + 1e-9)
        self.trials: list[Trial] = []
        self.memo: dict[Categories, Trial] = {}
        self.stopped: str | None = None
        L, H = agg.shape[:2]
        self.dense_cost = L * H * pairs[Category.DENSE]
        self.anchor = (torch.full((L, len(SPARSE_CATEGORIES)), math.inf, dtype=torch.float64),
                       tuple(tuple([Category.DENSE] * H) for _ in range(L)))

    def reduction(self, cats: Categories) -> float:
        cost = sum(self.pairs[c] for layer in cats for c in layer)
        return 1 - cost / self.dense_cost if self.dense_cost else 0.0

    def run(self, thresholds: torch.Tensor, cats: Categories, stage: str) -> Trial | None:
        """The candidate's trial (scored now, or remembered); None once ``max_evals`` are spent."""
        if cats in self.memo:
            return self.memo[cats]
        if len(self.trials) >= self.config.max_evals:
            self.stopped = "max_evals"
            return None
        full = self.config.search == "full" or not self.config.early_stop
        number = len(self.trials) + 1
        hits, scored = self.score(cats, None if full else self.total - self.min_hits, number, stage)
        trial = Trial(number, stage, tuple(tuple(float(x) for x in row) for row in thresholds.tolist()), cats,
                      self.reduction(cats), hits, scored, self.total, scored == self.total and hits >= self.min_hits)
        self.trials.append(trial)
        self.memo[cats] = trial
        if self.on_trial is not None:
            self.on_trial(trial, self.best())
        return trial

    def best(self) -> Trial | None:
        feasible = [t for t in self.trials if t.feasible]
        return min(feasible, key=lambda t: (-t.attention_flop_reduction, -t.hits, t.number)) if feasible else None

    def current(self) -> tuple[torch.Tensor, Categories]:
        best = self.best()
        if best is None:
            return self.anchor
        return torch.tensor(best.thresholds, dtype=torch.float64), best.categories

    def walk(self, cells: torch.Tensor, stage: str) -> None:
        """Lower the thresholds of ``cells`` from the best profile so far: the cheapest point of the ladder
        first, then bisection for the cheapest feasible one (``full``: every point)."""
        thresholds, cats = self.current()
        points = ladder(self.agg, thresholds, cells, self.dense, cats)
        if not points:
            return
        if self.config.search == "full":
            for t, c in points:
                if self.run(t, c, stage) is None:
                    return
            return
        last = self.run(*points[-1], stage)
        if last is None or last.feasible:
            return
        lo, hi = -1, len(points) - 1  # lo: feasible (the starting point), hi: infeasible
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = self.run(*points[mid], stage)
            if trial is None:
                return
            lo, hi = (mid, hi) if trial.feasible else (lo, mid)

    def layer_order(self) -> list[int]:
        """Layers by what they could still save (their heads' cost now minus their cheapest), most first."""
        _, cats = self.current()
        cheapest = min(self.pairs[c] for c in SPARSE_CATEGORIES)
        room = [sum(self.pairs[c] - cheapest for c in layer) for layer in cats]
        return sorted(range(len(cats)), key=lambda layer: (-room[layer], layer))


def search(agg: torch.Tensor, pairs: dict, score: Scorer, config: TuneConfig, total: int, dense_hits: int,
           given: tuple[torch.Tensor, Categories] | None = None, dense_layers: Sequence[int] = (),
           on_trial=None) -> _Search:
    """Run the search (the module docstring's order) on aggregated recall ``agg [L, H, 3]``; ``pairs``: kept pairs
    of one head per category over the held-out prompts; ``score``: the evaluation of a candidate. Returns the
    search's state (``trials``, ``best()``, ``stopped``)."""
    L = agg.shape[0]
    dense = torch.zeros(L, dtype=torch.bool)
    dense[list(dense_layers)] = True
    s = _Search(agg.double(), dense, pairs, score, config, total, dense_hits, on_trial)
    if given is not None:
        s.run(given[0], given[1], "given")
    everything = torch.ones(L, len(SPARSE_CATEGORIES), dtype=torch.bool)
    s.walk(everything, "global")
    for c in DECISION_ORDER:
        column = torch.zeros_like(everything)
        column[:, SPARSE_CATEGORIES.index(c)] = True
        s.walk(column, c.json_name)
    if config.per_layer and L > 1:
        for layer in s.layer_order():
            for c in DECISION_ORDER:
                cell = torch.zeros_like(everything)
                cell[layer, SPARSE_CATEGORIES.index(c)] = True
                s.walk(cell, f"layer {layer} {c.json_name}")
    return s


# ---- tune: the search against the model ----------------------------------------------------------------------------

def _scorer(model, examples: list[Example], profile: Profile, config: TuneConfig, bar: StatusBar) -> Scorer:
    template = profile.template

    def score(cats: Categories, max_misses: int | None, number: int, stage: str) -> tuple[int, int]:
        candidate = Profile(profile.model, cats, {"source": f"blindsight tune candidate {number}"})
        bar.show(desc=f"tune: candidate {number} ({stage})")
        hits = _accuracy(model, examples, candidate, config.path, template, max_misses, lambda hit: bar.update())
        return sum(hits), len(hits)

    return score


def _accuracy(model, examples, profile: Profile, path: str, template, max_misses=None, on_example=None) -> list[bool]:
    """Exact match of ``profile`` run through BlindSight on ``path``, every call sparse (``only_if_faster=False``:
    it is sparse attention's accuracy in question, whatever the cost model would pick at these lengths)."""
    if path == "eager":
        attach(model, profile, only_if_faster=False)
        try:
            return accuracy(model, examples, template, max_misses=max_misses, on_example=on_example)
        finally:
            detach(model)
    torch._dynamo.reset()  # a new profile is a new backend: compile afresh rather than pile up recompiles
    with compiled_language_model(model, blindsight_backend(profile, only_if_faster=False)):
        return accuracy(model, examples, template, max_misses=max_misses, on_example=on_example)


def _status(trial: Trial, best: Trial | None, dense: float) -> str:
    now = (f"#{trial.number} -{100 * trial.attention_flop_reduction:.1f}% FLOPs: "
           + (f"{100 * trial.accuracy:.1f}%" if trial.complete else f"<= {100 * trial.accuracy_bound:.1f}% (stopped)"))
    if best is None:
        return f"{now}; best: none within budget yet (dense {100 * dense:.1f}%)"
    return (f"{now}; best -{100 * best.attention_flop_reduction:.1f}% FLOPs at {100 * best.accuracy:.1f}% "
            f"(dense {100 * dense:.1f}%)")


def tune(model, profile: Profile, holdout: Sequence[Example], config: TuneConfig | None = None, *,
         test: Sequence[Example] | None = None, progress: bool = True, holdout_source: str = "held-out examples",
         test_source: str = "test examples", **overrides) -> TuneResult:
    """The profile with the fewest attention FLOPs whose held-out accuracy is within ``budget`` points of dense.

    ``model``: a transformers VLM loaded with ``attn_implementation="sdpa"``, neither attached nor compiled.
    ``profile``: a calibrated profile (its per-prompt statistics and settings: quantile, forced-dense layers).
    ``holdout``: :class:`~blindsight.scoring.Example` s (``blindsight.tools.evaluate.make_examples`` /
    ``jsonl_examples`` make them), apart from the calibration prompts. ``config`` / ``overrides``:
    :class:`TuneConfig` (``budget=1.0`` ...). ``test``: examples of a third split, scored dense, as given and
    as chosen once the search is over. The returned profile's ``calibration["tune"]`` records how it was chosen.
    """
    t0 = time.time()
    config = replace(config or TuneConfig(), **overrides) if overrides else (config or TuneConfig())
    holdout = list(holdout)
    _check_inputs(model, profile, holdout, test)
    template = profile.template
    given = profile.decide()  # the profile as its own settings decide it
    bar = StatusBar(progress, "tune: dense", unit="prompt")
    try:
        dense_hits = sum(accuracy(model, holdout, on_example=lambda hit: bar.update()))
        if dense_hits == 0:
            raise HoldoutError(f"the dense model answers none of the {len(holdout)} held-out examples right, so "
                               "there is no accuracy to keep: are they made for another model (or another task)?")
        total = len(holdout)
        dense_accuracy = dense_hits / total
        agg = aggregate_recall(_recalls(profile), profile.calibration.get("quantile", 0.0))
        layers = profile.model.num_layers
        given_thresholds = torch.tensor(
            [[t[c] for c in SPARSE_CATEGORIES] for t in _layer_thresholds(given)], dtype=torch.float64)
        s = search(agg, category_pairs(holdout, template), _scorer(model, holdout, profile, config, bar), config,
                   total, dense_hits, (given_thresholds, given.categories), given.calibration["dense_layers"],
                   on_trial=lambda trial, best: bar.show(status=_status(trial, best, dense_accuracy)))
    finally:
        bar.close()
    chosen = s.best()
    if chosen is None:
        tuned = given.decide(dense_layers=range(layers))
    else:
        tuned = given.decide(thresholds=chosen.threshold_setting())
        if tuned.categories != chosen.categories:  # the search's decision and the profile's must agree
            raise RuntimeError("tune: the chosen thresholds re-decide to other categories than the ones scored")
    given_trial = next((t for t in s.trials if t.stage == "given"), None)
    test_record = None
    if test:
        test_record = _score_test(model, list(test), given, tuned, chosen is None, config.path, test_source, progress)
    result = TuneResult(tuned, chosen, given_trial, tuple(s.trials), dense_accuracy, total, config, s.stopped,
                        time.time() - t0, test_record)
    cal = dict(tuned.calibration, tune=_record(result, holdout_source, profile.calibration.get("quantile", 0.0)))
    return replace(result, profile=Profile(tuned.model, tuned.categories, cal, tuned.scores))


def _layer_thresholds(profile: Profile) -> list[dict]:
    return layer_thresholds(profile.calibration["thresholds"], profile.model.num_layers)


def _recalls(profile: Profile) -> torch.Tensor:
    return torch.tensor([p["recall"] for p in profile.scores["prompts"]], dtype=torch.float64)


def _check_inputs(model, profile: Profile, holdout: list, test) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"tune needs a blindsight.Profile, got {type(profile).__name__}")
    if not (profile.scores and profile.scores.get("prompts")):
        raise ValueError("tune searches thresholds over calibration statistics, and this profile has none "
                         "(hand-made?): calibrate the model first (blindsight.calibrate)")
    if profile.template is None:
        raise ValueError("the profile has no image template; calibrate the model to get one")
    profile.check_model(model)
    if is_attached(model):
        raise ValueError("tune needs the model as loaded (its dense accuracy is the reference): blindsight.detach it "
                         "first")
    for name, examples in (("holdout", holdout), ("test", test)):
        if examples is None:
            continue
        if not examples:
            raise HoldoutError(f"tune needs at least one {name} example")
        if not all(isinstance(e, Example) for e in examples):
            raise TypeError(f"{name} examples must be blindsight.scoring.Example (see "
                            "blindsight.tools.evaluate.make_examples)")
    template = profile.template
    if not any(int(Layout.from_input_ids(e.inputs["input_ids"], template).num_images.sum()) for e in holdout):
        raise HoldoutError("none of the held-out examples has an image: there is no image attention to tune")


def _score_test(model, test: list[Example], given: Profile, tuned: Profile, tuned_is_dense: bool, path: str,
                source: str, progress: bool) -> dict:
    """Accuracy on a third split: dense, the given profile and the chosen one (every example scored)."""
    bar = StatusBar(progress, "tune: test split", unit="prompt")
    try:
        step = lambda hit: bar.update()  # noqa: E731
        dense = sum(accuracy(model, test, on_example=step)) / len(test)
        acc_given = sum(_accuracy(model, test, given, path, given.template, on_example=step)) / len(test)
        acc_tuned = dense if tuned_is_dense else sum(_accuracy(model, test, tuned, path, tuned.template,
                                                               on_example=step)) / len(test)
    finally:
        bar.close()
    return {"source": source, "prompts": len(test), "accuracy_dense": dense, "accuracy_given": acc_given,
            "accuracy_chosen": acc_tuned}


def _record(r: TuneResult, source: str, quantile: float) -> dict:
    """The profile's ``calibration.tune`` block: how it was chosen."""
    cfg = r.config
    return {
        "budget": cfg.budget,
        "holdout": {"source": source, "prompts": r.holdout_size},
        "accuracy_dense": r.dense_accuracy,
        "accuracy_chosen": r.accuracy,
        "attention_flop_reduction": r.attention_flop_reduction,
        "chosen_stage": "dense (no candidate within budget)" if r.chosen is None else r.chosen.stage,
        "given": None if r.given is None else {"thresholds": r.given.threshold_setting(),
                                               "accuracy": r.given.accuracy,
                                               "accuracy_at_most": r.given.accuracy_bound,
                                               "attention_flop_reduction": r.given.attention_flop_reduction},
        "evaluations": r.evaluations,
        "stopped": r.stopped,
        "search": {"method": cfg.search, "order": SEARCH_ORDER, "per_layer": cfg.per_layer,
                   "max_evals": cfg.max_evals, "early_stop": cfg.early_stop, "path": cfg.path, "quantile": quantile},
        "test": r.test,
        "seconds": round(r.seconds, 1),
    }


def points(budget: float) -> str:
    """``1 point``, ``0.5 points``: a budget in words."""
    return f"{budget:g} point{'' if budget == 1 else 's'}"


def format_tune_record(record: dict) -> list[str]:
    """Lines that say how a tuned profile was chosen (its ``calibration.tune`` block), for ``blindsight inspect``.
    Missing fields read as '?' rather than fail: the block is a record, not a setting."""
    def pct(key, d=record):
        v = d.get(key) if isinstance(d, dict) else None
        return f"{100 * v:.1f}%" if is_number(v) else "?"

    holdout = record.get("holdout") if isinstance(record.get("holdout"), dict) else {}
    search_ = record.get("search") if isinstance(record.get("search"), dict) else {}
    lines = [f"  tuned (blindsight tune): budget {record.get('budget', '?')} points on {holdout.get('prompts', '?')} "
             f"held-out prompts ({holdout.get('source', '?')})",
             f"    held-out accuracy: dense {pct('accuracy_dense')}, chosen {pct('accuracy_chosen')}; attention "
             f"FLOPs -{pct('attention_flop_reduction')} on those prompts (chosen at: "
             f"{record.get('chosen_stage', '?')})"]
    given = record.get("given")
    if isinstance(given, dict):
        acc = pct("accuracy", given) if given.get("accuracy") is not None else f"<= {pct('accuracy_at_most', given)}"
        lines.append(f"    the given profile (thresholds {given.get('thresholds', '?')}): {acc}, attention FLOPs "
                     f"-{pct('attention_flop_reduction', given)}")
    lines.append(f"    search: {search_.get('method', '?')}, {record.get('evaluations', '?')} evaluations (at most "
                 f"{search_.get('max_evals', '?')}{', stopped there' if record.get('stopped') else ''}), "
                 f"per layer {search_.get('per_layer', '?')}, early stop {search_.get('early_stop', '?')}, "
                 f"{search_.get('path', '?')} path, quantile {search_.get('quantile', '?')}; "
                 f"{record.get('seconds', '?')} s")
    test = record.get("test")
    if isinstance(test, dict):
        lines.append(f"    test split ({test.get('source', '?')}, {test.get('prompts', '?')} prompts): dense "
                     f"{pct('accuracy_dense', test)}, given {pct('accuracy_given', test)}, chosen "
                     f"{pct('accuracy_chosen', test)}")
    else:
        lines.append("    test split: none (the held-out accuracy of the chosen profile is optimistic)")
    return lines
