"""Few-shot linear evaluation on frozen representations (the ViT paper's "linear few-shot").

For each k in `shots` and each trial t (of `num_trials`):

1. Features of every example of `train_split` and `test_split` come from `run_fn` (the model's
   pooled representation, head ignored), in split order, over all hosts.
2. Shots: trial t draws, for every class c = 0..K-1 in turn, one permutation of the rows of the
   train split labelled c with `np.random.default_rng([seed, t])`, and keeps its first k. So the
   support set is exactly k per class, fixed by (seed, t), and the 1-shot set of a trial is inside
   its 5-shot set, and so on. Only `train_split` is looked at: a prefix such as "train[:2000]" is
   enough when every class has max(shots) examples in it (else a ValueError says which class is
   short). Features of the whole `train_split` are computed, so keep it small.
3. Features are centred with the support set's mean and scaled to unit L2 norm (test features
   with the same mean); a column of ones is appended for the bias (regularised like the weights).
4. Ridge regression to {-1, +1} one-vs-all targets, in closed form, in float64:
   W = (X^T X + l2_reg I)^-1 X^T Y, or the same W as X^T (X X^T + l2_reg I)^-1 Y when there are
   fewer support examples than feature columns.
5. Accuracy of argmax(X_test W) on every example of `test_split`; averaged over the trials.

Returns {"fewshot_{k}shot_accuracy": float} for every k.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from vit_jax import data as data_lib
from vit_jax import evaluators


def sample_shots(labels: np.ndarray, shots: Sequence[int], num_classes: int,
                 seed: Union[int, Sequence[int]]) -> Dict[int, np.ndarray]:
  """Rows of `labels` (ints in [0, num_classes)) forming k-per-class support sets, for each k.

  Deterministic in `seed`; the set for a smaller k is contained in the set for a larger one.
  Returns {k: sorted int64 row indices (k * num_classes,)}.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  kmax = max(shots)
  picked = []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    if len(rows) < kmax:
      raise ValueError(f"Class {c} has {len(rows)} examples in the few-shot train split but "
                       f"{kmax}-shot needs {kmax}; use a larger fewshot.train_split or fewer "
                       "shots.")
    picked.append(rng.permutation(rows)[:kmax])  # (kmax,)
  picked = np.stack(picked)  # (K, kmax)
  return {k: np.sort(picked[:, :k].reshape(-1)).astype(np.int64) for k in shots}


def _normalize(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
  """Centre with `mean`, scale rows to unit norm, append the bias column: (n, D) -> (n, D + 1)."""
  x = x - mean
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return np.concatenate([x, np.ones_like(x[:, :1])], axis=1)


def ridge_solve(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_W |XW - Y|^2 + l2_reg |W|^2 for x (n, d), y (n, K), in float64: (d, K)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  if l2_reg == 0:  # The limit of both forms below: the minimum-norm least-squares solution.
    return np.linalg.lstsq(x, y, rcond=None)[0]
  if n < d:  # Dual form: the n x n system is smaller and gives the same W.
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          num_classes: int, l2_reg: float) -> float:
  """Steps 3 to 5 of the module docstring for one support set: test accuracy in [0, 1]."""
  x, x_test = np.asarray(x, np.float64), np.asarray(x_test, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  targets = 2.0 * np.eye(num_classes)[y] - 1.0  # (n, K) in {-1, +1}
  w = ridge_solve(_normalize(x, mean), targets, l2_reg)
  preds = np.argmax(_normalize(x_test, mean) @ w, axis=-1)
  return float(np.mean(preds == np.asarray(y_test)))


def assemble(per_host_features: np.ndarray, per_host_labels: np.ndarray,
             per_host_masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(P, rows, D), (P, rows), (P, rows) gathered from P hosts -> the split's real rows in order.

  Host p holds the p-th contiguous part of the split, padded to the common number of rows.
  """
  keep = np.asarray(per_host_masks).reshape(-1) > 0
  d = per_host_features.shape[-1]
  return (np.asarray(per_host_features).reshape(-1, d)[keep],
          np.asarray(per_host_labels).reshape(-1)[keep])


class FewShotEvaluator:
  """`run_fn(params, local_batch) -> device features (this host's rows)`; `gather(device
  features) -> numpy (local_rows, D)`. Everything else as in the module docstring."""

  def __init__(self, run_fn: Callable, source, *, train_split: str, test_split: str, pp: str,
               shots: Sequence[int], l2_reg: float, num_trials: int = 1, seed: int = 0,
               batch_size: int, gather: Callable,
               allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               should_stop: Optional[Callable[[], bool]] = None):
    shots = tuple(int(k) for k in shots)
    if not shots or min(shots) < 1:
      raise ValueError(f"fewshot.shots must be positive integers, got {shots}.")
    if num_trials < 1 or l2_reg < 0:
      raise ValueError(f"fewshot needs num_trials >= 1 and l2_reg >= 0, got {num_trials} and "
                       f"{l2_reg}.")
    self.run_fn, self.source, self.pp, self.gather = run_fn, source, pp, gather
    self.train_split, self.test_split = train_split, test_split
    self.shots, self.l2_reg, self.num_trials, self.seed = shots, float(l2_reg), num_trials, seed
    self.batch_size, self.should_stop = batch_size, should_stop
    # (local_rows, ...) -> (P, local_rows, ...) across processes; identity with one process.
    self.allgather = allgather or _process_allgather

  def features(self, params, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(features (n, D) float32, int labels (n,)) of every example of `split`, in split order."""
    feats, labels, masks = [], [], []
    for batch in data_lib.eval_iterator(self.source, split=split, pp=self.pp,
                                        batch_size=self.batch_size):
      evaluators.check(self.should_stop)
      feats.append(np.asarray(self.gather(self.run_fn(params, batch)), np.float32))
      labels.append(np.argmax(batch["label"], axis=-1))
      masks.append(batch["mask"])
    x, y, m = (self.allgather(np.concatenate(a)) for a in (feats, labels, masks))
    x, y = assemble(x, y, m)
    expected = self.source.num_examples(split)
    if len(x) != expected:
      raise RuntimeError(f"few-shot features for {len(x)} examples of {split!r}, expected "
                         f"{expected}")
    return x, y

  def run(self, params) -> Dict[str, float]:
    x, y = self.features(params, self.train_split)
    x_test, y_test = self.features(params, self.test_split)
    k_classes = self.source.num_classes
    acc = {k: [] for k in self.shots}
    for t in range(self.num_trials):
      for k, rows in sample_shots(y, self.shots, k_classes, seed=[self.seed, t]).items():
        acc[k].append(linear_probe_accuracy(x[rows], y[rows], x_test, y_test, k_classes,
                                            self.l2_reg))
    return {f"fewshot_{k}shot_accuracy": float(np.mean(v)) for k, v in acc.items()}


def _process_allgather(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))
