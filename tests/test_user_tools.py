"""A finished campaign in the tools its users already open: the MLflow UI in a real headless
Chromium (skipped where Chromium is not installed), optuna.load_study and optuna-dashboard.

Screenshots of the browser test are kept in ``$EVOMERGE_TEST_ARTIFACTS`` (default
``.cache/test-artifacts``) under ``mlflow-ui/``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_campaign import cli, experiment, free_port, wait_for

TASKS = REPO / "evaluators" / "zoo"

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("EVOMERGE_TEST_ARTIFACTS", REPO / ".cache" / "test-artifacts"))


@pytest.fixture(scope="module")
def finished(zoo, tmp_path_factory):
    """A finished 10-candidate NSGA-II campaign tracked in its own local store, and what `run` printed.
    Its evaluator sets lm-eval options too (the zoo tokenizer's chat template, batch size auto,
    generation settings): a campaign runs with them."""
    tmp = tmp_path_factory.mktemp("user-tools")
    evaluator = tmp / "lm-evaluator.yaml"
    evaluator.write_text(
        yaml.safe_dump(
            {
                "limit": 20,
                "objectives": [
                    {"name": "add", "task": str(TASKS / "zoo_add_{split}.yaml"), "metric": "exact_match"},
                    {"name": "sort", "task": str(TASKS / "zoo_sort_{split}.yaml"), "metric": "acc"},
                ],
                "lm_eval": {"batch_size": "auto", "apply_chat_template": True, "gen_kwargs": {"max_gen_toks": 6}},
            }
        )
    )
    path = experiment(tmp, zoo, name="exp.yaml", budget={"max_evaluations": 10}, evaluator=str(evaluator))
    result = cli("run", path, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluations 10 (10 done" in result.stdout
    from evomerge import campaign

    loaded = campaign.open_campaign(tmp / "campaign", check=False)
    return loaded, loaded.search(), result.stdout


def serve(command: list[str], url: str, env: dict | None = None):
    """Start a server in its own process group; return it once ``url`` answers (fails at once if
    the process exits)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{command[0]} exited with {proc.returncode}")
        try:
            return urllib.request.urlopen(url, timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, 90, url)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- MLflow UI in headless Chromium -------------------------------------------------------------------
@pytest.fixture
def mlflow_ui(finished):
    """The UI over the finished campaign, started with the command `evomerge run` printed (port changed)."""
    _, _, stdout = finished
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("MLflow UI: mlflow ui ")]
    port = free_port()
    args = line.removeprefix("MLflow UI: ").replace("--port 5000", f"--port {port}").split()
    mlflow = REPO / ".venv" / "bin" / "mlflow"
    args[0] = str(mlflow) if mlflow.exists() else "mlflow"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    url = f"http://127.0.0.1:{port}"
    proc = serve(args, url + "/health", {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    yield url, {k: v.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for k, v in printed_links(stdout).items()}
    stop(proc)


def printed_links(stdout: str) -> dict[str, str]:
    links = dict(re.findall(r"^  (front|front plot): +(\S+)$", stdout, re.M))
    assert set(links) == {"front", "front plot"}, stdout
    return links


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=2000,1100")  # wide enough for the objective columns
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


ROWS_JS = """
const out = {};
for (const cell of document.querySelectorAll('[role=row][row-index] [role=gridcell][col-id]')) {
  const i = cell.closest('[role=row]').getAttribute('row-index');
  (out[i] = out[i] || {})[cell.getAttribute('col-id')] = cell.textContent.trim();
}
return Object.keys(out).sort((a, b) => a - b).map(i => out[i]);
"""
TRIAL = re.compile(r"trial-(\d{5})")
#: whether the table's metric cells are laid out inside the window (not scrolled or squeezed away)
METRICS_IN_SIGHT_JS = """
const cells = [...document.querySelectorAll('[role=gridcell][col-id^="metrics."]')];
return cells.length > 0 && cells.every(c => { const r = c.getBoundingClientRect();
  return r.width > 30 && r.height > 10 && r.left >= 0
    && r.right <= window.innerWidth && r.bottom <= window.innerHeight; });
"""


def body_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def model_training(browser) -> bool:
    """Whether the page is MLflow's model-training side (its nav: Runs, Models, Model registry), not
    the GenAI side (Overview, Evaluation runs, Judges, ...)."""
    text = body_text(browser)
    return "Model registry" in text and "Evaluation runs" not in text and "Judges" not in text


def test_the_mlflow_ui_opens_on_the_front_and_its_plot(finished, mlflow_ui, browser):
    """What a new browser (no saved settings) sees from each printed link, screenshots kept."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    loaded, search, _ = finished
    url, links = mlflow_ui
    shots = ARTIFACTS / "mlflow-ui"
    shots.mkdir(parents=True, exist_ok=True)
    front = sorted(t.id for t in search.front())
    wait = WebDriverWait(browser, 60)

    def matching(n):  # the table's own count of the runs it lists
        return wait.until(lambda d: f"{n} matching runs" in body_text(d))

    def rows():  # {trial: {column id: text}} of the rows shown, top to bottom
        return {
            int(m[1]): r for r in browser.execute_script(ROWS_JS) if (m := TRIAL.search(r["attributes.`Run Name`"]))
        }

    # 0. the runs table without evomerge's link, as MLflow first shows it: no metric column, but every
    # candidate's name carries its values; the Views menu offers the front
    browser.get(f"{url}/#/experiments/{loaded.state['experiment_id']}/runs?workflowType=machine_learning")
    matching(len(search.trials) + 1)
    wait.until(lambda d: len(rows()) == len(search.trials))
    for tid, row in rows().items():
        trial = search.trials[tid]
        assert "metrics.`add`" not in row and not [k for k in row if k.startswith("metrics.")]
        assert f"trial-{tid:05d} add={trial.values[0]:.3g} sort={trial.values[1]:.3g}" in row["attributes.`Run Name`"]
    browser.save_screenshot(str(shots / "0-runs-as-mlflow-opens-them.png"))
    next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Views").click()
    wait.until(lambda d: d.find_element(By.XPATH, "//*[@role='menuitem'][contains(., 'Pareto front')]")).click()
    matching(len(front))

    # 1. the printed front link: the saved view "Pareto front" of the runs table, in the model-training
    # pages: the front members only, their objectives as columns, best first in the first objective
    browser.get(links["front"])
    matching(len(front))
    wait.until(lambda d: sorted(rows()) == front and all("metrics.`sort`" in r for r in rows().values()))
    assert model_training(browser) and "Sort: add" in body_text(browser)
    assert browser.execute_script(METRICS_IN_SIGHT_JS)
    shown = rows()
    for tid in front:  # the UI rounds to a few digits
        assert [float(shown[tid][f"metrics.`{o}`"]) for o in ("add", "sort")] == pytest.approx(
            search.trials[tid].values, abs=5e-3
        )
        name = shown[tid]["attributes.`Run Name`"]  # the values are in the run name too
        assert all(f"{o}={v:.3g}" in name for o, v in zip(("add", "sort"), search.trials[tid].values)), name
    order = [float(r["metrics.`add`"]) for r in shown.values()]
    assert order == sorted(order, reverse=True)
    browser.save_screenshot(str(shots / "1-front.png"))

    # 2. the printed front-plot link: the campaign run's front.png, rendered, in the model-training pages
    browser.get(links["front plot"])
    wait.until(
        lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 300)"
        )
    )
    assert "front.png" in body_text(browser) and model_training(browser)
    browser.save_screenshot(str(shots / "2-front-plot.png"))

    # and from the runs table: one click on the campaign run shows the plot in its description
    run = loaded.state["parent_run_id"]
    browser.get(f"{url}/#/experiments/{loaded.state['experiment_id']}/runs/{run}?workflowType=machine_learning")
    wait.until(
        lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.includes('get-artifact?path=front.png') && i.complete "
            "&& i.naturalWidth > 300)"
        )
    )
    assert model_training(browser)
    browser.save_screenshot(str(shots / "3-campaign-run.png"))

    # 3. the experts' kinship table, linked from the campaign run's description, reads as text
    link = next(a for a in browser.find_elements(By.TAG_NAME, "a") if a.text.strip() == "kinship table")
    assert f"/runs/{run}/artifactPath/kinship.txt?workflowType=machine_learning" in link.get_attribute("href")
    tabs = len(browser.window_handles)
    browser.execute_script("arguments[0].click()", link)  # under the collapsed description's fade
    wait.until(lambda d: len(d.window_handles) > tabs)  # MLflow opens description links in a new tab
    browser.switch_to.window(browser.window_handles[-1])
    wait.until(lambda d: "cosine by layer group" in body_text(d))
    body = body_text(browser)
    assert "expert-add ~ expert-sort" in body and "opposed: cosine < 0" in body and model_training(browser)
    browser.save_screenshot(str(shots / "4-kinship.png"))


# -- Optuna --------------------------------------------------------------------------------------------
def test_the_campaign_opens_in_optuna_with_its_objective_names(finished):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    loaded, search, _ = finished
    study = optuna.load_study(
        study_name="evomerge", storage=JournalStorage(JournalFileBackend(str(loaded.directory / "optuna.journal")))
    )
    assert study.metric_names == ["add", "sort"]
    assert len(study.trials) == len(search.trials)
    by_id = {t.user_attrs["evomerge_trial"]: t for t in study.trials}
    for trial in search.trials:
        assert by_id[trial.id].values == trial.values
    assert sorted(t.user_attrs["evomerge_trial"] for t in study.best_trials) == sorted(t.id for t in search.front())


def test_optuna_dashboard_serves_the_campaign(finished):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (the test extra)")
    loaded, search, _ = finished
    port = free_port()
    command = [sys.executable, "-m", "optuna_dashboard._cli", str(loaded.directory / "optuna.journal")]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    proc = serve(command, url + "/api/meta")
    try:
        with urllib.request.urlopen(url + "/api/studies", timeout=30) as r:
            (study,) = json.loads(r.read())["study_summaries"]
        assert study["study_name"] == "evomerge" and study["directions"] == ["maximize", "maximize"]
        with urllib.request.urlopen(f"{url}/api/studies/{study['study_id']}", timeout=30) as r:
            detail = json.loads(r.read())
        assert detail["objective_names"] == ["add", "sort"]
        assert len(detail["trials"]) == len(search.trials)
    finally:
        stop(proc)
