"""How rl_step assembles the loss: rollouts and rewards scripted (tests/scripted_step.py), the rows
it trains on captured, and each checked against what the method sheet says they must be, computed
here independently: the KD target (the correct guided rollout with the highest mean unguided
log-prob), its prompts and weight alpha(q) / (|target| x global problems), the alpha table over
visits, GRPO advantages and weights 1 / (global autonomous tokens), gold answers aligned with their
rollouts, and the ablation flags. tests/mutants.py applies plausible wiring bugs to a copy of the
code and checks that these tests catch each one."""

import itertools
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

import engine
import sgpo
from tests.conftest import tiny_rows, tiny_setup
from tests.scripted_step import Script, script_problem, scripted, setting_dir


@torch.no_grad()
def token_logps(model, prompt, response, temperature):
    """[len(response)] log p(y_t | prompt, y_<t) of logits / temperature, one plain forward."""
    logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    log_p = logits[len(prompt) - 1:-1].log_softmax(-1)  # [T, V]
    return log_p.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@torch.no_grad()
def divergence(model, prompts, response, cfg):
    """[len(response)] D_t between the student (prompts[0]) and the teacher (prompts[1]) on the
    same response: KL(teacher || student) for fkl, KL(student || teacher) for rkl."""
    log_p = []
    for prompt in prompts:
        logits = model(torch.tensor([prompt + response])).logits[0].float() / cfg.temperature
        log_p.append(logits[len(prompt) - 1:-1].log_softmax(-1))  # [T, V]
    student, teacher = log_p
    if cfg.kd_loss == "rkl":
        teacher, student = student, teacher
    return (teacher.exp() * (teacher - student)).sum(-1)


def advantages(correct):
    """GRPO's group-normalised advantages, by hand: (r - mean) / (sample std + 1e-4)."""
    mean = statistics.mean(correct)
    std = statistics.stdev(correct)
    return [(r - mean) / (std + 1e-4) for r in correct]


def setup(n, g1, g2, **flags):
    """n problems, G1, G2, Config flags; the tiny model with weights of std 0.2 (HF's 0.02 leaves
    its distributions nearly uniform and the two prompts' nearly equal)."""
    tok, model, cfg = tiny_setup()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    cfg.num_generations, cfg.num_guided_generations = g1, g2
    for k, v in flags.items():
        setattr(cfg, k, v)
    policy = sgpo.Policy.of(model, tok, "cpu")
    return tiny_rows(n), policy, sgpo.make_optimizer(model, 1e-3, cfg), cfg


def guided_candidates(script, policy, cfg, q, rng):
    """Four guided responses of q, one wrong, chosen so that every plausible mis-selection picks
    another one than the right target: the most likely by the sum of log-probs, or under the
    guided prompt, the first correct one, and the wrong one (more likely than the target).
    Returns (responses, index of the target)."""
    auto, guided = (engine.prompt_ids(policy.tokenizer, cfg, q, g) for g in (False, True))
    pool = {True: [], False: []}  # correct -> [(response, mean, sum, mean under guided)]
    for _ in range(40):
        letters = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12)))
        for correct in (True, False):
            r = script.response(q, letters, correct)
            unguided = token_logps(policy.lm, auto, r, cfg.temperature)
            under_guided = token_logps(policy.lm, guided, r, cfg.temperature)
            pool[correct].append((r, unguided.mean(), unguided.sum(), under_guided.mean()))
        for trio in itertools.combinations(pool[True], 3):
            target = max(trio, key=lambda c: c[1])
            if target in (max(trio, key=lambda c: c[2]), max(trio, key=lambda c: c[3])):
                continue
            wrong = [c for c in pool[False] if c[1] > target[1]]
            if wrong:
                others = [c for c in trio if c is not target]
                return [c[0] for c in (others[0], wrong[0], others[1], target)], 3
    raise AssertionError("no candidate set separates the selection rules")


def test_kd_and_grpo_rows_are_what_the_sheet_says():
    """One step, 4 problems with both signs of the pass gap: every KD row's student prompt, teacher
    prompt, target and weight, every GRPO row's response, advantage and weight, the alpha table,
    and the (text, gold answer) pairs the grader saw."""
    problems, policy, opt, cfg = setup(4, g1=4, g2=4)
    tok, rng = policy.tokenizer, random.Random(0)
    script = Script(tok)
    auto_correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]]
    expected_kd, expected_grpo = {}, []
    for q, correct in zip(problems, auto_correct):
        auto_responses, _ = script_problem(script, cfg, q, correct, [], rng)
        candidates, target = guided_candidates(script, policy, cfg, q, rng)
        script.add(engine.prompt_ids(tok, cfg, q, True), candidates)
        # pass gap 0.75 - p_auto: > 0 -> alpha 0.5 + 0.1, else 0.5 - 0.1
        alpha = 0.6 if 0.75 > statistics.mean(correct) else 0.4
        expected_kd[q["id"]] = (candidates[target], alpha / (len(candidates[target]) * 4))
        for response, advantage in zip(auto_responses, advantages(correct)):
            expected_grpo.append((q["id"], response, advantage))
    alpha_table = {}
    with scripted(script) as captured:
        sgpo.rl_step(problems, policy, opt, alpha_table, cfg, script.grade)
    (rows,) = captured
    assert alpha_table == pytest.approx({"q0": 0.6, "q1": 0.4, "q2": 0.6, "q3": 0.4})
    # the grader saw each rollout with its own problem's answer
    answer_of = {q["id"]: q["answer"] for q in problems}
    assert len(script.graded) == 4 * (4 + 4)
    assert all(answer == answer_of[text.split(":")[0]] for text, answer in script.graded)

    by_prompt = {tuple(engine.prompt_ids(tok, cfg, q, False)): q for q in problems}
    kd = [r for r in rows if isinstance(r, sgpo.KDRow)]
    assert sorted(by_prompt[tuple(r.prompt)]["id"] for r in kd) == ["q0", "q1", "q2", "q3"]
    for r in kd:
        q = by_prompt[tuple(r.prompt)]
        assert r.teacher_prompt == engine.prompt_ids(tok, cfg, q, True)
        target, weight = expected_kd[q["id"]]
        assert r.response == target, q["id"]
        assert r.weight == pytest.approx(weight, rel=1e-12), q["id"]

    grpo = [r for r in rows if isinstance(r, sgpo.GRPORow)]
    n_tokens = sum(len(response) for _, response, _ in expected_grpo)
    assert len(grpo) == len(expected_grpo) == 16
    for r, (qid, response, advantage) in zip(grpo, expected_grpo):
        assert by_prompt[tuple(r.prompt)]["id"] == qid
        assert r.response == response
        assert r.advantage == pytest.approx(advantage, abs=1e-6)
        assert r.weight == pytest.approx(1 / n_tokens, rel=1e-12)


def queue_visit(script, cfg, problems, pattern, rng) -> dict:
    """Queues one visit's rollouts of each problem, (autonomous, guided) correctness from pattern;
    returns each problem's first correct guided rollout by id."""
    targets = {}
    for q, (auto_correct, guided_correct) in zip(problems, pattern):
        _, guided = script_problem(script, cfg, q, auto_correct, guided_correct, rng)
        targets[q["id"]] = guided[guided_correct.index(1)]
    return targets


def test_alpha_table_over_visits():
    """Three problems visited six times with fixed pass rates: the gap > 0 climbs by gamma to the
    cap, < 0 falls to the floor, = 0 falls too (the rule moves up only on a positive gap); each
    step's KD weight reads the table as updated in that step."""
    problems, policy, opt, cfg = setup(3, g1=4, g2=2)
    script, rng = Script(policy.tokenizer), random.Random(1)
    # (autonomous, guided) correctness: gaps +0.25, -0.5, 0
    pattern = [([1, 0, 0, 0], [1, 0]), ([1, 1, 1, 1], [0, 1]), ([1, 1, 0, 0], [1, 0])]
    expected = {"q0": [0.6, 0.7, 0.8, 0.8, 0.8, 0.8], "q1": [0.4, 0.3, 0.2, 0.1, 0.0, 0.0],
                "q2": [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]}
    alpha = {}
    for step in range(6):
        targets = queue_visit(script, cfg, problems, pattern, rng)
        with scripted(script) as captured:
            sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
        for qid, values in expected.items():
            assert alpha[qid] == pytest.approx(values[step], abs=1e-12), (qid, step)
        kd = [r for r in captured[0] if isinstance(r, sgpo.KDRow)]
        for q in problems:
            row = next(r for r in kd if r.response == targets[q["id"]])
            weight = expected[q["id"]][step] / (len(row.response) * 3)
            assert row.weight == pytest.approx(weight, abs=1e-15), (q["id"], step)


def test_fixed_alpha_stays_alpha_0():
    problems, policy, opt, cfg = setup(2, g1=2, g2=2, adaptive_alpha=False, alpha_0=0.3)
    script, rng = Script(policy.tokenizer), random.Random(2)
    alpha = {}
    for _ in range(2):
        for q in problems:
            script_problem(script, cfg, q, [1, 0], [1, 1], rng)
        with scripted(script) as captured:
            sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
    assert alpha == {"q0": 0.3, "q1": 0.3}
    assert all(r.weight == pytest.approx(0.3 / (len(r.response) * 2), rel=1e-12)
               for r in captured[0] if isinstance(r, sgpo.KDRow))


def test_without_target_selection_a_random_correct_rollout():
    """--target_selection false: no scoring pass; each target a correct rollout, and over 16
    problems neither always the first correct one nor always the most likely one."""
    problems, policy, opt, cfg = setup(16, g1=2, g2=4, target_selection=False)
    tok, rng = policy.tokenizer, random.Random(3)
    script = Script(tok)
    firsts, most_likely, correct_sets = {}, {}, {}
    for q in problems:
        wrong = rng.randrange(4)
        _, guided = script_problem(script, cfg, q, [1, 0], [j != wrong for j in range(4)], rng)
        correct = [guided[j] for j in range(4) if j != wrong]
        auto = engine.prompt_ids(tok, cfg, q, False)
        firsts[q["id"]], correct_sets[q["id"]] = correct[0], correct
        most_likely[q["id"]] = max(
            correct, key=lambda r: token_logps(policy.lm, auto, r, cfg.temperature).mean())

    def no_scoring(*args):
        raise AssertionError("a scoring pass without target selection")

    torch.manual_seed(0)
    with scripted(script) as captured, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sgpo, "target_scores", no_scoring)
        sgpo.rl_step(problems, policy, opt, {}, cfg, script.grade)
    by_id = {tuple(engine.prompt_ids(tok, cfg, q, False)): q["id"] for q in problems}
    chosen = {by_id[tuple(r.prompt)]: r.response
              for r in captured[0] if isinstance(r, sgpo.KDRow)}
    assert len(chosen) == 16
    assert all(chosen[qid] in correct_sets[qid] for qid in chosen)
    # a uniform pick of 1 in 3 agrees with a fixed choice 16 times in (1/3)^16
    assert 0 < sum(chosen[qid] == firsts[qid] for qid in chosen) < 16
    assert 0 < sum(chosen[qid] == most_likely[qid] for qid in chosen) < 16


@pytest.mark.parametrize("kd_loss", ["fkl", "rkl", "sft"])
def test_kd_term_is_the_divergence_the_flag_names(kd_loss):
    """One step trained on scripted rollouts: kd/kl_mean is the mean over the KD tokens of the
    flag's divergence between the unguided student and the guided teacher, and loss/kd is
    sum_t w_t min(D_t, delta) (sft: w_t * -log p), computed here by plain forwards."""
    problems, policy, opt, cfg = setup(3, g1=2, g2=2, kd_loss=kd_loss, kl_clip=2.0)
    tok, rng = policy.tokenizer, random.Random(4)
    script = Script(tok)
    divs, other_divs, losses = [], [], []
    other = dict(fkl="rkl", rkl="fkl", sft="fkl")[kd_loss]
    for q, (auto_correct, guided_correct) in zip(problems, [([1, 0], [0, 1]), ([1, 1], [1, 0]),
                                                            ([0, 0], [1, 1])]):
        _, guided = script_problem(script, cfg, q, auto_correct, guided_correct, rng)
        prompts = [engine.prompt_ids(tok, cfg, q, g) for g in (False, True)]
        scores = [token_logps(policy.lm, prompts[0], r, cfg.temperature) for r in guided]
        j = max((j for j in range(2) if guided_correct[j]), key=lambda j: scores[j].mean())
        alpha = 0.6 if statistics.mean(guided_correct) > statistics.mean(auto_correct) else 0.4
        weight = alpha / (len(guided[j]) * 3)
        div = divergence(policy.lm, prompts, guided[j], cfg)
        other_divs.append(divergence(policy.lm, prompts, guided[j], sgpo.Config(
            temperature=cfg.temperature, kd_loss=other)))
        token_loss = -scores[j] if kd_loss == "sft" else div.clamp(max=2.0)
        divs.append(div)
        losses.append(weight * token_loss.sum())
    with scripted(script, train=True):
        metrics, _ = sgpo.rl_step(problems, policy, opt, {}, cfg, script.grade)
    expected_div = 0.0 if kd_loss == "sft" else torch.cat(divs).mean().item()
    assert metrics["kd/kl_mean"] == pytest.approx(expected_div, rel=1e-4, abs=1e-7)
    assert metrics["loss/kd"] == pytest.approx(sum(losses).item(), rel=1e-4)
    # the other direction differs by 100x the tolerance (2 % here): the check tells them apart
    other_div = torch.cat(other_divs).mean().item()
    assert abs(other_div - metrics["kd/kl_mean"]) > 1e-2 * other_div


@pytest.mark.parametrize("flag", ["use_grpo", "use_kd"])
def test_switched_off_terms_make_no_rows(flag):
    problems, policy, opt, cfg = setup(2, g1=2, g2=2, **{flag: False})
    script, rng = Script(policy.tokenizer), random.Random(5)
    for q in problems:
        script_problem(script, cfg, q, [1, 0], [1, 1], rng)
    with scripted(script) as captured:
        sgpo.rl_step(problems, policy, opt, {}, cfg, script.grade)
    kinds = {type(r).__name__ for r in captured[0]}
    assert kinds == ({"KDRow"} if flag == "use_grpo" else {"GRPORow"})


def test_weights_are_global_over_two_ranks(scripted_two_ranks):
    """torchrun, 2 ranks, 2 problems each, rank 1's responses 5 tokens longer: every GRPO token
    weighs 1 / (autonomous tokens of BOTH ranks), every KD row alpha(q) / (|target| x 4)."""
    out = Path(setting_dir(scripted_two_ranks, ""))
    ranks = [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]
    for rank in ranks:
        (rank["rows"],) = rank["rows"]  # one accumulate_gradients call
    rows = ranks[0]["rows"] + ranks[1]["rows"]
    grpo = [r for r in rows if r["kind"] == "grpo"]
    lengths = [sum(r["length"] for r in rank["rows"] if r["kind"] == "grpo") for rank in ranks]
    assert len(grpo) == 16 and lengths[0] != lengths[1]
    for r in grpo:
        assert r["weight"] == pytest.approx(1 / sum(lengths), rel=1e-12)
    # the alpha tables are the same on both ranks and hold all four problems
    assert ranks[0]["alpha"] == ranks[1]["alpha"]
    alpha = ranks[0]["alpha"]
    assert alpha == pytest.approx({"q0": 0.6, "q1": 0.4, "q2": 0.6, "q3": 0.4})
    kd = [r for r in rows if r["kind"] == "kd"]
    assert sorted(r["id"] for r in kd) == ["q0", "q1", "q2", "q3"]
    for r in kd:
        assert r["weight"] == pytest.approx(alpha[r["id"]] / (r["length"] * 4), rel=1e-12)


def test_each_mutant_of_tests_mutants_still_applies():
    """tests/mutants.py edits the code as written: each bug's code occurs exactly once."""
    from tests.mutants import MUTANTS, ROOT, apply

    for name, (file, code, bug) in MUTANTS.items():
        assert apply((ROOT / file).read_text(), code, bug) != (ROOT / file).read_text(), name


def test_target_score_sum_picks_the_most_likely_sequence():
    """--target_score sum (R): the correct guided rollout with the largest sum of unguided
    log-probs, which guided_candidates makes another one than the mean's choice."""
    problems, policy, opt, cfg = setup(2, g1=2, g2=4, target_score="sum")
    tok, rng = policy.tokenizer, random.Random(5)
    script, expected = Script(tok), {}
    for q in problems:
        script_problem(script, cfg, q, [1, 0], [], rng)
        candidates, target = guided_candidates(script, policy, cfg, q, rng)
        script.add(engine.prompt_ids(tok, cfg, q, True), candidates)
        auto = engine.prompt_ids(tok, cfg, q, False)
        correct = [r for j, r in enumerate(candidates) if j != 1]  # [1] is the wrong one
        best = max(correct, key=lambda r: token_logps(policy.lm, auto, r, cfg.temperature).sum())
        assert best != candidates[target]
        expected[tuple(auto)] = best
    with scripted(script) as captured:
        sgpo.rl_step(problems, policy, opt, {}, cfg, script.grade)
    kd = [r for r in captured[0] if isinstance(r, sgpo.KDRow)]
    assert {tuple(r.prompt): r.response for r in kd} == expected


def test_alpha_update_after_weighs_the_previous_value():
    """--alpha_update after (R): each step's KD weight reads alpha as earlier visits left it
    (alpha_0 on the first), the table then moves as before."""
    problems, policy, opt, cfg = setup(2, g1=4, g2=2, alpha_update="after")
    script, rng = Script(policy.tokenizer), random.Random(6)
    # gaps +0.25 and -0.5
    pattern = [([1, 0, 0, 0], [1, 0]), ([1, 1, 1, 1], [0, 1])]
    read = {"q0": [0.5, 0.6, 0.7], "q1": [0.5, 0.4, 0.3]}
    after = {"q0": [0.6, 0.7, 0.8], "q1": [0.4, 0.3, 0.2]}
    alpha = {}
    for step in range(3):
        targets = queue_visit(script, cfg, problems, pattern, rng)
        with scripted(script) as captured:
            sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
        kd = [r for r in captured[0] if isinstance(r, sgpo.KDRow)]
        for q in problems:
            row = next(r for r in kd if r.response == targets[q["id"]])
            weight = read[q["id"]][step] / (len(row.response) * 2)
            assert row.weight == pytest.approx(weight, abs=1e-15), (q["id"], step)
            assert alpha[q["id"]] == pytest.approx(after[q["id"]][step], abs=1e-12)
