"""Few-shot linear evaluation on frozen representations: the estimator of the ViT paper's
"few-shot linear accuracy", as big_vision computes it (big_vision/evaluators/fewshot_lsr.py, with
the defaults of big_vision/configs/common_fewshot.py).

For each k in `shots` (big_vision's default: 1, 5, 10, 25) and each trial t (of `num_trials`,
default 3, big_vision's `num_seeds`):

1. Features of every example of `train_split` and `test_split` of the probe's data set (`source`;
   train.py passes `fewshot.dataset`, or the training data set when that is unset) come from
   `run_fn` (the model's pooled pre-logits representation, head ignored), in split order, over
   all hosts.
2. Shots, drawn as fewshot_lsr.py draws them: one generator per trial, and with it, for every
   class c = 0..K-1 in turn, one random permutation of the rows of the train split labelled c;
   the k-shot set is the first k of each permutation. So the support set is exactly k per class,
   and a trial's 1-shot set is inside its 5-shot set, and so on. big_vision seeds trial t with
   t alone (`sample_shots(..., seed=t)` draws exactly its subsets); here trial t uses
   `np.random.default_rng([seed, t])`, with train.py passing the run's `seed`. Where a class has
   fewer than k examples big_vision silently takes what there is; here that is a ValueError
   naming the class (a prefix such as "train[:2000]" is enough when every class has max(shots)
   examples in it). Features of the whole `train_split` are computed, so keep it small.
3. Preprocessing (fewshot_lsr.py's "whitening"): every feature dimension is standardised with the
   support set's per-dimension mean and standard deviation (population std, plus 1e-5), the test
   features with the same statistics. A constant column of BIAS = 100 is appended for the bias:
   it is regularised like any weight, but its weight only needs 1/100 of the bias, so the penalty
   on the bias is l2_reg / 10^4 of the plain one: almost unregularised.
4. Ridge regression to one-vs-all targets in {-1, +1} (2 * one_hot - 1), in closed form:
   W = (X^T X + l2_reg I)^-1 X^T Y, or the same W as X^T (X X^T + l2_reg I)^-1 Y when there are
   fewer support examples than columns (big_vision picks between the same two forms, through an
   eigendecomposition, in float32; here np.linalg.solve in float64). l2_reg defaults to 2^10,
   big_vision's (common_fewshot.py).
5. Accuracy of argmax(X_test W) on every example of `test_split`. big_vision reports each trial
   ("seed") separately; here the trials are averaged.

Returns {"fewshot_{k}shot_accuracy": float} for every k.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from vit_jax import data as data_lib
from vit_jax import errors
from vit_jax import evaluators

# big_vision's defaults (configs/common_fewshot.py) and constants (evaluators/fewshot_lsr.py).
SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10
NUM_TRIALS = 3
BIAS = 100.0  # The value of the appended bias column.
STD_EPS = 1e-5  # Added to each dimension's standard deviation.


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
      raise errors.ConfigError(
          f"Class {c} has {len(rows)} examples in the few-shot train split but "
          f"{kmax}-shot needs {kmax}; use a larger fewshot.train_split or fewer "
          "shots.")
    picked.append(rng.permutation(rows)[:kmax])  # (kmax,)
  picked = np.stack(picked)  # (K, kmax)
  return {k: np.sort(picked[:, :k].reshape(-1)).astype(np.int64) for k in shots}


def feature_stats(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and standard deviation (+ STD_EPS) of the support features x (n, D):
  two (1, D) arrays."""
  x = np.asarray(x, np.float64)
  return x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + STD_EPS


def preprocess(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Standardise every dimension with the support set's statistics and append the bias column:
  (n, D) -> (n, D + 1) float64, the last column BIAS."""
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full_like(x[:, :1], BIAS)], axis=1)


def ridge_solve(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_W |XW - Y|^2 + l2_reg |W|^2 for x (n, d), y (n, K), in float64: (d, K)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  if l2_reg == 0:  # The limit of both forms below: the minimum-norm least-squares solution.
    return np.linalg.lstsq(x, y, rcond=None)[0]
  if n < d:  # Dual form: the n x n system is smaller and gives the same W.
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float = L2_REG):
  """Steps 3 and 4 of the module docstring for the support set x (n, D), int labels y (n,):
  (W (D + 1, K), mean (1, D), std (1, D)); the scores of features f are preprocess(f, mean,
  std) @ W."""
  mean, std = feature_stats(x)
  targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0  # (n, K) in {-1, +1}
  return ridge_solve(preprocess(x, mean, std), targets, l2_reg), mean, std


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          num_classes: int, l2_reg: float = L2_REG) -> float:
  """Steps 3 to 5 of the module docstring for one support set: test accuracy in [0, 1]."""
  w, mean, std = fit_linear_probe(x, y, num_classes, l2_reg)
  preds = np.argmax(preprocess(x_test, mean, std) @ w, axis=-1)
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
  features) -> numpy (local_rows, D)`; `source`: the probe's data set, whose `train_split` and
  `test_split` are read. Everything else as in the module docstring."""

  def __init__(self, run_fn: Callable, source, *, train_split: str, test_split: str, pp: str,
               shots: Sequence[int] = SHOTS, l2_reg: float = L2_REG,
               num_trials: int = NUM_TRIALS, seed: int = 0,
               batch_size: int, gather: Callable,
               allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               should_stop: Optional[Callable[[], bool]] = None):
    shots = tuple(int(k) for k in shots)
    if not shots or min(shots) < 1:
      raise errors.ConfigError(f"fewshot.shots must be positive integers, got {shots}.")
    if num_trials < 1 or l2_reg < 0:
      raise errors.ConfigError(
          f"fewshot needs num_trials >= 1 and l2_reg >= 0, got {num_trials} and "
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
