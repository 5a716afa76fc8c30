"""Crash safety in CI: the runner killed with SIGKILL at four chosen moments (training, evaluation, a results write,
the manifest write), then rerun: every unit ends with exactly one valid results file and the same results as an
uninterrupted run. `python tests/crash_harness.py --kills 24` runs the full set with random kills too."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from crash_harness import campaign, TARGETS  # noqa: E402


def test_sigkill_at_chosen_moments_loses_and_duplicates_nothing(tmp_path, tiny_release):
    res = campaign(tmp_path / "crash", tiny_release[0], kills=len(TARGETS), log=lambda *_: None)
    assert res["targeted_landed"] == len(TARGETS), [(e["crash"], e["rc"], e["stderr_tail"]) for e in res["events"]]
    assert res["units"] == 4
