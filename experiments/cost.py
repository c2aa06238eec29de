"""What a sweep will cost on this machine, measured before it runs.

For every distinct model set-up among the points (model, batch size, preprocessing, dtype, parallel
mode), a short timed run of the trainer's own step (`trainer.build_trainer`, real first batch,
`steps` steps after the compiling one) gives seconds per training step, and a timed evaluation
step gives seconds per evaluated example. A point's cost is then

  total_steps * step_s + (compile_s once) + evaluated examples * eval_example_s

where the evaluated examples are eval_split at every `eval_every` and at the end, the test split
at the end, and the few-shot probe's train and test splits at each evaluation when
`fewshot.shots` is set. Measurements are cached in DIR/plan.json by set-up, so a resumed sweep
does not measure again (delete the file to re-measure, e.g. on another machine); points already
finished cost nothing. A point's measured seconds (result.json's train_seconds) are printed next
to its plan by `experiments.aggregate`'s table, so the plan can be checked against what happened.
"""
import json
import math
import os
import time
from typing import Callable, Dict, List, Mapping, Sequence

import jax
import numpy as np

from experiments import sweep as sweep_lib

PLAN_FILE = "plan.json"
SETUP_KEYS = ("model_name", "model", "batch_size", "eval_batch_size", "pp_train", "pp_eval",
              "dataset", "parallel", "mesh", "grad_accum_steps", "remat", "distill", "ema_decay")


def setup_key(config) -> str:
  """The part of a config a step's speed depends on, as a stable string."""
  d = config.to_dict()
  return json.dumps({k: d.get(k) for k in SETUP_KEYS}, sort_keys=True, default=str)


def measure(config, steps: int = 3) -> Dict[str, float]:
  """Times `steps` training steps (after one compiling step) and one evaluation batch (after a
  compiling one) of `config`'s set-up with the trainer's own functions."""
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import workdirs  # pylint: disable=g-import-not-at-top
  source = data_lib.get_source(config.dataset)
  batch_size = int(config.batch_size)
  it = data_lib.train_iterator(source, split=config.train_split, pp=config.pp_train,
                               batch_size=batch_size, seed=int(config.seed))
  first = next(it)
  t0 = time.perf_counter()
  trainer = trainer_lib.build_trainer(
      config, source.num_classes, first["image"].shape[1:], total_steps=1000, warmup_steps=10,
      teacher=workdirs.teacher(config, source.num_classes, first["image"].shape[1:]))
  runner = trainer.runner
  state = jax.jit(trainer.init_state, out_shardings=trainer.shardings)(jax.random.PRNGKey(0))
  runner.compile(trainer.shardings)
  state = runner.to_run_state(state)
  batch = runner.train_batch(first)
  state, m = runner.update(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = runner.update(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / steps
  eb = int(config.eval_batch_size)
  images = np.resize(first["image"], (eb,) + first["image"].shape[1:])
  labels = np.resize(first["label"], (eb,) + first["label"].shape[1:])
  ebatch = runner.to_device_batch(dict(image=images, label=labels, mask=np.ones(eb, bool)))
  variables = runner.params_for_eval(state)
  jax.block_until_ready(runner.eval_step(variables, ebatch))
  t0 = time.perf_counter()
  jax.block_until_ready(runner.eval_step(variables, ebatch))
  eval_example_s = (time.perf_counter() - t0) / eb
  return dict(step_s=step_s, compile_s=compile_s, eval_example_s=eval_example_s)


def point_work(config) -> Dict[str, float]:
  """Training steps and evaluated examples of a point, from its config and its data's sizes."""
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  source = data_lib.get_source(config.dataset)
  spe = data_lib.steps_per_epoch(source, config.train_split, int(config.batch_size))
  total, _, _, eval_every, _ = optim.resolve_durations(config, spe)
  evals = (total // eval_every if eval_every else 0) + 1
  if eval_every and total % eval_every == 0:
    evals -= 1  # the last periodic one is the final one
  per_eval = source.num_examples(config.eval_split) if config.eval_split else 0
  if config.fewshot.shots:
    per_eval += (source.num_examples(config.fewshot.train_split) +
                 source.num_examples(config.fewshot.test_split))
  test = (source.num_examples(config.test_split)
          if config.test_split and config.test_split != config.eval_split else 0)
  return dict(steps=total, eval_examples=evals * per_eval + test)


def plan(points: Sequence[sweep_lib.Point], out: str, *, finished: Callable[[str], bool],
         measure_fn: Callable = measure, log: Callable[[str], None] = print) -> Dict:
  """Measures (or reads from DIR/plan.json) each set-up's speed and returns
  {"points": [{name, setup, steps, eval_examples, seconds}], "total_seconds", "rates"};
  finished points are listed with 0 seconds."""
  path = os.path.join(out, PLAN_FILE)
  rates: Dict[str, Mapping[str, float]] = {}
  if os.path.exists(path):
    with open(path) as f:
      rates = json.load(f).get("rates", {})
  rows: List[Dict] = []
  setups: Dict[str, int] = {}
  for point in points:
    config = sweep_lib.build_config(point)
    key = setup_key(config)
    setup = setups.setdefault(key, len(setups))
    if finished(point.name):
      rows.append(dict(name=point.name, setup=setup, steps=0, eval_examples=0, seconds=0.0))
      continue
    if key not in rates:
      log(f"measuring set-up {setup} ({config.model_name}, batch {config.batch_size}) on "
          f"{point.name} ...")
      rates[key] = measure_fn(config)
      os.makedirs(out, exist_ok=True)
      with open(path, "w") as f:
        json.dump({"rates": rates}, f, indent=1)
    r, work = rates[key], point_work(config)
    seconds = (r["compile_s"] + work["steps"] * r["step_s"] +
               work["eval_examples"] * r["eval_example_s"])
    rows.append(dict(name=point.name, setup=setup, **work, seconds=seconds))
  total = sum(r["seconds"] for r in rows)
  return {"points": rows, "total_seconds": total, "rates": rates}


def describe(p: Mapping, parallel: int = 1) -> str:
  """A few lines: the total and the dearest points. The times are measured one point at a time
  on all the cores; with `parallel` > 1 the line says that the overlap is not modelled (on two
  cores `--parallel=2 --pin` gave 1.0-1.8x the throughput, by model: experiments/runner.py)."""
  todo = [r for r in p["points"] if r["seconds"] > 0]
  how = ("one point at a time" if parallel == 1 else
         f"one point at a time; --parallel={parallel} overlaps them by an amount not modelled")
  lines = [f"plan: {len(todo)} point(s) to run, about {_hours(p['total_seconds'])} on this "
           f"machine, {how} ({len(p['points']) - len(todo)} finished)."]
  for r in sorted(todo, key=lambda r: -r["seconds"])[:5]:
    lines.append(f"  {r['name']}: {r['steps']} steps, {r['eval_examples']} evaluated examples, "
                 f"~{_hours(r['seconds'])}")
  return "\n".join(lines)


def _hours(seconds: float) -> str:
  if seconds < 3600:
    return f"{math.ceil(seconds / 60)} min"
  return f"{seconds / 3600:.1f} h"
