"""MLflow tracking of a campaign: a parent run, one child run per candidate, the live Pareto front.

One MLflow experiment per campaign. The parent run holds the configuration (params, and the
experiment file as an artifact), the library versions, and, refreshed every ``refresh_s`` seconds
and at the end: the hypervolume and front size per step, the front as a table, and a scatter plot of
the objectives (interactive HTML and PNG). Ranks, front and hypervolume are the search's
(``Search.snapshot``), evaluated on the tracking thread so that the search loop never waits for the
O(M N^2) sort; tracking has no Pareto code of its own. Each
candidate is a run of its own: genes and decoded recipe values as params, objectives and timings as
metrics, its status. Front members carry the tags
``pareto=true`` and ``pareto_rank`` (1 = the front), updated as the front changes, so the MLflow UI
filters to the front by itself (``tags.pareto = 'true'``).

What a user sees in the MLflow UI: the experiment is a model-training experiment (the
``mlflow.experimentKind`` tag; MLflow 3.17's UI reads the kind from its GenAI / Model training switch
instead, so every link evomerge prints or writes in a description carries
``workflowType=machine_learning``). Candidate runs are flat, not nested under the campaign run, so that
filtering on ``tags.pareto = 'true'`` lists the front members themselves (nested children show as one
collapsed parent row). The UI shows a new browser only names, dates and durations until its Columns
menu is used, so the objectives are where it shows them anyway: a candidate's run name carries its
values (``trial-00042 add=0.51 sort=0.43``), and the experiment holds a saved view, "Pareto front"
(MLflow's ``mlflow.sharedViewState.<id>`` experiment tag, opened by ``viewStateShareKey=<id>`` in the
link or from the Views menu): the front, the objectives as columns, sorted by the first. Candidates
point at the campaign run with the ``evomerge.campaign_run`` tag; the experiment's description links
to it, and the campaign run's description shows the front plot and links its ``front.html``.

Logging runs on a background thread: a sqlite-backed run costs ~50 ms, as much as a candidate's
evaluation on the zoo, and must not hold up the search loop. Candidates are queued; ``close``
drains the queue. Children are created only once a candidate is finished, so a crash never leaves a
child RUNNING for long: a child cut off mid-write (the controller SIGKILLed between creating and
ending it) is deleted when the parent is reopened on resume, and every candidate told but not
logged is logged then (a candidate's run is known by its ``evomerge.trial`` tag, so none is logged
twice).

A tracking store that fails, dies or stops answering never stops or holds up the campaign: every
MLflow request is bounded (``environment.MLFLOW_BOUNDS``), the first failure marks the store down
and later calls fail at once instead of each waiting out its bound, the store is tried again every
``RETRY_S`` and once at the end (an HTTP server's ``/health``, within ``HEALTH_TIMEOUT_S``), and
what it missed meanwhile is logged when it answers. ``join`` gives up on a call still unanswered
after the bound of one request; ``missing`` says which results MLflow did not get.
"""

from __future__ import annotations

import io
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evomerge.environment import bound_mlflow, mlflow_request_bound_s
from evomerge.errors import first_line
from evomerge.search.study import FrontSnapshot

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]
PARENT_TAG = "mlflow.parentRunId"  # how candidates pointed at the campaign run before they were flat
CAMPAIGN_TAG = "evomerge.campaign_run"
ROLE_TAG = "evomerge.role"  # campaign | candidate | export
TRIAL_TAG = "evomerge.trial"
KINSHIP_TAG = "evomerge.kinship_flags"  # the campaign run's flagged expert pairs, or "none"
NOTE_TAG = "mlflow.note.content"  # a run's or experiment's description (markdown) in the UI
#: MLflow's own mark of an experiment's kind: the UI opens a model-training experiment on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
FRONT_FILTER = "tags.pareto = 'true'"
#: The id of the experiment's saved view of the front (an experiment tag under MLflow's prefix).
FRONT_VIEW = "pareto-front"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: Opens MLflow's model-training pages whatever its GenAI / Model training switch says (per browser).
MODEL_TRAINING = "workflowType=machine_learning"
#: Seconds between tries of a tracking store that failed, while the campaign goes on.
RETRY_S = 60.0
#: Seconds an HTTP tracking server is given to answer ``/health`` before it is tried again.
HEALTH_TIMEOUT_S = 5.0


class TrackingUnavailable(Exception):
    """The tracking store failed or did not answer (the message says how, in a few words)."""


def why(e: BaseException) -> str:
    """A failed MLflow call in a few words: the connection refused, no answer, else its first line."""
    import requests

    chain, seen = [], e
    while seen is not None and len(chain) < 12:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        text = str(err)
        if isinstance(err, requests.exceptions.Timeout) or "timed out" in text.lower():
            return "no answer (timed out)"
        if isinstance(err, requests.exceptions.ConnectionError):
            return "connection refused" if "refused" in text.lower() else "connection failed"
    return first_line(e)[:300]


class GuardedClient:
    """An MlflowClient that stops waiting once its store failed: the first failing call sets
    ``problem`` (and ``down_at``, monotonic), and until ``problem`` is cleared every call raises
    TrackingUnavailable at once. ``busy_since``: when the call in progress began (None between
    calls), so that a caller can bound its wait for it."""

    def __init__(self, client):
        self._client = client
        self.problem: str | None = None
        self.down_at = 0.0
        self.busy_since: float | None = None

    def __getattr__(self, name):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            if self.problem is not None:
                raise TrackingUnavailable(self.problem)
            self.busy_since = time.monotonic()
            try:
                return method(*args, **kwargs)
            except Exception as e:
                self.problem, self.down_at = why(e), time.monotonic()
                raise TrackingUnavailable(self.problem) from e
            finally:
                self.busy_since = None

        return call


def ui_links(base: str, experiment_id: str, campaign_run: str | None = None) -> dict[str, str]:
    """Addresses in the MLflow UI at ``base`` (e.g. ``http://127.0.0.1:5000``, or ``""`` for links
    within the UI): the runs table, the saved view of the front (``front``: its members, their
    objectives as columns), and the campaign run's front.png (``plot``). Each opens the model-training
    pages whatever the UI's GenAI / Model training switch says. The front's link carries no
    ``searchFilter``: MLflow ignores a saved view when the address has a search field of its own."""
    runs = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs" if base else f"#/experiments/{experiment_id}/runs"
    links = {"runs": f"{runs}?{MODEL_TRAINING}", "front": f"{runs}?{MODEL_TRAINING}&viewStateShareKey={FRONT_VIEW}"}
    if campaign_run:
        links["plot"] = f"{runs}/{campaign_run}/artifactPath/front.png?{MODEL_TRAINING}"
    return links


def front_view(objectives: Sequence[str], directions: Sequence[str]) -> str:
    """The experiment tag's value that MLflow's UI (3.x) reads as a saved view named "Pareto front": the
    runs filtered to the front, the objectives as the table's columns (and every front member in the
    charts), sorted by the first objective, best first, the run name column wide enough for the values
    it carries. A JSON envelope (name, times, state); the state is plain JSON, which the UI accepts as
    well as its own compressed form."""
    columns = [f"metrics.`{param_key(o)}`" for o in objectives]
    name_column = "attributes.`Run Name`"
    state = {
        "searchFilter": FRONT_FILTER,
        "orderByKey": columns[0],
        "orderByAsc": directions[0] == "minimize",
        "selectedColumns": columns,
        "columnOrder": [name_column],
        "columnWidths": {name_column: min(240 + 60 * len(objectives), 600)},  # px: ~9 characters an objective
        "runsHiddenMode": "SHOW_ALL",
    }
    now = int(time.time() * 1000)
    return json.dumps({"name": "Pareto front", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def run_name(trial, objectives: Sequence[str]) -> str:
    """A candidate's run name: its trial number, its objective values if scored (3 significant digits,
    as the table would round them) and what it is if a baseline or an expert alone, e.g.
    ``trial-00042 add=0.51 sort=0.43`` or ``trial-00001 add=0.3 sort=0.65 (expert-add alone)``."""
    name = f"trial-{trial.id:05d}"
    if trial.status == "done":
        name += "".join(f" {o}={v:.3g}" for o, v in zip(objectives, trial.values))
    if named := trial.baseline or trial.label:
        name += f" ({named})"
    return name[:250]


def param_key(name: str) -> str:
    """MLflow keys allow alphanumerics and _ - . space : / only: ``weight[expert-add]@0`` becomes
    ``weight.expert-add.0``."""
    name = name.replace("[", ".").replace("]", "").replace("@", ".")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:250]


def local_store(directory: Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the default store inside a campaign directory."""
    directory = directory.resolve()
    return f"sqlite:///{directory / 'mlflow.db'}", (directory / "mlartifacts").as_uri()


class Tracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        objectives: Sequence[str],
        directions: Sequence[str],
        artifact_location: str | None = None,
        refresh_s: float = 10.0,
    ):
        import logging

        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # store creation and migrations log at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        bound_mlflow()
        self.client = GuardedClient(MlflowClient(tracking_uri=uri))
        #: the longest wait for one MLflow call (its request's bound) before ``join`` gives up on it
        self.bound_s = mlflow_request_bound_s() + HEALTH_TIMEOUT_S
        self.uri, self.experiment_name = uri, experiment
        self.objectives, self.directions = list(objectives), list(directions)
        self.artifact_location, self.refresh_s = artifact_location, refresh_s
        self.parent: str | None = None
        self.experiment_id: str | None = None
        self._runs: dict[int, str] = {}  # trial id -> child run id
        self._done: dict[int, list[float]] = {}  # trial id -> objective values (for the plots)
        self._baselines: set[int] = set()  # trial ids of the hand baselines (marked in the plots)
        self._ranks: dict[int, int | None] = {}  # trial id -> the pareto_rank tag it carries
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = False  # the end is queued (finish)
        self._published = time.monotonic()
        self._snapshot: FrontSnapshot | None = None  # the last front computed
        self._logged_front: FrontSnapshot | None = None  # the last front MLflow got
        #: the first failure of this session, in one line (None: MLflow got everything so far)
        self.problem: str | None = None
        self.ended = False  # the campaign run's end reached MLflow
        self._recoverable = True  # False once opening failed: what MLflow holds is not known
        self._missed: dict[int, tuple] = {}  # trial id -> (trial, (gene names, samples)) not logged
        self._missed_front: FrontSnapshot | None = None
        self._partial: dict[int, str] = {}  # trial id -> its run, created but cut off by a failure

    # -- lifecycle (controller thread) -------------------------------------------------------------
    def open(
        self, parent_run_id: str | None, params: dict[str, str], tags: dict[str, str], config_file: Path | None
    ) -> str | None:
        """Create the experiment and parent run, or reopen the parent of an earlier run of the
        campaign; start the tracking thread. If the store fails meanwhile, returns None: the tracker
        stays down for the session (``problem`` says why) and every candidate counts as missing."""
        try:
            self._open(parent_run_id, params, tags, config_file)
        except Exception as e:
            self.problem = self.client.problem = self.client.problem or first_line(e, with_type=True)
            self._recoverable = False
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self.parent if self._recoverable else None

    def _open(self, parent_run_id, params, tags, config_file) -> None:
        from mlflow.entities import Param

        exp = self.client.get_experiment_by_name(self.experiment_name)
        exp_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location, tags=dict([EXPERIMENT_KIND])
            )
        )
        self.experiment_id = exp_id
        if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an earlier version
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        if exp is None or VIEW_TAG_PREFIX + FRONT_VIEW not in exp.tags:  # an earlier version's has none
            view = front_view(self.objectives, self.directions)
            self.client.set_experiment_tag(exp_id, VIEW_TAG_PREFIX + FRONT_VIEW, view)
        if parent_run_id:
            self.client.update_run(parent_run_id, status="RUNNING")
            self.parent = parent_run_id
            self._load_children()
        else:
            run = self.client.create_run(
                exp_id,
                tags={"mlflow.runName": f"campaign {self.experiment_name}", ROLE_TAG: "campaign", **tags},
            )
            self.parent = run.info.run_id
            items = [Param(param_key(k), str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.parent, params=items[i : i + 100])
            if config_file is not None:
                self.client.log_artifact(self.parent, str(config_file))
        self._describe()

    def log_kinship(self, table: dict) -> None:
        """The experts' kinship table on the campaign run: ``kinship.json`` (every metric and layer
        group), ``kinship.txt`` (as ``evomerge kinship`` prints it) and the flagged pairs as a tag."""
        from evomerge.models.kinship import KinshipTable

        self.client.log_dict(self.parent, table, "kinship.json")
        self.client.log_text(self.parent, KinshipTable(**table).format(), "kinship.txt")
        flagged = [f"{p['a']}~{p['b']}: {', '.join(p['flags'])}" for p in table["pairs"] if p["flags"]]
        self.client.set_tag(self.parent, KINSHIP_TAG, ("; ".join(flagged) or "none")[:5000])
        self._describe()

    def _describe(self) -> None:
        """The experiment's and the campaign run's descriptions, as the UI shows them (markdown): the
        plot and the interactive plot one click away from the experiment's page."""
        objectives = ", ".join(f"`{o}` ({d})" for o, d in zip(self.objectives, self.directions))
        links = ui_links("", self.experiment_id, self.parent)
        run = links["plot"].split("/artifactPath/")[0]
        html = links["plot"].replace("front.png", "front.html")
        plots = f"[plot]({links['plot']}) · [interactive plot]({html})"
        self.client.set_experiment_tag(
            self.experiment_id,
            NOTE_TAG,
            f"**Pareto front**: {plots} · its members: [the view Pareto front]({links['front']}) (Views), or "
            f"filter the runs with `{FRONT_FILTER}`.\n\n"
            f"evomerge campaign **{self.experiment_name}**: one run per candidate merge, named with its "
            f"objectives {objectives} (metrics too: Columns > Metrics) and its recipe as params; the run "
            f"[campaign {self.experiment_name}]({run}?{MODEL_TRAINING}) holds the configuration and the front "
            "(`front.png`, `front.html`, `front.json`).",
        )
        kinship = self.client.get_run(self.parent).data.tags.get(KINSHIP_TAG)
        if kinship is not None:  # logged (see log_kinship)
            verdict = "no pair flagged" if kinship == "none" else f"flagged: {kinship}"
            kinship = f"\n\n**Experts**: [kinship table]({run}/artifactPath/kinship.txt?{MODEL_TRAINING}) · {verdict}"
        self.client.set_tag(
            self.parent,
            NOTE_TAG,
            f"**Pareto front** ({objectives}): {plots} · its members: [the view Pareto front]({links['front']})"
            f" of this experiment's runs (`{FRONT_FILTER}`).{kinship or ''}\n\n"
            f"![Pareto front](get-artifact?path=front.png&run_uuid={self.parent})",
        )

    def _load_children(self) -> None:
        for tag in (CAMPAIGN_TAG, PARENT_TAG):  # candidates of earlier versions were nested
            self._load_runs(tag)

    def _load_runs(self, tag: str) -> None:
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], f"tags.`{tag}` = '{self.parent}'", max_results=1000, page_token=token
            )
            for run in page:
                tags = run.data.tags
                role = tags.get(ROLE_TAG) or ("export" if tags.get("mlflow.runName", "").startswith("export") else "")
                if role not in ("", "candidate"):
                    continue  # an exported winner's run, not a candidate
                if run.info.status == "RUNNING":  # the controller died while writing it: log it anew
                    self.client.delete_run(run.info.run_id)
                    continue
                tid = int(tags[TRIAL_TAG])
                self._runs[tid] = run.info.run_id
                if tags.get("baseline") == "true":
                    self._baselines.add(tid)
                if run.info.status == "FINISHED":
                    self._done[tid] = [run.data.metrics[o] for o in self.objectives]
                    rank = run.data.tags.get("pareto_rank")
                    self._ranks[tid] = int(rank) if rank and rank.isdigit() else None
            token = page.token
            if not token:
                return

    @property
    def logged(self) -> set[int]:
        return set(self._runs)

    def missing(self, trials) -> list[int]:
        """Ids of the finished ``trials`` (search Trials) with no run in MLflow as far as it is known."""
        return [t.id for t in trials if t.status != "running" and t.id not in self._runs]

    def candidate(self, trial, gene_names: Sequence[str], samples: dict | None = None) -> None:
        """Queue a finished candidate (a search Trial) for logging, with its per-sample records if any."""
        self._queue.put(("candidate", trial, (list(gene_names), samples)))

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Queue metrics for the campaign run at ``step`` (results so far), e.g. racing's estimate errors."""
        self._queue.put(("metrics", dict(values), step))

    def due(self) -> bool:
        """Whether ``refresh_s`` has passed since the last snapshot was published."""
        return time.monotonic() - self._published >= self.refresh_s

    @property
    def latest(self) -> FrontSnapshot | None:
        """The last front applied (at most ``refresh_s`` old while the campaign runs)."""
        return self._snapshot

    def publish(self, snapshot: Callable[[], FrontSnapshot]) -> None:
        """Queue the search's front (``Search.snapshot``, computed on the tracking thread): tags,
        metrics and plots follow once the queued candidates are logged."""
        self._published = time.monotonic()
        self._queue.put(("front", snapshot, None))

    def close(self, status: RunStatus = "FINISHED", snapshot: Callable[[], FrontSnapshot] | None = None) -> None:
        """Log everything queued, publish ``snapshot`` (the final front), end the parent run with ``status``."""
        self.finish(status, snapshot)
        self.join()

    def finish(self, status: RunStatus = "FINISHED", snapshot: Callable[[], FrontSnapshot] | None = None) -> None:
        """Queue the end (``close`` without the wait): the tracking thread logs what is queued, the
        final front and the status while the caller does other work (stops its workers); then ``join``."""
        if self._thread is None or self._closing:
            return
        if snapshot is not None:
            self._queue.put(("front", snapshot, None))
        self._queue.put(("close", status, None))
        self._closing = True

    def join(self) -> None:
        """Wait for the tracking thread to end after ``finish``, but for no call longer than
        ``bound_s``: one that has not returned by then is given up on (its thread is a daemon), and
        what was not logged stays ``missing``."""
        if self._thread is None:
            return
        while self._thread.is_alive():
            self._thread.join(timeout=0.2)
            since = self.client.busy_since
            if since is not None and time.monotonic() - since > self.bound_s:
                self.client.problem = self.client.problem or f"no answer within {self.bound_s:.0f} s"
                self.problem = self.problem or self.client.problem
                break
        self._thread = None

    # -- background thread ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            for kind, a, b in self._after_missed(item):
                self._handle(kind, a, b)
            if item[0] == "close":
                return

    def _handle(self, kind: str, a, b) -> None:
        """One queued item; if MLflow fails it, kept to be logged when the store answers again."""
        if kind == "front" and callable(a):
            a = self._snapshot = a()  # the progress line's front, whether MLflow gets it or not
        try:
            if self.client.problem is not None:
                raise TrackingUnavailable(self.client.problem)
            if kind == "candidate":
                self._log_candidate(a, *b)
            elif kind == "front":
                self._refresh(a)
            elif kind == "metrics":
                now = int(time.time() * 1000)
                self.client.log_batch(self.parent, metrics=[_metric(k, v, now, b) for k, v in a.items()])
            elif kind == "close":
                self.client.set_terminated(self.parent, a)
                self.ended = True
        except Exception as e:  # never stops the campaign: the results are in its journal
            self.problem = self.problem or (
                self.client.problem if isinstance(e, TrackingUnavailable) else first_line(e, with_type=True)
            )
            if kind == "candidate":
                self._missed[a.id] = (a, b)
            elif kind == "front":
                self._missed_front = a

    def _after_missed(self, item: tuple) -> list[tuple]:
        """``item``, after what the store missed once it answers again: tried ``RETRY_S`` after it
        failed, and at the end whenever it failed."""
        client = self.client
        if client.problem is None or not self._recoverable:
            return [item]
        if item[0] != "close" and time.monotonic() - client.down_at < RETRY_S:
            return [item]
        if not self._answers():
            client.down_at = time.monotonic()
            return [item]
        client.problem = None
        missed = [("candidate", trial, rest) for _, (trial, rest) in sorted(self._missed.items())]
        if self._missed_front is not None and item[0] != "front":
            missed.append(("front", self._missed_front, None))
        self._missed, self._missed_front = {}, None
        return [*missed, item]

    def _answers(self) -> bool:
        """Whether the store answers now: an HTTP server's ``/health`` within ``HEALTH_TIMEOUT_S``;
        another store (a local sqlite file) is simply tried again."""
        from evomerge.experiment import tracking_unreachable

        if not self.uri.startswith(("http://", "https://")):
            return True
        return tracking_unreachable(self.uri, timeout=HEALTH_TIMEOUT_S) is None

    def _log_candidate(self, trial, gene_names: list[str], samples: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        if trial.id in self._runs:
            return
        if trial.id in self._partial:  # created before a failure cut it off: replaced
            self.client.delete_run(self._partial[trial.id])
            del self._partial[trial.id]
        now = int(time.time() * 1000)
        info = trial.info or {}
        tags = {
            CAMPAIGN_TAG: self.parent,
            ROLE_TAG: "candidate",
            # its values and what it is in its name: the runs table shows them without a column
            "mlflow.runName": run_name(trial, self.objectives),
            TRIAL_TAG: str(trial.id),
            "status": trial.status,
            "pareto": "false",
        }
        if info.get("reason"):
            tags["reason"] = str(info["reason"])[:5000]
        if "repeat_of" in info:  # the recipe of an earlier trial: its result, not scored again
            tags["repeat_of"] = str(info["repeat_of"])
        if trial.expert:  # an expert alone, its own weights
            tags["expert_alone"] = trial.expert
        elif trial.baseline:
            tags["baseline"] = "true"
            tags["baseline_recipe"] = trial.baseline
            self._baselines.add(trial.id)
        if trial.rung is not None:  # multi-fidelity: the rung of the values logged, and whether in full
            tags["rung"] = str(trial.rung)
            tags["full_fidelity"] = str(trial.full).lower()
        run = self.client.create_run(self.experiment_id, start_time=now, tags=tags)
        self._partial[trial.id] = run.info.run_id
        genome = trial.genome or []  # a baseline has no genes
        params = [Param(param_key(f"gene.{n}"), repr(float(v))) for n, v in zip(gene_names, genome)]
        params += [Param(param_key(k), v) for k, v in recipe_params(trial.recipe).items()]
        if trial.replicate:
            params.append(Param("replicate", str(trial.replicate)))
        metrics = []
        if trial.status == "done":
            metrics += [Metric(param_key(o), float(v), now, 0) for o, v in zip(self.objectives, trial.values)]
        for key in ("materialize", "evaluate", "forward", "total"):
            if key in info.get("timings", {}):
                metrics.append(Metric(f"time_{key}_s", float(info["timings"][key]), now, 0))
        for key in ("wall_s", "attempts"):
            if key in info:
                metrics.append(Metric(key, float(info[key]), now, 0))
        metrics += [Metric("documents", float(trial.documents), now, 0), *_estimates(trial, self.objectives, now)]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100], metrics=metrics if i == 0 else [])
        if samples:
            self.client.log_dict(run.info.run_id, samples, "samples.json")
        self.client.set_terminated(run.info.run_id, "FINISHED" if trial.status == "done" else "FAILED")
        self._runs[trial.id] = self._partial.pop(trial.id)
        if trial.status == "done":
            self._done[trial.id] = list(trial.values)
            self._ranks[trial.id] = None

    def _refresh(self, snap: FrontSnapshot) -> None:
        """Tag the children whose rank changed (``pareto_rank``, 1 = the front; ``pareto``), log the
        front's size and hypervolume at step = results so far, and the front table and plots."""
        from mlflow.entities import Metric

        if snap == self._logged_front:
            return
        for tid, rank in snap.ranks.items():
            if self._ranks.get(tid) != rank and tid in self._runs:
                run = self._runs[tid]
                was_front = self._ranks.get(tid) == 1
                self.client.set_tag(run, "pareto_rank", str(rank))
                if (rank == 1) != was_front:
                    self.client.set_tag(run, "pareto", "true" if rank == 1 else "false")
                self._ranks[tid] = rank
        now = int(time.time() * 1000)
        metrics = [
            Metric("front_size", len(snap.front), now, snap.told),
            Metric("failed", snap.failed, now, snap.told),
            Metric("finished", snap.told, now, snap.told),
        ]
        if snap.hypervolume is not None:
            metrics.append(Metric("hypervolume", snap.hypervolume, now, snap.told))
        self.client.log_batch(self.parent, metrics=metrics)
        self.client.set_tag(self.parent, "front", json.dumps(snap.front)[:5000])
        ids = sorted(self._done)
        if snap.front and ids:
            self._log_front_artifacts(ids, [self._done[i] for i in ids], [t for t in snap.front if t in self._done])
        self._logged_front = snap

    def _log_front_artifacts(self, ids, points, front) -> None:
        rows = sorted(front, key=lambda t: self._done[t])
        table = {"trial": rows, "run_id": [self._runs[t] for t in rows]}
        for j, name in enumerate(self.objectives):
            table[name] = [self._done[t][j] for t in rows]
        self.client.log_dict(self.parent, table, "front.json")
        html, png = front_plots(ids, points, front, self.objectives, self.directions, self._baselines)
        self.client.log_text(self.parent, html, "front.html")
        self.client.log_image(self.parent, png, "front.png") if png is not None else None


def _estimates(trial, objectives, timestamp: int) -> list:
    """Racing: a raced candidate's anchor estimate per objective (``estimate.<objective>``)."""
    return [_metric(param_key(f"estimate.{o}"), v, timestamp, 0) for o, v in zip(objectives, trial.estimate or ())]


def _metric(key: str, value: float, timestamp: int, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), timestamp, step)


def recipe_params(recipe) -> dict[str, str]:
    """The decoded recipe's values as flat params: method, seed, per-model and global parameters."""
    out = {"recipe.merge_method": recipe.merge_method, "recipe.seed": str(recipe.evomerge.seed)}
    for entry in recipe.models or []:
        for key, value in (entry.parameters or {}).items():
            out[f"recipe.{entry.model}.{key}"] = json.dumps(_plain(value))[:6000]
    for key, value in (recipe.parameters or {}).items():
        out[f"recipe.{key}"] = json.dumps(_plain(value))[:6000]
    if recipe.evomerge.lines is not None:
        out["recipe.lines"] = json.dumps(recipe.evomerge.lines.model_dump())
    return out


def _plain(value):
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


#: objectives shown in the plots' pairwise grid (all pairs of the first this many)
PLOT_OBJECTIVES = 5


def front_plots(ids, points, front, objectives, directions, baselines=()):
    """Plots of every finished candidate with the front highlighted and the hand baselines
    (``baselines``: their trial ids) marked. One objective: against the trial number; two: one
    scatter; three or more: a grid of every pair of the first ``PLOT_OBJECTIVES`` (a front member may
    look dominated in one pair: it is non-dominated over all of them). Returns (interactive HTML with
    plotly.js embedded, so it opens offline; PNG as a numpy image)."""
    layout = _FrontLayout.of(ids, points, front, objectives, baselines)
    html = _front_html(layout, objectives)
    return html, _front_png(layout, objectives)


@dataclass(frozen=True)
class _FrontLayout:
    """What both plots of the front show: ``groups`` of trials (label, trial ids, matplotlib style,
    plotly marker colour), the ``pairs`` of objective indices plotted (-1: the trial number), each
    axis's name, and the objectives of the grid (``shown``)."""

    groups: tuple
    value: dict
    pairs: list
    names: dict | list
    shown: list

    @classmethod
    def of(cls, ids, points, front, objectives, baselines) -> _FrontLayout:
        import itertools

        on, marked = set(front), set(baselines)
        rest = [t for t in ids if t not in on and t not in marked]
        groups = (  # label, trial ids, matplotlib style, plotly marker
            ("candidates", rest, {"c": "lightgray", "s": 14}, "lightgray"),
            ("Pareto front", [t for t in ids if t in on and t not in marked], {"c": "crimson", "s": 30}, "crimson"),
            ("hand baseline", [t for t in ids if t in marked], {"c": "black", "s": 40, "marker": "x"}, "black"),
        )
        value = dict(zip(ids, points))
        if len(objectives) >= 2:
            shown = list(range(min(len(objectives), PLOT_OBJECTIVES)))
            return cls(groups, value, list(itertools.combinations(shown, 2)), list(objectives), shown)
        return cls(groups, value, [(-1, 0)], {-1: "trial", 0: objectives[0]}, [0])

    def axis(self, t, j):
        """Trial ``t``'s coordinate on axis ``j``: its ``j``-th objective, or its number for -1."""
        return t if j < 0 else self.value[t][j]


def _front_html(layout: _FrontLayout, objectives) -> str:
    """The interactive plot: one scatter for a single pair, else a scatter matrix of ``shown``."""
    import plotly.graph_objects as go

    pairs = layout.pairs
    fig = go.Figure()
    for label, members, _, color in layout.groups:
        if not members:
            continue
        marker = {"color": color, "size": 10 if label != "candidates" else 6}
        if label == "hand baseline":
            marker["symbol"] = "x"
        text = [f"trial {t}" for t in members]
        if len(pairs) == 1:
            x, y = pairs[0]
            xs, ys = [layout.axis(t, x) for t in members], [layout.axis(t, y) for t in members]
            fig.add_scatter(x=xs, y=ys, mode="markers", name=label, text=text, marker=marker)
        else:
            dims = [{"label": objectives[j], "values": [layout.value[t][j] for t in members]} for j in layout.shown]
            fig.add_trace(go.Splom(dimensions=dims, name=label, text=text, marker=marker, diagonal_visible=False))
    if len(pairs) == 1:
        fig.update_layout(xaxis_title=layout.names[pairs[0][0]], yaxis_title=layout.names[pairs[0][1]])
    fig.update_layout(title="evomerge: candidates and Pareto front")
    return fig.to_html(include_plotlyjs=True, full_html=True)


def _front_png(layout: _FrontLayout, objectives):
    """The still plot, one panel per pair (at most 3 a row), as an RGBA uint8 image (None if unreadable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = layout.pairs
    cols = min(len(pairs), 3)
    rows = -(-len(pairs) // cols)
    f, axes = plt.subplots(
        rows, cols, figsize=(6 if cols == 1 else 3.6 * cols, 4.5 if rows == 1 else 3.2 * rows), dpi=100
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, (x, y) in zip(axes, pairs):
        for label, members, style, _ in layout.groups:
            if members:
                xs, ys = [layout.axis(t, x) for t in members], [layout.axis(t, y) for t in members]
                ax.scatter(xs, ys, label=label, **style)
        ax.set_xlabel(layout.names[x])
        ax.set_ylabel(layout.names[y])
    for ax in axes[len(pairs) :]:
        ax.axis("off")
    if len(pairs) == 1:
        axes[0].legend()
        f.tight_layout()
    else:
        handles, labels = axes[0].get_legend_handles_labels()
        f.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
        f.suptitle(
            f"every pair of {len(layout.shown)} objectives; the front is non-dominated over all {len(objectives)}"
        )
        f.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    f.savefig(buf, format="png")
    plt.close(f)
    buf.seek(0)
    png = plt.imread(buf, format="png")
    return np.asarray(png * 255, dtype=np.uint8) if png is not None else None
