"""The monitoring, seen in a browser: the pipeline runs against `prefect server start`, then headless
Chromium (Debian's, driven by playwright-core) opens the flow run and checks that it lists the stages
and shows the evaluation artifact. Screenshots: the test's tmp folder, copied to artifacts/test-output/ui/.

`make test` installs chromium (apt) and playwright-core (npm, pinned in tests/ui/package.json) first
(make ui-test-setup); the test skips only where chromium or node is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "tests" / "ui"
PLAYWRIGHT_DIR = ROOT / ".cache" / "ui-test"  # gitignored
KEPT = ROOT / "artifacts" / "test-output" / "ui"  # gitignored: screenshots of the latest run
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STAGES = ["prepare-data", "base-model", "train", "evaluate", "export"]
RUN_PIPELINE = """
import json, sys
from flows.pipeline import pipeline
state = pipeline(config=json.load(open(sys.argv[1])), return_state=True)
assert state.is_completed(), state
print(state.state_details.flow_run_id)
"""


def playwright_core() -> Path:
    """playwright-core as pinned by tests/ui/package-lock.json, installed with npm when missing."""
    installed = PLAYWRIGHT_DIR / "node_modules" / "playwright-core" / "package.json"
    wanted = json.loads((UI / "package.json").read_text())["dependencies"]["playwright-core"]
    if not installed.is_file() or json.loads(installed.read_text())["version"] != wanted:
        PLAYWRIGHT_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(UI / name, PLAYWRIGHT_DIR / name)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(PLAYWRIGHT_DIR)], check=True,
                       capture_output=True, timeout=300)
    return PLAYWRIGHT_DIR


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no chromium (make ui-test-setup installs Debian's)")
@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="no node/npm (make ui-test-setup installs Debian's nodejs and npm)")
def test_the_flow_run_page_lists_the_stages_and_shows_the_evaluation(prefect_ui_server, tiny_model, tmp_path):
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?",
                                          "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n" for i in range(40)))
    config = {"data": {"source": str(source), "output_dir": str(tmp_path / "data")},
              "model": {"name_or_path": str(tiny_model), "finetune": "lora", "dtype": "float32",
                        "lora": {"target_modules": ["q_proj", "v_proj"]}},
              "grpo": {"max_steps": 2, "num_generations": 4, "per_device_train_batch_size": 4,
                       "max_completion_length": 8, "gradient_checkpointing": False, "log_completions_steps": 1,
                       "warmup": {"enabled": False}, "output_dir": str(tmp_path / "train")},
              "eval": {"max_samples": 3, "max_new_tokens": 8, "output_dir": str(tmp_path / "eval")},
              "export": {"quantizations": [], "output_dir": str(tmp_path / "export")}}
    # In a process of its own: Prefect's events client, which records task runs, is made once per
    # process and keeps the first server it was made for (the session's test harness, in a full run).
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-c", RUN_PIPELINE, str(tmp_path / "config.json")], cwd=ROOT,
                         env={**os.environ, "PREFECT_API_URL": prefect_ui_server, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    flow_run_id = run.stdout.strip().splitlines()[-1]
    run_url = prefect_ui_server.removesuffix("/api") + f"/runs/flow-run/{flow_run_id}"

    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = {**os.environ, "PLAYWRIGHT_DIR": str(playwright_core()), "CHROMIUM": CHROMIUM}
    done = subprocess.run(["node", str(UI / "check_flow_run.mjs"), run_url, str(shots), ",".join(STAGES),
                           "evaluation", "accuracy (last number),questions scored,base,trained"],
                          capture_output=True, text=True, env=env, timeout=180)
    KEPT.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copyfile(png, KEPT / png.name)
    print(f"screenshots: {shots} (copied to {KEPT})")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(seen["tasks"]) == set(STAGES)
    assert seen["title"] == f"{tiny_model.name} on questions.jsonl, steps 1-2"
    rows = [[cell.strip() for cell in r.split("\t")] for r in seen["artifact"]["rows"]]
    assert rows[0] == ["metric", "base", "trained"]
    assert ["questions scored", "3", "3"] in rows
    assert any(r[0] == "accuracy (<answer>)" for r in rows)  # the tag shows as text, not swallowed as HTML
    assert {p.name for p in shots.glob("*.png")} == {"flow-run-task-runs.png", "flow-run-evaluation.png"}
