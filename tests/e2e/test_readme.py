"""The README's one-box walkthrough runs as written, against a real Mosquitto, and its transcripts
are that run's (``scripts/update-readme.sh`` regenerates them)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.readme_walkthrough import README, STOP_ALL, Walkthrough, failures, parse, run, transcript

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def walkthrough(mosquitto, tmp_path_factory, data_dir) -> Walkthrough:
    if not (data_dir / "skab").is_dir() or not (data_dir / "magnetic-tile").is_dir():
        pytest.skip(f"the walkthrough evaluates on the shared data, absent from {data_dir}")
    return run(parse(README.read_text()), f"{mosquitto.host}:{mosquitto.port}", tmp_path_factory.mktemp("readme"))


def test_every_command_exits_as_the_readme_says(walkthrough):
    assert walkthrough.results, "no walkthrough commands found in README.md"
    problems = failures(walkthrough)
    assert not problems, "\n\n".join(problems)


def test_the_transcripts_in_the_readme_show_the_commands_as_written(walkthrough):
    """A command changed without regenerating its transcript leaves a stale figure behind."""
    lines = README.read_text().splitlines()
    for block in walkthrough.blocks:
        if block.output_lines is None:
            continue
        shown = [line for line in lines[slice(*block.output_lines)] if line.startswith("$ ")]
        ran = [line for line in transcript(block, walkthrough.results) if line.startswith("$ ")]
        assert shown == ran, "README transcript out of date: run scripts/update-readme.sh"


def test_the_demo_delivers_results(walkthrough):
    summary = walkthrough.result("edgeline demo").output
    results = re.search(r"^results (\d+)", summary, re.MULTILINE)
    assert results and int(results.group(1)) > 0, summary


def test_config_check_accepts_the_one_box_file_and_names_each_problem_of_the_broken_one(walkthrough):
    assert "OK" in walkthrough.result("edgeline config check config/one-box.yaml").output
    broken = walkthrough.result("edgeline config check config/examples/broken-site.yaml")
    assert broken.exit_code == 2
    assert re.search(r"machines\[\d+\]\.cameras\[\d+\]\.models: at most 2 models", broken.output), broken.output


def test_a_rollout_succeeds_and_one_is_rolled_back_on_purpose(walkthrough):
    good = walkthrough.result("edgeline central rollout --package seg-synth-1.0.0-fp32")
    assert "completed" in good.output, good.output
    refused = walkthrough.result("edgeline central rollout --package seg-synth-1.0.0-int8")
    assert "rolled_back" in refused.output and "gate drift" in refused.output, refused.output


def test_the_services_shut_down_in_order(walkthrough):
    stopped = walkthrough.result(STOP_ALL)
    assert stopped.exit_code == 0, stopped.output


def test_grafana_and_the_model_evaluations_print_their_figures(walkthrough):
    assert walkthrough.result("edgeline grafana build").output.count("wrote ") >= 5
    skab_output = walkthrough.result("edgeline models eval-skab").output
    assert re.search(r"pooled F1 0\.\d+", skab_output)
    assert re.search(r"cross-validated when the package was built .*: F1 0\.\d{3}, FAR 0\.\d{3}", skab_output)
    assert re.search(r"\biou\b.*0\.\d+", walkthrough.result("edgeline models eval-seg").output)
