"""A search that survives interruption: trials asked and told through a journal on disk.

Every ask and tell is appended to the search's journal (``evomerge.search.journal``) before it takes
effect for the caller. Resuming rebuilds the optimizer from its seed and replays the journal's events
in their recorded order, which reproduces its state exactly (every optimizer is deterministic given
its seed and the order of calls); trials that were asked but never told are handed out again first.
So an interrupted-then-resumed search evaluates exactly the candidates an uninterrupted one would,
none twice.

Beside the journal, every told trial is also written to an Optuna study on disk
(``evomerge.search.optuna_view``), so the campaign opens in optuna-dashboard or ``optuna.load_study``;
it is a view, not the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import first_line
from evomerge.objectives import Objective
from evomerge.recipe import Recipe, parse_recipe, recipe_key
from evomerge.search.fidelity import Fidelity
from evomerge.search.journal import JOURNAL, Journal, JournalError
from evomerge.search.optimizers import make_optimizer
from evomerge.search.optuna_view import OptunaView
from evomerge.search.pareto import front_indices, hypervolume, pareto_ranks
from evomerge.search.space import Genome

if TYPE_CHECKING:
    from evomerge.search.racing import Racing

TrialStatus = Literal["running", "done", "failed"]


@dataclass
class Trial:
    id: int
    unit: list[float] | None  # the optimizer's point in [0, 1]^d (None: a baseline, outside the optimizer)
    genome: list[float] | None  # the same point in the genome's box
    recipe: Recipe
    status: TrialStatus = "running"
    replicate: int = 0  # k > 0: the k-th re-evaluation of the same genes, with merge seed + k
    values: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: Multi-fidelity: the rung evaluated next while running, the rung of ``values`` once told
    #: (``Fidelity.top`` = the full evaluation; None without multi-fidelity).
    rung: int | None = None
    top: int | None = None  # the full evaluation's rung (None without multi-fidelity or racing)
    estimate: list[float] | None = None  # racing: the anchors' estimate (raced trials only)
    documents: int = 0  # documents scored for this trial, over all its rungs
    baseline: str | None = None  # a recipe outside the optimizer: a hand baseline's or an expert's label
    expert: str | None = None  # an expert scored alone, as its own weights (a baseline outside the space)
    seeded: bool = False  # a known point enqueued before the search (uniform average, expert alone, recipe)
    label: str | None = None  # what a seeded point is ("expert-add alone", "uniform average", ...)

    @property
    def kind(self) -> str:
        """What the trial is: ``expert alone`` (an expert's own weights), ``hand baseline``, ``seed`` (a
        known point of the space: the experts' average, the space's nearest point to an expert
        alone, a hand recipe) or ``searched``."""
        if self.expert or (self.seeded and self.label and self.label.endswith(" alone") and " in " not in self.label):
            return "expert alone"
        if self.baseline:
            return "hand baseline"
        return "seed" if self.seeded else "searched"

    @property
    def full(self) -> bool:
        """Whether ``values`` come from the full evaluation (what the front, hypervolume and export use)."""
        return self.rung is None or self.rung >= self.top


@dataclass(frozen=True)
class FrontSnapshot:
    """The search's Pareto state at one moment, as published to tracking.

    ``ranks``: finished trial id -> non-domination rank, 1 = the front; ``front``: those of rank 1;
    ``told``/``failed``: results so far; ``hypervolume``: None until a reference point exists."""

    ranks: dict[int, int]
    front: list[int]
    told: int
    failed: int
    hypervolume: float | None


class Search:
    """A genome, an optimizer and a journal in ``directory``.

    ``writable=False`` opens an existing journal to read (status, pareto, export): nothing is
    written, not even the Optuna view, so it works on a read-only campaign directory."""

    def __init__(
        self,
        genome: Genome,
        optimizer: str,
        objectives: Sequence[Objective],
        seed: int,
        directory: str | Path,
        options: dict | None = None,
        writable: bool = True,
        fidelity: Fidelity | None = None,
        racing: Racing | None = None,
    ):
        self.genome, self.objectives = genome, list(objectives)
        self.fidelity, self.racing = fidelity, racing
        #: racing: the last ``anchors`` event (``anchors``/``weights``: objective -> task -> list; ``fitted``)
        self.anchors: dict | None = None
        self.directory = Path(directory)
        self.writable = writable
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / JOURNAL
        self.journal = Journal(self.path)
        self.header = {
            "event": "header",
            "optimizer": optimizer,
            "seed": seed,
            "options": options or {},
            "genes": [g.name for g in genome.genes],
            "objectives": [o.model_dump() for o in self.objectives],
        }
        if fidelity is not None:
            self.header["fidelity"] = {"rungs": list(fidelity.rungs), "promote": fidelity.promote}
        if racing is not None:
            self.header["racing"] = racing.header()
        self.optimizer = make_optimizer(
            optimizer,
            genome.dimension,
            self.objectives,
            seed,
            categories=[g.choices for g in genome.genes],
            **(options or {}),
        )
        lo, hi = genome.bounds
        self._lo, self._span = lo, [b - a for a, b in zip(lo, hi)]
        self.trials: list[Trial] = []
        self._scored: dict[str, int] = {}  # recipe key -> the first trial that scored it in full
        self.full_order: list[int] = []  # the trials whose results in full were told, in the journal's order
        self._flying: dict[str, int] = {}  # recipe key -> the trial scoring it now (``park``)
        self._parked: dict[int, list[int]] = {}  # that trial -> the trials waiting for its result
        self._pending: list[int] = []
        self._seeds_left = 0  # enqueued points not asked yet: evaluated in full, never on a rung
        self._seed_labels: list[str | None] = []  # their labels, in the order they are asked
        self._rungs: list[list[tuple[int, list[float]]]] = [[] for _ in (fidelity.rungs if fidelity else ())]
        if self.journal.written:
            self._replay()
        elif writable:
            self.journal.append(self.header)
        self.view = OptunaView(self.directory, genome, self.objectives)
        if writable:
            self.view.open(self.trials)

    # -- replay -----------------------------------------------------------------------------------
    def _replay(self) -> None:
        for line, event in self.journal.read(self.header):
            problem = self._replay_event(event)
            if problem:
                raise self.journal.fail(line, problem)
        if self.writable:
            self.journal.mend()
        # promoted trials first (as they are handed out before new ones), then in the order asked
        running = [t for t in self.trials if t.status == "running"]
        self._pending = [t.id for t in sorted(running, key=lambda t: -(t.rung or 0))]

    def _replay_event(self, event: dict) -> str | None:
        """Apply one journal event (its shape checked by the journal); what makes it wrong for this
        search at this point of the replay, or None."""
        kind, dim = event["event"], self.genome.dimension
        if kind in ("enqueue", "ask") and len(event["unit"]) != dim:
            return f"{kind} event: 'unit' has {len(event['unit'])} values; the genome has {dim} genes"
        if kind in ("ask", "baseline") and event["id"] != len(self.trials):
            return f"{kind} event for trial {event['id']}; the next trial is {len(self.trials)}"
        if kind in ("promote", "tell"):
            problem = self._result_problem(kind, event)
            if problem:
                return problem
        if kind == "anchors":
            return self._anchors_problem(event) or self._apply_anchors(event)
        if kind == "enqueue":
            self.optimizer.enqueue(event["unit"])
            self._seeds_left += 1
            self._seed_labels.append(event.get("label"))
        elif kind == "ask":
            unit, replicate = self.optimizer.ask_replicate()
            if unit != event["unit"] or replicate != event.get("replicate", 0):
                return f"trial {event['id']} does not replay (the optimizer's library version changed?)"
            self._new_trial(unit, replicate)
        elif kind == "baseline":
            from evomerge.recipe import RecipeError

            try:
                self._new_baseline(event["recipe"], event["label"], event.get("expert"))
            except RecipeError as e:
                return f"baseline event: not a recipe: {first_line(e)}"
        elif kind == "promote":
            self._apply_promote(event["id"], event["values"], event.get("documents", 0))
        else:
            self._apply_tell(event["id"], event["values"], event.get("info", {}))
        return None

    def _result_problem(self, kind: str, event: dict) -> str | None:
        """Why a promote or tell event cannot apply here: an unknown or finished trial, a count of
        values other than the objectives', a promotion without (or beyond) multi-fidelity; or None."""
        trial_id, values = event["id"], event["values"]
        if trial_id >= len(self.trials):
            return f"{kind} event for trial {trial_id}, which was never asked ({len(self.trials)} so far)"
        trial = self.trials[trial_id]
        if trial.status != "running":
            return f"{kind} event for trial {trial_id}, which was already told"
        if values is not None and len(values) != len(self.objectives):
            return f"{kind} event: 'values' has {len(values)} values; the search has {len(self.objectives)} objectives"
        original = (event.get("info") or {}).get("repeat_of") if kind == "tell" else None
        if original is not None and (original >= len(self.trials) or self.trials[original].status != "done"):
            return f"tell event for trial {trial_id}: 'repeat_of' names trial {original}, which has no result"
        if kind == "promote" and (trial.rung is None or trial.top is None or trial.rung >= trial.top):
            where = (
                "this search has no multi-fidelity nor racing"
                if self.fidelity is None and self.racing is None
                else "it is at the full evaluation"
            )
            return f"promote event for trial {trial_id}, which cannot be promoted ({where})"
        return None

    def _anchors_problem(self, event: dict) -> str | None:
        """Why an anchors event cannot apply here (no racing, other objectives, a weight per anchor
        missing, anchors other than the first fit's), or None."""
        if self.racing is None:
            return "anchors event, but this search does not race candidates on anchor documents"
        anchors, weights = event["anchors"], event["weights"]
        names = {o.name for o in self.objectives}
        if not set(anchors) <= names or set(weights) != set(anchors):
            return f"anchors event: objectives {sorted(anchors)}; the search has {sorted(names)}"
        for o, tasks in anchors.items():
            if set(weights[o]) != set(tasks) or any(len(weights[o][t]) != len(ids) for t, ids in tasks.items()):
                return f"anchors event: objective {o!r} has not one weight per anchor document"
        if self.anchors is not None and self.anchors["anchors"] != anchors:
            return "anchors event: other anchor documents than the first fit's (anchors are fixed once chosen)"
        return None

    def _apply_anchors(self, event: dict) -> None:
        self.anchors = {k: event[k] for k in ("anchors", "weights", "fitted")}

    # -- ask / tell -------------------------------------------------------------------------------
    def _new_trial(self, unit: list[float], replicate: int = 0) -> Trial:
        genome = [a + u * s for a, u, s in zip(self._lo, unit, self._span)]
        recipe = self.genome.decode(genome)
        if replicate:
            recipe.evomerge.seed += replicate
        trial = Trial(len(self.trials), unit, genome, recipe, replicate=replicate)
        trial.seeded = self._seeds_left > 0
        if trial.seeded and self._seed_labels:
            trial.label = self._seed_labels.pop(0)
        if self.fidelity is not None:
            trial.rung, trial.top = (self.fidelity.top if trial.seeded else 0), self.fidelity.top
        elif self.racing is not None and self.anchors is not None and not trial.seeded:
            trial.rung, trial.top = 0, 1  # raced: the anchors first, then perhaps in full
        self._seeds_left = max(0, self._seeds_left - 1)
        self.trials.append(trial)
        return trial

    def _new_baseline(self, recipe: dict, label: str, expert: str | None = None) -> Trial:
        trial = Trial(len(self.trials), None, None, parse_recipe(recipe, f"baseline {label}"), baseline=label)
        trial.expert = expert
        if self.fidelity is not None:
            trial.rung = trial.top = self.fidelity.top
        self.trials.append(trial)
        return trial

    def add_baseline(self, recipe: Recipe, label: str, expert: str | None = None) -> Trial:
        """A hand recipe evaluated in full as a trial of its own (``baseline``), ahead of new candidates;
        the optimizer is not told it (it may lie outside the space). ``expert``: the recipe is that
        expert alone, its own weights."""
        data = recipe.model_dump(mode="json", exclude_none=True)
        event = {"event": "baseline", "id": len(self.trials), "recipe": data, "label": label}
        self.journal.append({**event, "expert": expert} if expert else event)
        trial = self._new_baseline(data, label, expert)
        self._pending.append(trial.id)
        return trial

    def enqueue(self, genome_vector: Sequence[float], label: str | None = None) -> None:
        """Evaluate a known point next (the uniform average, an expert alone, a hand recipe), named
        ``label`` where the search's lines name it."""
        unit = [min(max((v - a) / s, 0.0), 1.0) if s else 0.0 for v, a, s in zip(genome_vector, self._lo, self._span)]
        self.journal.append({"event": "enqueue", "unit": unit, **({"label": label} if label else {})})
        self.optimizer.enqueue(unit)
        self._seeds_left += 1
        self._seed_labels.append(label)

    def ask(self) -> Trial:
        """The next candidate: one left running by an interruption first, else a new one."""
        if self._pending:
            return self.trials[self._pending.pop(0)]
        unit, replicate = self.optimizer.ask_replicate()
        event = {"event": "ask", "id": len(self.trials), "unit": unit}
        if replicate:
            event["replicate"] = replicate
        self.journal.append(event)
        return self._new_trial(unit, replicate)

    def tell(self, trial_id: int, values: Sequence[float] | None, info: dict | None = None) -> Trial:
        """Record a result (``None`` for a failure: crash, NaN); failed trials never enter the front."""
        if values is not None:
            values = [float(v) for v in values]
        self.journal.append({"event": "tell", "id": trial_id, "values": values, "info": info or {}})
        trial = self._apply_tell(trial_id, values, info or {})
        self.view.add(trial)
        return trial

    def set_anchors(self, anchors: dict, weights: dict, fitted: int) -> None:
        """Racing: the anchor documents and their weights (objective -> task -> list) fitted on
        ``fitted`` full results; candidates asked from now on are raced on them."""
        event = {"event": "anchors", "fitted": fitted, "anchors": anchors, "weights": weights}
        problem = self._anchors_problem(event)
        if problem:
            raise JournalError(problem)
        self.journal.append(event)
        self._apply_anchors(event)

    def anchor_documents(self) -> dict[str, list[int]]:
        """Racing: task -> the anchor documents scored first (every objective's anchors of it)."""
        out: dict[str, set[int]] = {}
        for tasks in (self.anchors or {}).get("anchors", {}).values():
            for task, ids in tasks.items():
                out.setdefault(task, set()).update(ids)
        return {t: sorted(ids) for t, ids in out.items()}

    def race(self, trial_id: int, estimate: list[float], info: dict, promote: bool) -> Trial | None:
        """A raced trial's anchor result: ``estimate`` (per objective) and the decision. Promoted:
        scored in full next (None; ``ask`` hands it out before new ones); else told ``estimate`` as
        its final result (the Trial), below full fidelity."""
        if not promote:
            return self.tell(trial_id, estimate, info)
        documents = int(info.get("documents", 0))
        self.journal.append({"event": "promote", "id": trial_id, "values": estimate, "documents": documents})
        self._apply_promote(trial_id, estimate, documents)
        self._pending.insert(0, trial_id)
        return None

    def documents_for(self, trial: Trial) -> int | dict[str, list[int]] | None:
        """Documents per task for ``trial``'s next evaluation: its rung's, a raced trial's anchors
        (task -> ids), or None (the full ``limit``)."""
        if self.racing is not None and trial.top is not None and trial.rung == 0:
            return self.anchor_documents()
        if self.fidelity is None or trial.rung is None or trial.rung >= self.fidelity.top:
            return None
        return self.fidelity.rungs[trial.rung]

    def report(self, trial_id: int, values: Sequence[float] | None, info: dict | None = None) -> Trial | None:
        """A result of ``trial_id`` at its current rung: promoted to the next rung (None: the trial is
        handed out again by ``ask`` before new ones), or told as its final result (the Trial)."""
        trial = self.trials[trial_id]
        info = dict(info or {})
        if values is not None:
            values = [float(v) for v in values]
        ok = values is not None and all(v == v and abs(v) != float("inf") for v in values)
        if self.fidelity is not None and trial.rung is not None and trial.rung < self.fidelity.top and ok:
            if self.fidelity.promotes([v for _, v in self._rungs[trial.rung]], values, self.directions):
                documents = int(info.get("documents", 0))
                self.journal.append({"event": "promote", "id": trial_id, "values": values, "documents": documents})
                self._apply_promote(trial_id, values, documents)
                self._pending.insert(0, trial_id)
                return None
        return self.tell(trial_id, values, info)

    def _apply_promote(self, trial_id: int, values: list[float], documents: int) -> None:
        trial = self.trials[trial_id]
        if trial.status != "running" or trial.rung is None or trial.top is None or trial.rung >= trial.top:
            raise JournalError(f"trial {trial_id} cannot be promoted")
        if self.fidelity is not None:
            self._rungs[trial.rung].append((trial_id, values))
        else:  # raced: the estimate that sent it to the full evaluation
            trial.estimate = list(values)
        trial.rung += 1
        trial.documents += documents

    def _apply_tell(self, trial_id, values, info) -> Trial:
        trial = self.trials[trial_id]
        if trial.status != "running":
            raise JournalError(f"trial {trial_id} was already told")
        failed = values is None or any(v != v or v in (float("inf"), float("-inf")) for v in values)
        trial.status, trial.values, trial.info = ("failed" if failed else "done"), values, info
        trial.documents += int(info.get("documents", 0))
        if "repeat_of" in info and trial.top is not None:  # the original's full evaluation
            trial.rung = trial.top
        if self.fidelity is not None and not failed and trial.rung < self.fidelity.top:
            self._rungs[trial.rung].append((trial_id, values))
        if self.racing is not None and not failed and not trial.full:  # stopped on its anchors
            trial.estimate = list(values)
        if trial.unit is not None:
            self.optimizer.tell(trial.unit, None if failed else values)
        if not failed and trial.full:
            self._scored.setdefault(recipe_key(trial.recipe), trial.id)
            self.full_order.append(trial.id)
        return trial

    # -- repeats ----------------------------------------------------------------------------------
    def repeat_of(self, trial: Trial) -> Trial | None:
        """The trial that already scored ``trial``'s recipe in full (``recipe_key``: the same merge),
        if any: its result stands for this one, which then costs no documents."""
        found = self._scored.get(recipe_key(trial.recipe))
        return self.trials[found] if found is not None and found != trial.id else None

    def tell_repeat(self, trial: Trial, original: Trial) -> Trial:
        """Tell ``trial`` the result of ``original`` (the same recipe, scored in full), marked as a
        repeat in the journal (``info.repeat_of``), at full fidelity, with no documents scored."""
        return self.tell(trial.id, original.values, {"repeat_of": original.id, "documents": 0})

    def park(self, trial: Trial) -> bool:
        """Whether ``trial`` waits for a trial of the same recipe being scored now (``flying``):
        parked, it is told that result once it is in (``release``). Otherwise ``trial`` is the one
        scored and is recorded as flying."""
        key = recipe_key(trial.recipe)
        twin = self._flying.get(key)
        if twin is not None and twin != trial.id:
            self._parked.setdefault(twin, []).append(trial.id)
            return True
        self._flying[key] = trial.id
        return False

    def release(self, trial: Trial) -> list[Trial]:
        """``trial``'s final result is in: the trials parked behind it told that result when it was
        scored in full (returned), else handed out again by ``ask`` to be scored themselves (a
        candidate stopped early or failed says nothing final about its twins)."""
        if self._flying.get(recipe_key(trial.recipe)) == trial.id:
            del self._flying[recipe_key(trial.recipe)]
        told = []
        for parked in self._parked.pop(trial.id, []):
            if trial.status == "done" and trial.full:
                told.append(self.tell_repeat(self.trials[parked], trial))
            else:
                self._pending.append(parked)
        return told

    @property
    def parked(self) -> int:
        """Trials waiting for a twin's result (not in flight, not told)."""
        return sum(len(ids) for ids in self._parked.values())

    @property
    def repeats(self) -> list[Trial]:
        """Trials told an earlier trial's result: their recipe had been scored already."""
        return [t for t in self.trials if "repeat_of" in t.info]

    # -- results ----------------------------------------------------------------------------------
    @property
    def finished(self) -> list[Trial]:
        """Trials done with a full evaluation: the front, hypervolume and export use these only."""
        return [t for t in self.trials if t.status == "done" and t.full]

    @property
    def stopped_early(self) -> list[Trial]:
        """Trials done whose final result is from a lower rung (multi-fidelity)."""
        return [t for t in self.trials if t.status == "done" and not t.full]

    @property
    def raced(self) -> list[Trial]:
        """Trials raced on anchor documents (scored on the anchors first; a repeat is not scored)."""
        return [t for t in self.trials if self.racing is not None and t.top is not None and "repeat_of" not in t.info]

    @property
    def documents(self) -> int:
        """Documents scored so far over every trial and rung (results told or promoted)."""
        return sum(t.documents for t in self.trials)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def front(self) -> list[Trial]:
        done = self.finished
        return [done[i] for i in front_indices([t.values for t in done], self.directions)]

    def hypervolume(self, reference: Sequence[float]) -> float:
        return hypervolume([t.values for t in self.finished], self.directions, reference)

    def snapshot(self, reference: Sequence[float] | None) -> Callable[[], FrontSnapshot]:
        """The ranks, front and hypervolume of everything finished so far (the one Pareto source), to
        compute later: it copies the values now and sorts them when called (O(M N^2), so a caller
        may run it off the search loop's thread)."""
        done = [(t.id, list(t.values)) for t in self.finished]
        told = sum(t.status != "running" for t in self.trials)
        directions, reference = self.directions, list(reference) if reference else None

        def compute() -> FrontSnapshot:
            points = [v for _, v in done]
            ranks = pareto_ranks(points, directions)
            by_id = {i: r + 1 for (i, _), r in zip(done, ranks) if r is not None}
            return FrontSnapshot(
                ranks=by_id,
                front=sorted(i for i, r in by_id.items() if r == 1),
                told=told,
                failed=told - len(done),
                hypervolume=hypervolume(points, directions, reference) if reference and done else None,
            )

        return compute
