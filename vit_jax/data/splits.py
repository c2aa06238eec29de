"""Split arithmetic: which examples of a source's base splits a split string selects.

Grammar (whitespace is ignored):

  split   := part ( "+" part )*
  part    := base [ "[" start ":" stop "]" ] [ "@seeded(" N [ ", seed=" S ] ")" ]
  start, stop := empty | integer | number "%"      (negative values count from the end)

  "train"                         every example of "train"
  "train[:10000]", "train[-5000:]" absolute slices, Python semantics but out-of-range is an error
  "train[:10%]", "train[10%:20%]" percentage slices; the boundary of p% is floor(n * p / 100)
  "train@seeded(1000, seed=0)"    N examples drawn at random (seed S, default 0) from the part
  "train+validation"              the concatenation of parts (they must not overlap)

The seeded subset is the first N entries of one permutation of the part that depends on S only,
so the subset of N examples is contained in the subset of any larger N: data-scaling experiments
add examples, never swap them. The permutation is numpy's PCG64 `Generator(seed).permutation`.

A split resolves to parts `[(base, sorted indices into base), ...]`; host p reads the contiguous
slice [p*n//P, (p+1)*n//P) of their concatenation (`host_chunk`: what tfds.split_for_jax_process
does, computed here so that percentages, subsets and counts agree for every source).
"""
import ast
import dataclasses
import fractions
import re
from typing import List, Mapping, Optional, Tuple

import numpy as np

from vit_jax import errors

_SPLIT_RE = re.compile(r"^(?P<base>[A-Za-z_][\w\-]*)(\[(?P<slice>[^\]]*)\])?(@(?P<subset>.+))?$")
_GRAMMAR = ("expected 'base', 'base[start:stop]' (integers or percentages like 10%) and optionally "
            "'@seeded(N, seed=S)', joined by '+', e.g. 'train[:10%]@seeded(1000, seed=0)+test'")
Parts = List[Tuple[str, np.ndarray]]  # [(base split, sorted int64 indices into it), ...]


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """One parsed part of a split string (before the split sizes are known)."""
  base: str
  start: Optional[str] = None  # "1000", "-10%", ... as written; None: from the beginning.
  stop: Optional[str] = None
  subset_size: Optional[int] = None
  subset_seed: int = 0


def parse(split: str) -> List[SplitSpec]:
  """Parses a split string into its parts; ValueError naming it and the grammar if malformed."""
  return [_parse_part(split, part) for part in split.replace(" ", "").split("+")]


def _parse_part(split: str, part: str) -> SplitSpec:
  m = _SPLIT_RE.match(part)
  if not m:
    raise errors.ConfigError(f"Cannot parse split {split!r}: {_GRAMMAR}.")
  start = stop = None
  if m.group("slice") is not None:
    bounds = m.group("slice").split(":")
    if len(bounds) != 2:
      raise errors.ConfigError(f"Cannot parse the slice of split {split!r}: {_GRAMMAR}.")
    start, stop = (b or None for b in bounds)
    for bound in (start, stop):
      if bound is not None and not re.fullmatch(r"-?\d+(\.\d+)?%|-?\d+", bound):
        raise errors.ConfigError(f"Bad slice bound {bound!r} in split {split!r}: {_GRAMMAR}.")
  size, seed = None, 0
  if m.group("subset") is not None:
    size, seed = _parse_seeded(split, m.group("subset"))
  return SplitSpec(m.group("base"), start, stop, size, seed)


def _parse_seeded(split: str, text: str) -> Tuple[int, int]:
  """'seeded(1000, seed=0)' -> (1000, 0)."""
  bad = ValueError(f"Cannot parse {text!r} in split {split!r}: {_GRAMMAR}.")
  try:
    call = ast.parse(text, mode="eval").body
  except SyntaxError:
    raise bad from None
  if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
          and call.func.id == "seeded"):
    raise bad
  try:
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError:
    raise bad from None
  if not 1 <= len(args) <= 2 or set(kwargs) - {"seed"} or (len(args) == 2 and kwargs):
    raise bad
  size, seed = args[0], (args[1] if len(args) == 2 else kwargs.get("seed", 0))
  if not (isinstance(size, int) and isinstance(seed, int)) or size < 1 or seed < 0:
    raise errors.ConfigError(
        f"In split {split!r}: seeded(N, seed=S) needs integers N >= 1, S >= 0.")
  return size, seed


def _boundary(bound: Optional[str], n: int, default: int, split: str) -> int:
  if bound is None:
    return default
  if bound.endswith("%"):
    pct = fractions.Fraction(bound[:-1])
    if abs(pct) > 100:
      raise errors.ConfigError(f"Percentage {bound} out of range in split {split!r}.")
    k = int(n * abs(pct) // 100)
    return k if pct >= 0 else n - k
  k = int(bound)
  if abs(k) > n:
    raise errors.ConfigError(
        f"Slice bound {k} is out of range in split {split!r}: the base split has "
        f"{n} examples.")
  return k if k >= 0 else n + k


def resolve(split: str, sizes: Mapping[str, int]) -> Parts:
  """Returns the parts [(base split, sorted int64 indices into it), ...] of `split`.

  `sizes` maps the source's base split names to their sizes. ValueError for an unknown base split
  (listing the known ones), an empty selection, a subset larger than its part, or overlapping
  parts.
  """
  parts = []
  for spec in parse(split):
    if spec.base not in sizes:
      raise errors.ConfigError(f"Unknown split {spec.base!r} in {split!r}; this source has splits "
                               f"{sorted(sizes)}.")
    n = sizes[spec.base]
    start = _boundary(spec.start, n, 0, split)
    stop = _boundary(spec.stop, n, n, split)
    if stop <= start:
      raise errors.ConfigError(
          f"Split {split!r} selects no examples of {spec.base!r} (start {start} >= "
          f"stop {stop}, of {n} examples).")
    indices = np.arange(start, stop, dtype=np.int64)
    if spec.subset_size is not None:
      if spec.subset_size > len(indices):
        raise errors.ConfigError(f"Split {split!r} asks for {spec.subset_size} examples out of "
                                 f"{len(indices)}.")
      perm = np.random.Generator(np.random.PCG64(spec.subset_seed)).permutation(len(indices))
      indices = np.sort(indices[perm[:spec.subset_size]])
    for base, other in parts:
      if base == spec.base and np.intersect1d(other, indices).size:
        raise errors.ConfigError(f"Parts of split {split!r} overlap in {base!r}.")
    parts.append((spec.base, indices))
  return parts


def num_examples(parts: Parts) -> int:
  return sum(len(indices) for _, indices in parts)


def host_chunk(parts: Parts, process_index: int, process_count: int) -> Parts:
  """The contiguous slice [p*n//P, (p+1)*n//P) of the parts' concatenation that host p reads
  (sizes differ by at most one); empty parts are dropped."""
  n = num_examples(parts)
  lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
  chunk, offset = [], 0
  for base, indices in parts:
    piece = indices[max(lo - offset, 0):max(hi - offset, 0)]
    if len(piece):
      chunk.append((base, piece))
    offset += len(indices)
  return chunk
