"""Evaluators: sums over a split (top-1 classification, bits/dim), few-shot linear probes, mAP. Each checks `should_stop()` (if
given) between batches and raises `Stopped`, so a preemption signal never waits for a whole
evaluation."""


class Stopped(Exception):
  """An evaluation was abandoned between two batches because `should_stop()` became true."""


def check(should_stop) -> None:
  if should_stop is not None and should_stop():
    raise Stopped()


def sum_over_split(step_fn, source, *, split: str, pp: str, batch_size: int, fetch,
                   should_stop=None):
  """The sums `step_fn(variables-bound batch) -> {name: device sum, ..., count}` add up to over
  every example of `split` (the last batch padded and masked), as Python floats; checks that
  `count` is the split's size."""
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  totals = None
  for batch in data_lib.eval_iterator(source, split=split, pp=pp, batch_size=batch_size):
    check(should_stop)
    out = step_fn(batch)
    totals = out if totals is None else {k: totals[k] + out[k] for k in out}
  totals = fetch(totals)
  n = int(round(totals["count"]))
  expected = source.num_examples(split)
  if n != expected:
    raise RuntimeError(f"evaluated {n} examples of {split!r}, expected {expected}")
  return totals
