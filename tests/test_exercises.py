"""The reading group's exercises (issue 20): exercises/check.py must pass every check against the
chapters' own functions, and fail every check on the untouched stubs with "not implemented" and on
every bug hunt with a real difference, so that no check is vacuous. (A learner who has filled in
the stubs in place will see the stub test fail: it checks the files as committed.)"""
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("exercises_check", REPO / "exercises" / "check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

EXERCISES = [e.name for e in check.EXERCISES]
BUGS = [b for b, _ in check.BUGS]


def test_the_kit_has_what_issue_20_asks():
    assert len(EXERCISES) >= 16 and len(BUGS) >= 6
    for piece in ("bpe_encode", "rmsnorm", "apply_rotary_emb", "repeat_kv", "feed_forward", "causal_mask", "get_lr",
                  "configure_optimizer", "encode_dialog", "masked_lm_loss", "ranking_loss", "accuracy_by_rating",
                  "combined_reward", "logit", "whiten", "kl_rewards", "gae", "ppo_policy_loss", "value_loss",
                  "best_of_k", "gatt_example"):
        assert piece in EXERCISES


def test_solutions_pass_every_check():
    failed = [(name, message) for name, passed, message in check.run_all(solutions=True) if not passed]
    assert not failed


def test_untouched_stubs_fail_every_check_as_not_implemented():
    for name, passed, message in check.run_all(EXERCISES):
        ex = check.BY_NAME[name]
        assert not passed and message.startswith("not implemented") and ex.attr in message, (name, message)


def test_every_bug_hunt_is_caught_by_its_check():
    for name, passed, message in check.run_all(BUGS):
        assert not passed, name
        # a difference the check found, not a crash and not a missing implementation
        assert not message.startswith(("not implemented", "raised")) and "expected" in message, (name, message)


def test_stubs_and_bug_hunts_have_the_chapters_signatures():
    for name in EXERCISES + BUGS:
        ex = check.BY_NAME[name]
        mine, chapter = ex.learner(), ex.reference()
        if inspect.isclass(chapter):
            mine, chapter = mine.__init__, chapter.__init__
        assert inspect.signature(mine) == inspect.signature(chapter), name
        if name in EXERCISES:
            assert "Hint:" in (ex.learner().__doc__ or ""), name


def test_the_cli_ends_with_the_count(capsys):
    assert check.main(["best_of_k", "--no-tests"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "0 passed, 1 failed" and any(line.strip().startswith("hint:") for line in out)
    assert check.main(["best_of_k", "bug_kl_sign", "--solutions"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "2 passed, 0 failed"
    assert check.main(["no_such_exercise"]) == 2


def test_no_chapter_imports_from_exercises():
    for path in sorted(REPO.glob("0[1-7]_*.py")) + [REPO / "pipeline.py"]:
        assert not re.search(r"^\s*(import|from)\s+exercises|import_module\(['\"]exercises", path.read_text(),
                             re.M), path.name


@pytest.mark.parametrize("name", ["gae"])
def test_a_pass_says_what_to_run(name, capsys):
    assert check.main([name, "--solutions", "--no-tests"]) == 0
    assert "now you can run:" in capsys.readouterr().out
