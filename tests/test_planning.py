"""`--minutes`: the plan fits the budget, scales the configured recipe, and is made once per run directory."""

import json
import time

import pytest

from privimage import planning
from privimage.config import load_config
from privimage.errors import UserError
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
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, evaluations_per_classifier=1,
                              uses_pretraining=True, num_samples=4000)
    assert sum(plan.expected_seconds.values()) <= 900.0
    assert sum(plan.expected_seconds.values()) >= planning.SAFETY * 900.0 - 5  # and uses it (less a step)
    configured = cfg.pretrain.steps / cfg.finetune.steps
    assert plan.pretrain_steps / plan.finetune_steps == pytest.approx(configured, rel=0.05)
    faster = planning.make_plan(cfg, {k: v / 2 for k, v in THROUGHPUT.items()}, 900.0, semantics_seconds=30.0,
                                evaluations_per_classifier=1, uses_pretraining=True, num_samples=4000)
    assert faster.finetune_steps > 2 * plan.finetune_steps  # a machine twice as fast trains more than twice as long


def test_the_warm_start_generator_is_planned_at_its_configured_steps():
    cfg = load_config(None, None, ["minutes=15"])
    common = dict(semantics_seconds=60.0, evaluations_per_classifier=1, uses_pretraining=True, num_samples=4000)
    without = planning.make_plan(cfg, THROUGHPUT, 900.0, **common)
    plan = planning.make_plan(cfg, {**THROUGHPUT, "generator_step": 0.2}, 900.0, **common)
    assert plan.expected_seconds["warmstart"] == pytest.approx(0.2 * cfg.dpmerf.steps)
    assert "warmstart" not in without.expected_seconds and plan.pretrain_steps < without.pretrain_steps
    assert sum(plan.expected_seconds.values()) <= 900.0


def test_a_budget_too_small_for_one_step_is_a_user_error():
    cfg = load_config(None, None, ["minutes=1"])
    with pytest.raises(UserError, match="raise --minutes"):
        planning.make_plan(cfg, THROUGHPUT, 60.0, semantics_seconds=60.0, evaluations_per_classifier=1,
                           uses_pretraining=True, num_samples=4000)


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
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, evaluations_per_classifier=1,
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
    assert planning.replan_pretraining(plan, 1.0, as_planned).pretrain_steps == 1  # a late run still pretrains


def test_the_replan_expects_the_rest_as_much_slower_as_the_stages_run_so_far():
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, evaluations_per_classifier=2,
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
    pipeline.started -= 60  # a minute spent on the stages before pretraining
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
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["replanned_seconds_left"] > 29 * 60
    pipeline.close()


def test_pretraining_stops_early_only_when_its_own_pace_leaves_no_time_for_the_stages_after_it():
    cfg = load_config(None, None, ["minutes=15"])
    plan = planning.make_plan(cfg, THROUGHPUT, 900.0, semantics_seconds=60.0, evaluations_per_classifier=1,
                              uses_pretraining=True, num_samples=4000)
    plan = planning.replan_pretraining(plan, 800.0, {"semantics": plan.expected_seconds["semantics"]})
    step = plan.expected_seconds["pretrain"] / plan.pretrain_steps
    after = sum(plan.expected_seconds[s] for s in ("finetune", "sample", "evaluate", "report"))
    margin = planning.STOP_MARGIN * 60 * plan.minutes
    half = plan.pretrain_steps // 2
    # On the planned pace, the replan's spare seconds are still there at the last step: no stop.
    at_the_end = 800.0 - plan.expected_seconds["pretrain"]
    assert not planning.pretraining_is_late(plan, at_the_end, plan.pretrain_steps, plan.expected_seconds["pretrain"])
    # 1.3x slower: the stages after it are expected 1.3x slower too.
    slow = 1.3 * half * step
    assert planning.pretraining_is_late(plan, 1.3 * after + margin - 1.0, half, slow)
    assert not planning.pretraining_is_late(plan, 1.3 * after + margin + 1.0, half, slow)
    # Faster than planned earns no credit: the stages after it are still expected as planned.
    assert planning.pretraining_is_late(plan, after + margin - 1.0, half, 0.5 * half * step)


def test_a_late_pretraining_stops_keeps_its_model_and_says_so(tmp_path, cache_dir, monkeypatch):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}", "minutes=30", "warm_start.epsilon_share=0"])
    pipeline = opened(cfg, tmp_path / "run")
    pipeline.run_stage("semantics")
    pipeline._replan_pretraining()
    planned = pipeline.cfg.pretrain.steps
    assert planned > 2 * pretrain_stage.LATE_CHECK_EVERY
    monkeypatch.setattr(planning, "pretraining_is_late", lambda plan, left, steps, seconds: True)
    cached = set((cache_dir / "pretrained").glob("*"))
    pipeline.run_stage("pretrain")
    marker = json.loads((tmp_path / "run" / "stages" / "pretrain.json").read_text())
    assert marker["stopped_early_at"] == pretrain_stage.LATE_CHECK_EVERY < planned
    _, meta = load_checkpoint(tmp_path / "run" / "pretrain" / pretrain_stage.MODEL_FILE)
    assert int(meta["steps"]) == pretrain_stage.LATE_CHECK_EVERY
    assert set((cache_dir / "pretrained").glob("*")) == cached  # a model short of its steps is never shared
    assert f"stopped after {pretrain_stage.LATE_CHECK_EVERY}" in report_stage._plan_section(pipeline.run)
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
