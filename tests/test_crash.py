"""Crash safety: the runner killed with SIGKILL, then rerun: every unit ends with exactly one valid results file and
the same results (test metrics, dev losses) as an uninterrupted run. CI runs a sample — the four chosen moments
(training, evaluation, a results write, the manifest write); `pytest --campaign` (or CLINICAL_REPRO_FULL_CAMPAIGNS=1)
runs the full set, 24 kills with random ones too, and compares the summary tables as well (also
`python tests/crash_harness.py --kills 24`).

The uninterrupted reference run doubles as governance's network check: it runs the demo models (fine-tuning and
ICL) and its summary with the network blocked and the Hugging Face offline switches unset, and nothing may try."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from crash_harness import campaign, TARGETS  # noqa: E402

FULL_KILLS = 24


def test_sigkill_at_chosen_moments_loses_and_duplicates_nothing(tmp_path, tiny_release):
    res = campaign(tmp_path / "crash", tiny_release[0], kills=len(TARGETS), log=lambda *_: None)
    assert res["targeted_landed"] == len(TARGETS), [(e["crash"], e["rc"], e["stderr_tail"]) for e in res["events"]]
    assert res["units"] == 4
    assert res["network_attempts"] == "", res["network_attempts"]
    assert res["network_guarded_processes"] >= 5   # the runner, its two kernels, `summarize` and its kernel


@pytest.mark.campaign
def test_full_crash_campaign_with_random_kills(tmp_path, tiny_release):
    res = campaign(tmp_path / "crash", tiny_release[0], kills=FULL_KILLS, log=print)
    assert res["kills_tried"] == FULL_KILLS and res["targeted_landed"] == len(TARGETS), res
    assert res["random_landed"] > 0 and res["units"] == 4
