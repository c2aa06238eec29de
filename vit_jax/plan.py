r"""Compiles a config's train step for a TPU pod slice from this machine, and reads the compiler.

  python -m vit_jax.plan --config=configs/imagenet_scratch.py:imagenet1k,ViT-B/16 \
      --topology=v5e:4x4 [--config.KEY=VALUE ...] [--json=plan.json]

The step is the one training runs: `trainer.build_trainer` makes the model, optimizer, train state
and its shardings, and the Runner's jitted update, over a mesh of the topology's devices
(`parallel.make_mesh` takes them like any others). The real TPU compiler (libtpu, `pip install
-e .[plan]`) compiles it for the slice without a TPU attached (`jax.experimental.topologies`),
and the plan prints, per chip: the compiler's memory (arguments, temporaries, outputs, code)
against the chip's HBM; the FLOPs of the step's matrix multiplications, counted in its jaxpr
(`jaxpr_flops`: XLA's own `cost_analysis` counts a loop body once, so a scanned ViT's 12
layers would count as 1) and the least HBM traffic the buffers imply (`StepPlan.hbm_bytes`);
the collectives in the optimized HLO (kind, count, bytes; loops times their trip counts); and
a roofline estimate of the step time and the MFU ceiling it allows. `--topology=local` plans
for this machine's devices instead (the CPU has no entry in the chip table: memory, FLOPs and
collectives only).

A plan that does not fit the chip's HBM ends with a one-line error naming what to try (exit
status 1); bad flags and configs are one `error:` line with exit status 2, as in vit_jax.main.
`parallel=pmap` compiles for a topology too: `jax.pmap(devices=...)` takes its compile-only
devices (one per-device program; the state replicated on each).

Every figure is per chip: one device of the topology (a v4 or v5p chip is one megacore device;
a v3 chip is two devices, so its table entry is per core).
"""
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags

from vit_jax import errors

GiB = 2 ** 30


# ------------------------------------------------------------------------------- the chips.
@dataclasses.dataclass(frozen=True)
class Chip:
  """Per device (chip; v3: per core) peak figures, as Google's Cloud TPU pages state them."""
  name: str
  hbm_bytes: int
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: Optional[float]  # bytes/s, all of a chip's links together; None: not published
  source: str

  @property
  def f32_flops(self) -> float:
    """f32 dots at precision=HIGHEST take 6 bf16 passes on the MXU (JAX's
    `jax.default_matmul_precision` docs); at JAX's default precision an f32 dot on TPU is one
    bf16 pass, so `bf16_flops` applies to it."""
    return self.bf16_flops / 6


# device_kind (what jax.Device.device_kind says) -> Chip. Sources: the "System architecture"
# table of each version's page, cloud.google.com/tpu/docs/{v3,v4,v5e,v5p,v6e}, read 2026-12-05.
# GB on those pages taken as GiB for the HBM capacity (v3's and v4's pages say GiB).
CHIPS = {
    "TPU v3": Chip("v3 (per core; 2 per chip)", 16 * GiB, 123e12 / 2, 900e9 / 2, None,
                   "cloud.google.com/tpu/docs/v3: 123 TFLOPs bf16, 32 GiB, 900 GBps per chip"),
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1200e9, None,
                   "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB, 1200 GBps"),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8,
                        "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB, 819 GBps, "
                        "ICI 1600 Gbps"),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8,
                   "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB, 2765 GBps, "
                   "ICI 4800 Gbps"),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8,
                        "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB, 1640 GBps, "
                        "ICI 3584 Gbps"),
}
# Chips of these versions are one (megacore) device each, as on a TPU VM.
_MEGACORE = ("v4", "v5p")


class PlanError(errors.UserError, ValueError):
  """The config cannot be planned for this topology (a user error: exit status 2)."""


class DoesNotFit(RuntimeError):
  """The compiled step needs more memory per chip than the chip has."""


# -------------------------------------------------------------------------- the topology.
def topology_devices(topology: str) -> list:
  """The devices of `topology`: 'local' (this process's devices) or a TPU slice such as
  'v5e:4x4', 'v4:2x2x2', 'v5p:4x4x4' (compile-only devices from libtpu; no TPU needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  if topology == "local":
    return jax.devices()
  m = re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+){1,2})", topology)
  if not m:
    raise PlanError(f"--topology={topology!r}: use 'local' or a TPU slice as "
                    "VERSION:SHAPE, e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:8x8.")
  version, dims = m.group(1), [int(d) for d in m.group(2).split("x")]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if jax.devices()[0].platform != "tpu":
    # No TPU attached: libtpu's search for one (metadata server, worker names) only prints
    # warnings when it loads; these keep it quiet and do not change the topology asked for.
    # ALLOW_MULTIPLE_LIBTPU_LOAD: several planning processes at once (libtpu otherwise locks
    # /tmp/libtpu_lockfile for the one process that drives the attached chips).
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
      os.environ.setdefault(key, value)
  kwargs = {}
  if version in _MEGACORE:
    kwargs = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), num_slices=1,
                  # v4 / v5p slices of whole 4x4x4 cubes are tori (wrap-around links).
                  wrap=tuple(len(dims) == 3 and d % 4 == 0 for d in dims))
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **kwargs).devices)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise PlanError("TPU plans need libtpu, the TPU compiler: pip install -e '.[plan]' "
                      "(jax[tpu] at this jax's version).") from None
    raise PlanError(f"--topology={topology!r}: libtpu refused it ({str(e).splitlines()[0]}).")
  except Exception as e:  # pylint: disable=broad-except
    raise PlanError(f"--topology={topology!r}: libtpu refused it "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).")


# ----------------------------------------------------------------- reading optimized HLO.
_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?P<root>ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s"
                       r"(?P<op>[a-z][a-z0-9\-_]*)\((?P<rest>.*)$")
_COMP_RE = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


def _arrays(shape: str) -> List[Tuple[str, Tuple[int, ...]]]:
  out = []
  for dtype, dims in _ARRAY_RE.findall(shape):
    if dtype in _DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def _bytes(shape: str) -> float:
  return float(sum(_DTYPE_BYTES[t] * math.prod(d) for t, d in _arrays(shape)))


def _operands(rest: str) -> Tuple[List[str], str, str]:
  """The operand names of an instruction, the text between its parentheses, and the text of its
  attributes."""
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  return re.findall(r"%([\w.\-]+)", rest[:i - 1]), rest[:i - 1], rest[i:]


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  op: str
  operands: List[str]
  args: str  # between the parentheses: operands, or a constant's value
  attrs: str
  root: bool = False


def parse_hlo(text: str) -> Tuple[Dict[str, List[Instr]], str]:
  """Optimized HLO text -> ({computation: instructions}, name of the entry computation)."""
  comps: Dict[str, List[Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _COMP_RE.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group("name")
        comps[current] = []
        if m.group("entry"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR_RE.match(line)
    if m:
      operands, args, attrs = _operands(m.group("rest"))
      comps[current].append(Instr(m.group("name"), m.group("shape"), m.group("op"), operands,
                                  args, attrs, bool(m.group("root"))))
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text.")
  return comps, entry


def _trip_count(instr: Instr, comps: Dict[str, List[Instr]]) -> int:
  """A while loop's trip count: XLA's known_trip_count when the compiler wrote it (CPU), else the
  bound of its condition `i < N` with a constant N (the form scans lower to; the counter starts
  at 0). 0 when neither is there."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
  if m:
    return int(m.group(1))
  m = re.search(r"condition=%?([\w.\-]+)", instr.attrs)
  cond = comps.get(m.group(1), []) if m else []
  values = {i.name: i.args for i in cond if i.op == "constant"}
  for i in cond:
    if i.op == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2:
      bound = values.get(i.operands[1], "")
      if re.fullmatch(r"-?\d+", bound.strip()):
        return int(bound)
  return 0


def _callees(instr: Instr, trip: int) -> List[Tuple[str, int]]:
  """(computation, times it runs per run of `instr`) for the computations it calls; `trip`: a
  while loop's trip count (0: unknown, counted once)."""
  out = []
  for key, name in re.findall(r"\b(calls|to_apply|body|condition|true_computation|"
                              r"false_computation)=%?([\w.\-]+)", instr.attrs):
    times = max(trip, 1) if key in ("body", "condition") else 1
    out.append((name, times))
  for group in re.findall(r"branch_computations=\{([^}]*)\}", instr.attrs):
    out.extend((n, 1) for n in re.findall(r"%?([\w.\-]+)", group))
  return out


@dataclasses.dataclass
class HloCounts:
  """What one run of a compiled program does on one device."""
  collectives: Dict[str, Dict[str, float]]  # kind -> count, bytes, wire_bytes (ring traffic)
  unknown_trip_counts: int  # while loops without a known trip count (counted once)


def _group_size(attrs: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups,size]<=[...]
  if m:
    return int(m.group(2))
  return num_devices


def count_hlo(text: str, num_devices: int) -> HloCounts:
  """Counts what one run of the optimized HLO `text` does per device, each computation weighted
  by how often it runs (while bodies by their known trip counts)."""
  comps, entry = parse_hlo(text)
  # How often each computation runs.
  runs = collections.Counter({entry: 1})
  trips = {(c, i.name): _trip_count(i, comps) for c, instrs in comps.items() for i in instrs
           if i.op == "while"}
  edges = {c: [e for i in instrs for e in _callees(i, trips.get((c, i.name), 1))]
           for c, instrs in comps.items()}
  indegree = collections.Counter(n for es in edges.values() for n, _ in es)
  order, ready = [], [c for c in comps if indegree[c] == 0]
  while ready:
    c = ready.pop()
    order.append(c)
    for n, _ in edges.get(c, ()):
      indegree[n] -= 1
      if indegree[n] == 0:
        ready.append(n)
  for c in order:
    for n, times in edges.get(c, ()):
      runs[n] += runs[c] * times
  unknown = sum(1 for trip in trips.values() if not trip)

  coll = collections.defaultdict(lambda: dict(count=0, bytes=0.0, wire_bytes=0.0))
  for c, instrs in comps.items():
    n = runs[c]
    if not n:
      continue
    shapes = {i.name: i.shape for i in instrs}
    for i in instrs:
      base = i.op[:-len("-start")] if i.op.endswith("-start") else i.op
      if base in COLLECTIVES:
        # Combined collectives take and give tuples: their size is the sum. An async "-start"
        # returns its operands beside its results, so its results are the difference.
        ins = sum(_bytes(shapes.get(o, "")) for o in i.operands)
        outs = _bytes(i.shape)
        size = max(outs - ins, ins) if i.op.endswith("-start") else max(outs, ins)
        g = _group_size(i.attrs, num_devices)
        # Bytes each device sends on a ring (bandwidth-optimal algorithms).
        factor = {"all-reduce": 2 * (g - 1) / g}.get(base, (g - 1) / g if g > 1 else 0.0)
        if base == "collective-permute":
          factor = 1.0
        coll[base]["count"] += n
        coll[base]["bytes"] += n * size
        coll[base]["wire_bytes"] += n * size * factor
  return HloCounts(dict(coll), unknown)


# ------------------------------------------------------------------ FLOPs of the program.
def jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the matrix multiplications and convolutions in a (closed)
  jaxpr: what the program asks for, recomputation under remat included, each scan body times its
  length (a `while` of unknown trip count once, a `cond` its costliest branch).

  The planner counts here rather than in the optimized HLO: XLA's cost_analysis counts a loop
  body once (a scanned ViT-B/16 step would show one of its 12 layers), and the TPU compiler
  rewrites batched matmuls as convolutions over padded windows whose kernel size no longer says
  how many multiply-adds they do."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
      continue
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
      continue
    subs = [v for v in eqn.params.values() if isinstance(v, (core.Jaxpr, core.ClosedJaxpr))]
    branches = eqn.params.get("branches")
    if name == "cond" and branches:
      total += max(jaxpr_flops(b) for b in branches)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "while":
      total += jaxpr_flops(eqn.params["body_jaxpr"])
    else:
      total += sum(jaxpr_flops(j) for j in subs)
  return total


# ---------------------------------------------------------------- the analytic ViT count.
def vit_forward_flops(model, image_shape) -> Optional[float]:
  """FLOPs (2 per multiply-add) of one image's forward pass through a plain ViT, counting its
  matrix multiplications: patch embedding, per layer QKV and output projections (4 N D^2), the
  attention scores and their weighted sum (2 N^2 D) and the MLP (2 N D M), the pre-logits and
  the head. None for other models (hybrids included). ViT-B/16 at 224 px: 17.56 G multiply-adds,
  the "17.6 GFLOPs" that DeiT's Table 1 and timm list (they count a multiply-add as one)."""
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  if not isinstance(model, vit.VisionTransformer) or model.resnet is not None:
    return None
  h, w, c = image_shape
  ph, pw = model.patch_size
  grid = (h // ph) * (w // pw)
  n = grid + (model.classifier == "token")
  d, m, layers = model.hidden_size, model.mlp_dim, model.num_layers
  macs = grid * ph * pw * c * d  # patch embedding
  macs += layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
  if model.classifier == "map":
    macs += 4 * d * d + 2 * n * d * d + 2 * d * m  # the attention-pooling head's block, roughly
  rep = model.representation_size
  if rep:
    macs += d * rep
  macs += (rep or d) * model.num_classes
  return 2.0 * macs


# --------------------------------------------------------------------------- the plan.
def least_hbm_bytes(argument_bytes: int, output_bytes: int, temp_bytes: int) -> float:
  """The least HBM traffic of a step: every argument read once, every output written once,
  every temporary written once and read once. (XLA's cost_analysis "bytes accessed" is no guide
  here: on TPU it counts on-chip VMEM accesses too, and a loop body once.)"""
  return float(argument_bytes + output_bytes + 2 * temp_bytes)


def roofline(step_flops: float, hbm_bytes: float, wire_bytes: float,
             forward_flops_per_image: Optional[float], images: float,
             chip: Chip) -> Dict[str, Optional[float]]:
  """Seconds per step each resource needs at its peak (compute at bf16, HBM, ICI), the step
  time if they overlapped perfectly (their maximum: a lower bound), the images per second that
  allows, and the MFU ceiling: model FLOPs over that time at peak, the model FLOPs being the
  step's own or 3 forwards per image, whichever is less (recomputation is not model work; a
  step that needs no input gradient does a little less than 3 forwards)."""
  compute = step_flops / chip.bf16_flops
  memory = hbm_bytes / chip.hbm_bandwidth
  comm = wire_bytes / chip.ici_bandwidth if chip.ici_bandwidth else None
  step = max(compute, memory, comm or 0.0)
  model = (min(step_flops, 3 * forward_flops_per_image * images)
           if forward_flops_per_image else None)
  return dict(compute_s=compute, hbm_s=memory, ici_s=comm, step_s=step,
              images_per_s_per_chip=images / step if step else None,
              mfu_ceiling=model / (step * chip.bf16_flops) if model and step else None)


@dataclasses.dataclass
class StepPlan:
  """One compiled step on one chip."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  dot_flops: float  # per chip: the program's dot/conv FLOPs (jaxpr_flops) x the chip's share
  collectives: Dict[str, Dict[str, float]]
  xla_flops: float  # XLA's cost_analysis (loop bodies once), for reference
  compile_seconds: float
  hlo: str = dataclasses.field(repr=False, default="")

  @property
  def hbm_bytes(self) -> float:
    return least_hbm_bytes(self.argument_bytes, self.output_bytes, self.temp_bytes)

  @property
  def total_bytes(self) -> int:
    """Peak per-chip memory of the step: arguments, temporaries and outputs, less the outputs
    that reuse donated arguments, and the code."""
    return (self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes +
            self.code_bytes)


@dataclasses.dataclass
class Plan:
  config_name: str
  topology: str
  device_kind: str
  num_devices: int
  num_processes: int
  mesh: Dict[str, int]
  batch_size: int
  image_shape: Tuple[int, ...]
  num_classes: int
  train: StepPlan
  eval: Optional[StepPlan]
  chip: Optional[Chip]
  analytic_forward_flops: Optional[float]  # per image
  unknown_trip_counts: int
  eval_batch_size: int = 0
  mode: str = "jit"

  @property
  def per_chip_batch(self) -> float:
    return self.batch_size / self.batch_shards

  @property
  def batch_shards(self) -> int:
    """The devices a batch is split over: data x fsdp (pmap: all of them)."""
    return self.num_devices if self.mode == "pmap" else self.mesh["data"] * self.mesh["fsdp"]

  @property
  def forward_flops_per_image(self) -> Optional[float]:
    """The compiled eval step's dot FLOPs per image: the forward pass as compiled."""
    if self.eval is None:
      return None
    eval_rows = self.eval_batch_size / self.batch_shards
    return self.eval.dot_flops / eval_rows

  def roofline(self) -> Dict[str, Optional[float]]:
    if self.chip is None:
      return {}
    t = self.train
    return roofline(t.dot_flops, t.hbm_bytes, sum(c["wire_bytes"] for c in t.collectives.values()),
                    self.forward_flops_per_image, self.per_chip_batch, self.chip)

  def fits(self) -> Optional[bool]:
    if self.chip is None:
      return None
    return max(self.train.total_bytes,
               self.eval.total_bytes if self.eval else 0) <= self.chip.hbm_bytes

  def to_json(self) -> Dict[str, Any]:
    def step(s):
      return None if s is None else dict(
          {k: v for k, v in dataclasses.asdict(s).items() if k != "hlo"},
          total_bytes=s.total_bytes)
    return dict(config=self.config_name, topology=self.topology, device_kind=self.device_kind,
                mode=self.mode,
                devices=self.num_devices, processes=self.num_processes, mesh=self.mesh,
                batch_size=self.batch_size, per_chip_batch=self.per_chip_batch,
                image_shape=list(self.image_shape),
                num_classes=self.num_classes, train=step(self.train), eval=step(self.eval),
                chip=dataclasses.asdict(self.chip) if self.chip else None,
                hbm_bytes=self.chip.hbm_bytes if self.chip else None, fits=self.fits(),
                forward_flops_per_image=self.forward_flops_per_image,
                analytic_forward_flops_per_image=self.analytic_forward_flops,
                roofline=self.roofline(), unknown_trip_counts=self.unknown_trip_counts)


def _compile(jitted, args, flops_share: float, num_devices: int) -> Tuple["StepPlan", int]:
  """Traces, lowers and compiles `jitted` for `args` (ShapeDtypeStructs with shardings) and
  reads the executable; `flops_share`: the part of the program's FLOPs one chip does."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  if hasattr(jitted, "trace"):  # jit
    traced = jitted.trace(*args)
    jaxpr, lowered = traced.jaxpr, traced.lower()
  else:  # pmap: its jaxpr holds the per-device program
    jaxpr, lowered = jax.make_jaxpr(jitted)(*args), jitted.lower(*args)
  with warnings.catch_warnings():
    # With JAX's persistent cache on (the tests'), a plan compiled before is found there, but
    # an executable of compile-only devices cannot be loaded: JAX warns and compiles again.
    warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
    compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  counts = count_hlo(text, num_devices)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return StepPlan(
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes),
      dot_flops=jaxpr_flops(jaxpr) * flops_share,
      collectives=counts.collectives,
      xla_flops=float(cost.get("flops", 0.0)), compile_seconds=seconds, hlo=text
  ), counts.unknown_trip_counts


def plan(config, topology: str = "local", *, image_shape=None, num_classes=None,
         compile_eval: bool = True, config_name: str = "") -> Plan:
  """Builds training's train state, shardings and step for `config` over the devices of
  `topology` and compiles the step (and the eval step) there; nothing runs, no data is read.

  `image_shape` (H, W, C) and `num_classes` default to what the config's data set and pp_train
  give (`data.sources.describe`, `data.preprocess.output_shape`). Raises PlanError for what
  cannot be planned (detection, a topology libtpu does not know).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top

  if config.get("loss", "classification") != "classification":
    raise PlanError(f"The planner plans classification steps; config.loss="
                    f"{config.get('loss')!r} is not planned yet.")
  devices = topology_devices(topology)
  processes = len({d.process_index for d in devices})
  config_checks.validate(config, device_count=len(devices), process_count=processes,
                         model_fields=models.fields(config.model_name))
  if image_shape is None or num_classes is None:
    raw_shape, classes, encoded = sources.describe(config.dataset)
    num_classes = num_classes or classes
    image_shape = image_shape or preprocess.output_shape(config.pp_train, raw_shape,
                                                         encoded=encoded)
  image_shape = tuple(int(x) for x in image_shape)
  batch = int(config.batch_size)
  # The schedule's length does not change the compiled step: one epoch of a million images.
  steps_per_epoch = max(1, 1_000_000 // batch)
  if all(config.get(f"total_{u}") is None for u in ("steps", "epochs", "examples")):
    config = ml_collections.ConfigDict(config.to_dict())
    config.total_steps = steps_per_epoch
  # The trainer's own reading of the durations (only the optimizer's schedule depends on them).
  total, warmup = optim.resolve_durations(config, steps_per_epoch)[:2]
  trainer = trainer_lib.build_trainer(config, num_classes, image_shape, total_steps=total,
                                warmup_steps=min(warmup, total), devices=devices)
  runner, shardings = trainer.runner, trainer.shardings
  mesh = runner.mesh
  runner.compile(shardings)
  pmap = runner.mode == "pmap"
  n = len(devices)
  if pmap:  # replicated state and per-device rows, with a leading device axis
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype),
                                   trainer.abstract_state)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct((n, shape[0] // n) + shape[1:], dtype)
  else:
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state,
        shardings)
    rows = parallel.batch_sharding(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  train_batch = dict(image=sds((batch,) + image_shape, jnp.float32),
                     label=sds((batch, num_classes), jnp.float32),
                     row=sds((batch,), jnp.int32))
  # The batch is split over data x fsdp (pmap: over every device); the 'model' axis splits the
  # work only where sharding rules put parameters on it (otherwise its devices repeat their
  # group's computation).
  uses_model = any("model" in str(kind) for _, kind in (config.sharding.get("rules") or ()))
  share = 1.0 / (n if uses_model or pmap else mesh.shape["data"] * mesh.shape["fsdp"])
  # pmap traces the per-device program: its FLOPs are one device's already.
  def compile_step(fn, args):
    try:
      return _compile(fn, args, 1.0 if pmap else share, n)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler itself refuses programs whose buffers exceed the chip's HBM.
      reason = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
      raise DoesNotFit(f"does not fit: {config_name or 'the config'} on {topology}: the "
                       f"compiler says: {reason} Try "
                       f"{suggestions(mesh.shape['fsdp'], n, batch)}.") from None

  train_plan, unknown = compile_step(runner.update, (state, train_batch))

  eval_plan, eval_batch = None, int(config.eval_batch_size)
  if compile_eval:
    variables = {k: state[k] for k in ("params",) + trainer_lib.MODEL_STATE if k in state}
    eval_rows = dict(image=sds((eval_batch,) + image_shape, jnp.float32),
                     label=sds((eval_batch, num_classes), jnp.float32),
                     mask=sds((eval_batch,), jnp.float32))
    eval_plan, more = compile_step(runner.eval_step, (variables, eval_rows))
    unknown += more
  kind = devices[0].device_kind
  result = Plan(config_name=config_name, topology=topology, device_kind=kind,
                num_devices=len(devices), num_processes=processes, mesh=dict(mesh.shape),
                batch_size=batch, image_shape=image_shape, num_classes=num_classes,
                train=train_plan, eval=eval_plan, chip=CHIPS.get(kind),
                analytic_forward_flops=vit_forward_flops(trainer.model, image_shape),
                unknown_trip_counts=unknown, eval_batch_size=eval_batch, mode=runner.mode)
  return result


# ------------------------------------------------------------------------- the report.
def _gib(x: float) -> str:
  return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f} MiB"


def _si(x: Optional[float], unit: str = "") -> str:
  if x is None:
    return "n/a"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def suggestions(fsdp: int, num_devices: int, batch_size: int) -> str:
  """What to try when a plan does not fit, in the words of the config keys."""
  tips = []
  if fsdp < num_devices:
    tips.append("FSDP over more chips (--config.mesh.data=1 --config.mesh.fsdp=-1, or "
                "mesh.fsdp=N with data=-1)")
  tips.append("--config.model.remat_policy=dots_saveable (keep only matmul outputs for the "
              "backward pass; nothing_saveable keeps nothing)")
  tips.append("--config.grad_accum_steps=N (the batch in N micro-batches)")
  tips.append(f"a smaller --config.batch_size (now {batch_size})")
  tips.append("--config.model.dtype=bfloat16 (halves the activations that are bf16)")
  return "; ".join(tips)


def does_not_fit_message(p: Plan) -> str:
  need = max(p.train.total_bytes, p.eval.total_bytes if p.eval else 0)
  return (f"does not fit: {p.config_name or 'the config'} needs {_gib(need)} per chip on "
          f"{p.topology} ({p.chip.name}: {_gib(p.chip.hbm_bytes)} of HBM); try "
          f"{suggestions(p.mesh['fsdp'], p.num_devices, p.batch_size)}.")


def report(p: Plan) -> str:
  layout = ("pmap" if p.mode == "pmap" else f"mesh data={p.mesh['data']} "
            f"fsdp={p.mesh['fsdp']} model={p.mesh['model']}")
  lines = [f"Plan: {p.config_name or 'config'} on {p.topology}: {p.num_devices} x "
           f"{p.device_kind} ({p.num_processes} host(s)), {layout}; batch "
           f"{p.batch_size} of {'x'.join(map(str, p.image_shape))} ({p.per_chip_batch:g} per "
           f"chip), {p.num_classes} classes."]
  steps = [("train step", p.train)] + ([("eval step", p.eval)] if p.eval else [])
  for name, s in steps:
    lines.append(f"  {name} (compiled in {s.compile_seconds:.1f} s), per chip: arguments "
                 f"{_gib(s.argument_bytes)}, temporaries {_gib(s.temp_bytes)}, outputs "
                 f"{_gib(s.output_bytes)} ({_gib(s.alias_bytes)} of them in donated "
                 f"arguments), code {_gib(s.code_bytes)}: total {_gib(s.total_bytes)}" +
                 (f" of {_gib(p.chip.hbm_bytes)} HBM" if p.chip else ""))
  t = p.train
  lines.append(f"  FLOPs per step per chip (dots and convolutions of the program): "
               f"{_si(t.dot_flops)} ({_si(t.dot_flops / p.per_chip_batch)} per image; XLA's "
               f"cost_analysis, loop bodies once: {_si(t.xla_flops)})")
  fwd = p.forward_flops_per_image
  if fwd:
    lines.append(f"  forward per image (eval step): {_si(fwd)}FLOPs" +
                 (f"; analytic ViT count {_si(p.analytic_forward_flops)}FLOPs "
                  f"(compiled / analytic = {fwd / p.analytic_forward_flops:.3f})"
                  if p.analytic_forward_flops else ""))
  lines.append(f"  HBM traffic per step per chip, at least: {_gib(t.hbm_bytes)} (arguments and "
               "outputs once, temporaries twice)")
  if t.collectives:
    lines.append("  collectives per step: " + ", ".join(
        f"{k} x{int(v['count'])} ({_gib(v['bytes'])})" for k, v in sorted(t.collectives.items())))
  else:
    lines.append("  collectives per step: none")
  if p.unknown_trip_counts:
    lines.append(f"  note: {p.unknown_trip_counts} loop(s) without a known trip count were "
                 "counted once")
  r = p.roofline()
  if r:
    ici = "n/a (no published ICI figure)" if r["ici_s"] is None else f"{r['ici_s'] * 1e3:.1f} ms"
    lines.append(f"  roofline on {p.chip.name} ({_si(p.chip.bf16_flops)}FLOP/s bf16, which "
                 f"f32 dots at JAX's default precision get too; precision=highest "
                 f"{_si(p.chip.f32_flops)}FLOP/s; "
                 f"{_si(p.chip.hbm_bandwidth)}B/s HBM): compute {r['compute_s'] * 1e3:.1f} ms, "
                 f"HBM {r['hbm_s'] * 1e3:.1f} ms, ICI {ici}; step >= {r['step_s'] * 1e3:.1f} ms, "
                 f"<= {r['images_per_s_per_chip']:.0f} img/s per chip, MFU ceiling "
                 + (f"{r['mfu_ceiling']:.0%}" if r["mfu_ceiling"] else "n/a"))
    lines.append(f"  fits: {'yes' if p.fits() else 'NO'}")
  else:
    lines.append(f"  no chip figures for {p.device_kind!r}: no HBM check or roofline")
  return "\n".join(lines)


# --------------------------------------------------------------------------- the CLI.
_TOPOLOGY = flags.DEFINE_string("topology", "local",
                                "A TPU slice VERSION:SHAPE (v5e:4x4, v4:2x2x2, v5p:4x4x4, "
                                "v6e:8x8, v3:4x4) or 'local' (this machine's devices).")
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None,
                                    "Class count, when the data set cannot say (an image folder "
                                    "that is not here).")
_IMAGE_SHAPE = flags.DEFINE_list("image_shape", None, "H,W,C of the training images, instead "
                                 "of what the data set and pp_train give.")
_EVAL = flags.DEFINE_bool("eval", True, "Compile the eval step too.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vit_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  try:
    config = main_lib.checked_config()
    shape = tuple(int(x) for x in _IMAGE_SHAPE.value) if _IMAGE_SHAPE.value else None
    p = plan(config, _TOPOLOGY.value, image_shape=shape, num_classes=_NUM_CLASSES.value,
             compile_eval=_EVAL.value, config_name=_config_label(config))
  except DoesNotFit as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report(p), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(p.to_json(), f, indent=1)
  if p.fits() is False:
    print(f"error: {does_not_fit_message(p)}", file=sys.stderr)
    sys.exit(1)


def _config_label(config) -> str:
  return f"{config.model_name}, batch {config.batch_size}"


if __name__ == "__main__":
  from vit_jax import main as _main  # pylint: disable=g-import-not-at-top  (defines --config)
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_main.parse_flags)
