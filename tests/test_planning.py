"""`--minutes`: the plan fits the budget, scales the configured recipe, and is made once per run directory."""

import json
import math
import time
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from privimage import planning
from privimage.config import load_config
from privimage.errors import UserError
from privimage.builders import MODEL_FILE
from privimage.checkpoint import load_checkpoint
from privimage.pipeline import Pipeline
from privimage.stages import pretrain as pretrain_stage
from privimage.stages import report as report_stage

THROUGHPUT = {"pretrain_step": 0.12, "dp_sample": 0.006, "denoiser_image": 0.0008, "classifier_cnn_image_epoch": 0.0005,
              "classifier_resnet_image_epoch": 0.0015, "inception_image": 0.15}  # about a 2-core machine


def opened(cfg, out) -> Pipeline:
    """Validate, then lock and create the run directory, as the CLI does."""
    return Pipeline(cfg, out).validate().create()


def test_plan_scales_the_recipe_to_fit_the_seconds_left():
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0,
                              uses_pretraining=True, num_samples=4000)
    assert sum(plan.expected_seconds.values()) <= 900.0
    assert sum(plan.expected_seconds.values()) >= planning.SAFETY * 900.0 - 5  # and uses it (less a step)
    configured = cfg.pretrain.steps / cfg.finetune.steps
    assert plan.pretrain_steps / plan.finetune_steps == pytest.approx(configured, rel=0.05)
    faster = planning.make_plan(cfg, {k: v / 2 for k, v in THROUGHPUT.items()}, 900.0, semantics_seconds=30.0,
                                uses_pretraining=True, num_samples=4000)
    assert faster.finetune_steps > 2 * plan.finetune_steps  # a machine twice as fast trains more than twice as long


def test_the_warm_start_generator_is_planned_at_its_configured_steps():
    cfg = load_config(None, None, ["minutes=15"])
    common = dict(semantics_seconds=60.0, uses_pretraining=True, num_samples=4000)
    without = planning.make_plan(cfg, THROUGHPUT, 900.0, **common)
    plan = planning.make_plan(cfg, {**THROUGHPUT, "generator_step": 0.2}, 900.0, **common)
    assert plan.expected_seconds["warmstart"] == pytest.approx(0.2 * cfg.warm_start.generator_steps)
    assert "warmstart" not in without.expected_seconds and plan.pretrain_steps < without.pretrain_steps
    # the synthetic images that start from its generator's are redrawn in sample.warm_start_steps, not sample.steps
    s = cfg.sample
    calls = {steps: 2 * (2 * steps - 1) for steps in (s.steps, s.warm_start_steps)}  # Heun, with guidance
    assert s.solver == "heun" and s.guidance and s.warm_start_sigma is not None and s.warm_start_steps < s.steps
    share = s.warm_start_share
    assert plan.expected_seconds["sample"] == pytest.approx(without.expected_seconds["sample"] * (
        (1 - share) + share * calls[s.warm_start_steps] / calls[s.steps]))
    assert sum(plan.expected_seconds.values()) <= 900.0


def test_optional_evaluation_is_trimmed_while_the_recipe_does_not_fit_then_the_run_refuses_naming_the_minutes():
    cfg = load_config(None, None, ["minutes=15", "evaluate.reference=true"])
    common = dict(uses_pretraining=True, num_samples=4000)
    roomy = planning.make_plan(cfg, THROUGHPUT, 3600.0, semantics_seconds=60.0, **common)
    assert roomy.evaluation == {} and roomy.pretrain_steps >= cfg.pretrain.steps  # the recipe fits beside it all
    slow = {k: 2.5 * v for k, v in THROUGHPUT.items()}  # a machine 2.5x slower
    trimmed = planning.make_plan(cfg, slow, 900.0, semantics_seconds=150.0, **common)
    assert trimmed.pretrain_steps < cfg.pretrain.steps  # trimmed because the recipe did not fit ...
    assert list(trimmed.evaluation) == list(planning.EVALUATION_TRIMS)[:len(trimmed.evaluation)]  # ... in order
    assert trimmed.evaluation["reference"] is False
    assert trimmed.pretrain_steps >= cfg.pretrain.min_steps and trimmed.finetune_steps >= cfg.finetune.min_steps
    assert trimmed.overrides()["evaluate"] == trimmed.evaluation
    assert sum(trimmed.expected_seconds.values()) <= 900.0
    with pytest.raises(UserError, match=r"--minutes (\d+)") as refused:
        planning.make_plan(cfg, {k: 8 * v for k, v in THROUGHPUT.items()}, 900.0, semantics_seconds=480.0,
                           uses_pretraining=True, num_samples=4000)
    needed = int(str(refused.value).rsplit(" ", 1)[1])
    assert needed > 15
    enough = planning.make_plan(load_config(None, None, [f"minutes={needed}"]), {k: 8 * v for k, v in THROUGHPUT.items()},
                                60.0 * needed, semantics_seconds=480.0, uses_pretraining=True, num_samples=4000)
    assert enough.pretrain_steps >= cfg.pretrain.min_steps  # the minutes it names are enough


def test_a_step_count_under_its_floor_is_raised_to_it_and_the_other_takes_the_rest():
    cfg = load_config(None, None, ["minutes=15", "pretrain.steps=100000", "finetune.steps=20", "finetune.min_steps=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, uses_pretraining=True,
                              num_samples=4000)
    assert plan.finetune_steps == 15 and plan.pretrain_steps > cfg.pretrain.min_steps
    assert sum(plan.expected_seconds.values()) <= 900.0


def test_the_plan_is_made_before_the_data_is_touched_and_kept_by_the_run_directory(tmp_path, cache_dir, monkeypatch):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30"])
    pipeline = opened(cfg, tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert pipeline.cfg.pretrain.steps == plan["pretrain_steps"] >= 1
    assert pipeline.cfg.finetune.steps == plan["finetune_steps"] >= 1
    assert set(plan["throughput"]) >= {"pretrain_step", "dp_sample", "denoiser_image", "generator_step"}
    assert "warmstart" in plan["expected_seconds"]  # the warm start's generator is planned too
    booked = pipeline.planned_mechanisms()[-1]
    assert booked.steps == plan["finetune_steps"]  # σ is calibrated for the planned T
    pipeline.close()

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run must keep its plan, not probe again")

    monkeypatch.setattr("privimage.pipeline.probe", no_probe)
    again = opened(load_config(None, None, [], saved=tmp_path / "run" / "config.yaml"), tmp_path / "run")
    assert again.cfg.finetune.steps == plan["finetune_steps"]
    again.close()


def test_evaluation_is_planned_for_every_classifier_it_trains():
    plain = load_config(None, None, ["evaluate.augment=0", "evaluate.reference=false"])
    every = load_config(None, None, ["evaluate.augment=1", "evaluate.reference=true"])
    assert planning.evaluations_per_classifier(plain) == 1 and planning.evaluations_per_classifier(every) == 3


def test_pretraining_is_planned_again_to_the_seconds_left_and_the_rest_as_before():
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0,
                              uses_pretraining=True, num_samples=4000)
    after = sum(plan.expected_seconds[s] for s in ("finetune", "sample", "evaluate", "report"))
    as_planned = {"semantics": plan.expected_seconds["semantics"]}
    for seconds_left in (500.0, 700.0):
        again = planning.replan_pretraining(plan, seconds_left, as_planned)
        assert again.finetune_steps == plan.finetune_steps  # DP-SGD's T, and so σ, never move
        assert again.replanned_seconds_left == seconds_left and again.slowdown == 1.0
        used = again.pretrain_steps * THROUGHPUT["pretrain_step"] + after
        assert planning.REPLAN_SAFETY * seconds_left - THROUGHPUT["pretrain_step"] < used <= planning.REPLAN_SAFETY * seconds_left
    assert (planning.replan_pretraining(plan, 700.0, as_planned).pretrain_steps
            > planning.replan_pretraining(plan, 500.0, as_planned).pretrain_steps)
    assert planning.replan_pretraining(plan, 1.0, as_planned).pretrain_steps == plan.pretrain_floor  # a late run still learns


def test_the_replan_expects_the_rest_as_much_slower_as_the_stages_run_so_far():
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0,
                              uses_pretraining=True, num_samples=4000)
    after = ("finetune", "sample", "evaluate", "report")
    slow = planning.replan_pretraining(plan, 700.0, {"semantics": 90.0})  # 1.5x the 60 s planned
    assert slow.slowdown == pytest.approx(1.5)
    for stage in after:
        assert slow.expected_seconds[stage] == pytest.approx(1.5 * plan.expected_seconds[stage])
    used = slow.pretrain_steps * 1.5 * THROUGHPUT["pretrain_step"] + sum(slow.expected_seconds[s] for s in after)
    assert used <= planning.REPLAN_SAFETY * 700.0
    fast = planning.replan_pretraining(plan, 700.0, {"semantics": 30.0})  # faster than planned: no credit
    assert fast.slowdown == 1.0 and fast.pretrain_steps > slow.pretrain_steps
    assert fast.pretrain_steps == planning.replan_pretraining(plan, 700.0, {"semantics": 60.0}).pretrain_steps


def test_the_replan_happens_once_per_run_directory_before_pretraining_starts(tmp_path, cache_dir, monkeypatch):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30"])
    pipeline = opened(cfg, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert first["replanned_seconds_left"] is None
    with pipeline.clock.reading_sensitive(planned_seconds=60):  # a minute spent on the stages before pretraining
        pass
    pipeline._replan_pretraining()
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["replanned_seconds_left"] < 29 * 60
    assert pipeline.cfg.pretrain.steps == plan["pretrain_steps"] != first["pretrain_steps"]
    assert plan["finetune_steps"] == first["finetune_steps"]
    saved = load_config(None, None, [], saved=tmp_path / "run" / "config.yaml")
    assert saved.pretrain.steps == plan["pretrain_steps"]
    pipeline.close()

    def no_replan(*args, **kwargs):
        raise AssertionError("a resumed run keeps its replanned steps")

    monkeypatch.setattr("privimage.pipeline.replan_pretraining", no_replan)
    again = opened(saved, tmp_path / "run")
    again._replan_pretraining()
    assert again.cfg.pretrain.steps == plan["pretrain_steps"]
    again.close()


def test_a_run_validated_long_before_it_starts_still_gets_its_whole_budget(tmp_path, cache_dir, monkeypatch):
    """`privimage bench` validates every run first; before this fix a later run found its minutes spent by
    the runs before it and pretrained for one step."""
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30"])
    pipeline = Pipeline(cfg, tmp_path / "run").validate()
    left = pipeline.seconds_left()
    clock = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: clock() + 3600)  # an hour of other runs
    pipeline.create()
    assert pipeline.seconds_left() == pytest.approx(left, abs=5)
    pipeline._replan_pretraining()
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["replanned_seconds_left"] > left - 60
    pipeline.close()


def replanned_with_800_seconds_left():
    """The default's plan, replanned with 800 s left: it, its planned step, the stages after pretraining's
    seconds, the stop margin and half its pretraining steps."""
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0,
                              uses_pretraining=True, num_samples=4000)
    plan = planning.replan_pretraining(plan, 800.0, {"semantics": plan.expected_seconds["semantics"]})
    after = sum(plan.expected_seconds[s] for s in planning.AFTER_PRETRAINING)
    return (plan, plan.expected_seconds["pretrain"] / plan.pretrain_steps, after,
            planning.STOP_MARGIN * 60 * plan.minutes, plan.pretrain_steps // 2)


def test_pretraining_stops_early_only_when_its_own_pace_leaves_no_time_for_the_stages_after_it():
    plan, step, after, margin, half = replanned_with_800_seconds_left()

    def target(seconds_left, seconds_timed, may_extend=False):
        return planning.pretraining_target(plan, seconds_left, half, half, seconds_timed, may_extend=may_extend)

    # On the planned pace, the replan's spare seconds are still there at the last step: no stop.
    at_the_end = 800.0 - plan.expected_seconds["pretrain"]
    assert planning.pretraining_target(plan, at_the_end, plan.pretrain_steps, plan.pretrain_steps,
                                       plan.expected_seconds["pretrain"], may_extend=False) == plan.pretrain_steps
    # 1.3x slower: the stages after it are expected 1.3x slower too.
    slow = 1.3 * half * step
    assert target(1.3 * after + margin - 1.0, slow) == half
    assert target(1.3 * after + margin + 1.0, slow) == plan.pretrain_steps
    # Faster than planned earns no credit for the stages after it: they are still expected as planned.
    assert target(after + margin - 1.0, 0.5 * half * step) == half
    assert target(after + margin - 1.0, 0.5 * half * step, may_extend=True) == half


def test_pretraining_trains_on_into_the_seconds_its_pace_saved_only_under_a_constant_rate():
    plan, step, after, margin, half = replanned_with_800_seconds_left()
    # Half the steps done at 0.8x the planned pace, on the planned clock: the rest costs 0.8x too.
    left = 800.0 - 0.8 * half * step
    fast = planning.pretraining_target(plan, left, half, half, 0.8 * half * step, may_extend=True)
    expected = half + math.floor((left - after / planning.REPLAN_SAFETY - margin) / (0.8 * step))
    assert fast == expected > plan.pretrain_steps
    # The extra steps end before the stages after it need their planned seconds (and the margin).
    assert left - (fast - half) * 0.8 * step >= after + margin
    # Without leave to extend (a decaying schedule), the plan's steps.
    assert planning.pretraining_target(plan, left, half, half, 0.8 * half * step, may_extend=False) == plan.pretrain_steps


def test_a_late_pretraining_stops_keeps_its_model_and_says_so(tmp_path, cache_dir, monkeypatch):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30", "warm_start.epsilon_share=0"])
    pipeline = opened(cfg, tmp_path / "run")
    pipeline.run_stage("semantics")
    pipeline._replan_pretraining()
    planned = pipeline.cfg.pretrain.steps
    stop = 2 * pretrain_stage.BUDGET_CHECK_EVERY  # the first check only starts measuring the pace
    assert planned > stop
    monkeypatch.setattr(pretrain_stage, "pretraining_target", lambda plan, left, done, *timed, may_extend: done)
    cached = set((cache_dir / "pretrained").glob("*"))
    pipeline.run_stage("pretrain")
    marker = json.loads((tmp_path / "run" / "stages" / "pretrain.json").read_text())
    assert marker["stopped_early_at"] == stop < planned
    _, meta = load_checkpoint(tmp_path / "run" / "pretrain" / MODEL_FILE)
    assert int(meta["steps"]) == stop
    assert set((cache_dir / "pretrained").glob("*")) == cached  # a model short of its steps is never shared
    assert f"stopped after {stop}" in report_stage._plan_section(pipeline.run)
    pipeline.close()


@pytest.mark.parametrize("batch_size, timed", [(16, 16), (1000, 128)])
def test_the_probe_times_dp_sgd_at_the_batch_the_stage_runs(monkeypatch, batch_size, timed):
    """A DP-SGD step has a fixed overhead: a small logical batch costs more per sample than a full
    micro-batch, so the probe times the expected batch (at most one micro-batch of 128 rows)."""
    cfg = load_config("quick", None, [f"finetune.batch_size={batch_size}", "finetune.max_physical_batch=128",
                                      "evaluate.classifiers=[cnn]"])
    sizes = []
    real_step = planning.DPSGD.step
    monkeypatch.setattr(planning.DPSGD, "step", lambda self, x, *a: sizes.append(len(x)) or real_step(self, x, *a))
    planning.probe(cfg, 10, planning.torch.device("cpu"), num_samples=2000)
    assert sizes and set(sizes) == {timed}


def test_the_budget_clock_counts_reading_sensitive_data_at_its_planned_seconds(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = planning.BudgetClock(minutes=10)
    now[0] += 30  # public work counts as measured
    with clock.reading_sensitive(planned_seconds=5.0):
        now[0] += 400  # however long the sensitive work takes ...
        with clock.reading_sensitive():  # (nested blocks count once)
            now[0] += 50
    assert clock.spent() == pytest.approx(35.0)  # ... it counts as planned
    clock.pause()
    now[0] += 3600  # a wait that is not the run's
    assert clock.paused and clock.spent() == pytest.approx(35.0)
    clock.resume()
    now[0] += 10
    assert clock.left() == pytest.approx(600 - 45.0)


def _slow(monkeypatch, module, name, seconds):
    """`module.name` made to take `seconds` on a monotonic clock that stands still otherwise (as a slow
    image would), so that plans made on it differ only by what that call costs."""
    real, now = getattr(module, name), [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    def slow(*args, **kwargs):
        now[0] += seconds
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)


def test_a_slow_to_decode_sensitive_set_moves_neither_t_nor_sigma(tmp_path, cache_dir, monkeypatch):
    """Failing first: the plan counted the seconds spent decoding the sensitive set, so T and σ, both
    published, depended on how long its images took to decode."""
    from privimage import pipeline as pipeline_module

    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30"])
    monkeypatch.setattr(pipeline_module, "probe", lambda *a, **k: dict(THROUGHPUT, generator_step=0.01))
    monkeypatch.setattr(pipeline_module, "classifier_throughput", lambda *a, **k: 0.001)
    _slow(monkeypatch, pipeline_module, "load_sensitive", 0.0)
    fast = Pipeline(cfg, tmp_path / "fast", split_key=bytes(32)).validate()
    _slow(monkeypatch, pipeline_module, "load_sensitive", 600.0)  # one image that takes ten minutes
    slow = Pipeline(cfg, tmp_path / "slow", split_key=bytes(32)).validate()
    assert (slow.plan.finetune_steps, slow.plan.pretrain_steps) == (fast.plan.finetune_steps, fast.plan.pretrain_steps)
    assert slow.planned_mechanisms()[-1].noise_multiplier == fast.planned_mechanisms()[-1].noise_multiplier


def test_a_slow_semantic_query_moves_no_pretraining_step(tmp_path, cache_dir, monkeypatch):
    """Failing first: the replan read the semantics stage's measured seconds, the query on sensitive
    data included, and so did the early stop through the seconds left."""
    from privimage.stages import semantics as semantics_stage

    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30", "warm_start.epsilon_share=0"])
    monkeypatch.setattr("privimage.pipeline.probe", lambda *a, **k: dict(THROUGHPUT))
    steps = {}
    for name, query_seconds in (("fast", 0.0), ("slow", 300.0)):
        _slow(monkeypatch, semantics_stage, "vote_histogram", query_seconds)
        pipeline = Pipeline(cfg, tmp_path / name).validate().create()
        pipeline.run_stage("semantics")
        pipeline._replan_pretraining()
        steps[name] = pipeline.plan.pretrain_steps
        marker = json.loads((tmp_path / name / "stages" / "semantics.json").read_text())
        assert marker["seconds"] < 200  # the shareable marker holds the query at its planned seconds
        pipeline.close()
    assert steps["slow"] == steps["fast"]


def test_a_fast_pretraining_trains_on_keeps_its_model_and_says_so(tmp_path, cache_dir, monkeypatch):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30", "warm_start.epsilon_share=0"])
    pipeline = opened(cfg, tmp_path / "run")
    pipeline.run_stage("semantics")
    pipeline._replan_pretraining()
    planned = 2 * pretrain_stage.BUDGET_CHECK_EVERY  # a short plan, so that the test trains a few steps
    pipeline.plan = replace(pipeline.plan, pretrain_steps=planned)
    pipeline.cfg = OmegaConf.merge(pipeline.cfg, pipeline.plan.overrides())
    more = planned + pretrain_stage.BUDGET_CHECK_EVERY
    monkeypatch.setattr(pretrain_stage, "pretraining_target",
                        lambda plan, left, done, *timed, may_extend: more if may_extend else plan.pretrain_steps)
    cached = set((cache_dir / "pretrained").glob("*"))
    pipeline.run_stage("pretrain")
    marker = json.loads((tmp_path / "run" / "stages" / "pretrain.json").read_text())
    assert marker["trained_on_to"] == more
    _, meta = load_checkpoint(tmp_path / "run" / "pretrain" / MODEL_FILE)
    assert int(meta["steps"]) == more
    assert set((cache_dir / "pretrained").glob("*")) == cached  # its steps are not the cache key's


def test_the_early_stop_ignores_the_first_steps_and_never_stops_below_the_floor(tmp_path, cache_dir):
    cfg = load_config(None, None, ["minutes=15"])
    plan = replace(planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, uses_pretraining=True,
                                      num_samples=4000), pretrain_floor=100)

    class Stub:  # the pipeline as the pretrain stage's budget check sees it: a late run
        def seconds_left(self):
            return 1.0

    Stub.plan = plan
    Stub.cfg = cfg
    target = pretrain_stage._budget_check(Stub())
    assert target(25, 25, 60.0) == plan.pretrain_steps  # the first check only starts the pace's clock, however slow
    assert target(50, 50, 61.0) == 100  # late, but not below the floor
    assert target(150, 150, 62.0) == 150  # late: stop now


def test_a_resumed_pretraining_never_trains_on(tmp_path):
    """A resumed process starts a new budget clock with the whole budget ahead: it keeps plan.json's steps."""
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, uses_pretraining=True,
                              num_samples=4000)

    class Stub:  # a fast machine with the whole budget left
        def seconds_left(self):
            return 900.0

    Stub.plan, Stub.cfg = plan, cfg
    fresh, resumed = pretrain_stage._budget_check(Stub()), pretrain_stage._budget_check(Stub())
    fresh(25, 25, 1.0), resumed(525, 25, 1.0)  # the first check starts the pace's clock
    assert fresh(50, 50, 2.0) > plan.pretrain_steps
    assert resumed(550, 50, 2.0) == plan.pretrain_steps
