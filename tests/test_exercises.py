"""The reading group's exercises (issue 20): exercises/check.py must pass every check against the
chapters' own functions, and fail every check on the untouched stubs with "not implemented" and on
every bug hunt with a real difference, so that no check is vacuous. (A learner who has filled in
the stubs in place will see the stub test fail: it checks the files as committed.) And each bug
hunt's effect on a short run (exercises/effects.py) must show: the bug's numbers differ from the
chapter's in the direction its docstring and the README say, by a margin."""
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("exercises_check", REPO / "exercises" / "check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

spec = importlib.util.spec_from_file_location("exercises_effects", REPO / "exercises" / "effects.py")
effects = importlib.util.module_from_spec(spec)
spec.loader.exec_module(effects)

EXERCISES = [e.name for e in check.EXERCISES]
BUGS = [b for b, _ in check.BUGS]


def test_the_kit_has_what_issue_20_asks():
    assert len(EXERCISES) >= 16 and len(BUGS) >= 6
    for piece in ("bpe_encode", "rmsnorm", "apply_rotary_emb", "repeat_kv", "feed_forward", "causal_mask", "get_lr",
                  "configure_optimizer", "encode_dialog", "masked_lm_loss", "ranking_loss", "accuracy_by_rating",
                  "combined_reward", "logit", "whiten", "kl_rewards", "gae", "ppo_policy_loss", "value_loss",
                  "best_of_k", "gatt_example"):
        assert piece in EXERCISES
    # the trackers' classics the issue names, the KL's sign and its reference among them
    assert {"bug_sft_learns_prompt", "bug_kl_sign", "bug_kl_against_the_sampler", "bug_logprobs_without_temperature",
            "bug_score_on_pad", "bug_gae_past_eos", "bug_pad_is_eos"} <= set(BUGS)


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


# --- what each bug does to a run (exercises/effects.py): the README's numbers, asserted ------------

def test_every_bug_hunt_has_an_effect():
    assert set(effects.EFFECTS) == set(BUGS)


@pytest.fixture(scope="module")
def measured():
    """Each effect measured once (the micro SFT policy they share is trained once per process)."""
    return {}


def effect(measured, name):
    if name not in measured:
        measured[name] = effects.measure(name)[0]
    return measured[name]


def test_rope_halves_spoil_trained_weights_but_not_training(measured):
    e = effect(measured, "bug_rope_rotates_halves")
    assert e["loaded"].bug > 1.2 * e["loaded"].chapter   # trained weights read with the wrong pairs
    assert abs(e["scratch"].bug - e["scratch"].chapter) < 0.25 * (e["loaded"].bug - e["loaded"].chapter)


def test_mask_without_offset_breaks_chunked_decoding(measured):
    e = effect(measured, "bug_mask_without_cache_offset")
    assert e["logit_diff"].chapter < 1e-4 and e["argmax"].chapter == 0
    assert e["logit_diff"].bug > 1.0 and e["argmax"].bug > 0.1


def test_sft_learning_the_prompt_spends_the_loss_on_it(measured):
    e = effect(measured, "bug_sft_learns_prompt")
    assert e["prompt_share"].chapter == 0 and e["prompt_share"].bug > 0.3
    assert e["prompt_loss"].bug < e["prompt_loss"].chapter / 3   # it learned to write the user's side


def test_loss_diluted_by_padding_moves_with_the_padding(measured):
    e = effect(measured, "bug_loss_diluted_by_padding")
    assert e["packed"].chapter == pytest.approx(e["padded"].chapter, rel=1e-4)
    assert e["padded"].bug < e["packed"].bug / 1.3 and e["packed"].bug < e["packed"].chapter


def test_margin_sign_separates_clear_pairs_less_than_no_margin(measured):
    e = effect(measured, "bug_margin_sign")
    assert e["gap"].bug < e["gap_no_margin"].chapter < e["gap"].chapter


def test_kl_sign_drives_the_policy_away(measured):
    e = effect(measured, "bug_kl_sign")
    assert e["kl"].bug > 3 * e["kl"].chapter


def test_kl_against_the_sampler_logs_zero_and_holds_nothing(measured):
    e = effect(measured, "bug_kl_against_the_sampler")
    assert e["logged"].bug == 0.0 and e["logged"].chapter > 0.5
    assert e["kl"].bug > 2 * e["kl"].chapter


def test_score_on_pad_loses_the_short_answers_scores(measured):
    e = effect(measured, "bug_score_on_pad")
    assert e["scored"].chapter == 1.0 and e["scored"].bug < 0.9


def test_gae_past_eos_reads_the_padding(measured):
    e = effect(measured, "bug_gae_past_eos")
    assert e["padding"].chapter == 0.0 and e["padding"].bug > 0.05


def test_logprobs_without_temperature_start_off_the_sampler(measured):
    e = effect(measured, "bug_logprobs_without_temperature")
    assert e["ratio"].chapter == pytest.approx(1.0, abs=1e-6) and e["outside_clip"].chapter == 0.0
    assert e["outside_clip"].bug > 0.1


def test_pad_is_eos_drops_every_eos(measured):
    e = effect(measured, "bug_pad_is_eos")
    assert e["eos_counted"].chapter == 1.0 and e["eos_counted"].bug == 0.0


def test_gatt_learning_every_answer_spends_the_loss_on_earlier_turns(measured):
    e = effect(measured, "bug_gatt_learns_every_answer")
    assert e["earlier_share"].chapter == 0.0 and e["earlier_share"].bug > 0.3


def test_effects_cli(capsys):
    assert effects.main(["bug_pad_is_eos"]) == 0
    out = capsys.readouterr().out
    assert "06's rollout_batch" in out and "reading:" in out
    assert effects.main(["no_such_bug"]) == 2
