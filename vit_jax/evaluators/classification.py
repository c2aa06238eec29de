"""Top-1 accuracy and mean loss over every example of a split (padded, masked last batch)."""
from typing import Callable, Dict, Optional

from vit_jax import evaluators


class ClassificationEvaluator:
  """`step_fn(params, local_batch) -> {correct, loss, count}` sums (device values); `fetch` turns
  them into Python floats. Every example of the split counts exactly once."""

  def __init__(self, step_fn: Callable, source, *, split: str, pp: str, batch_size: int,
               fetch: Callable, should_stop: Optional[Callable[[], bool]] = None):
    self.step_fn, self.source, self.split, self.pp = step_fn, source, split, pp
    self.batch_size, self.fetch, self.should_stop = batch_size, fetch, should_stop

  def run(self, params) -> Dict[str, float]:
    totals = evaluators.sum_over_split(
        lambda batch: self.step_fn(params, batch), self.source, split=self.split, pp=self.pp,
        batch_size=self.batch_size, fetch=self.fetch, should_stop=self.should_stop)
    n = totals["count"]
    return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n,
            "num_examples": int(round(n))}
