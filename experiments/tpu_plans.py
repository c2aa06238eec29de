r"""The README's "Plans for TPU pods" table: the shipped ImageNet recipes planned for the slices
they would run on, with `python -m vit_jax.plan` (the real TPU compiler, no TPU needed).

  python -m experiments.tpu_plans [--out=experiments/results/tpu_plans] [--only=REGEX]

Each row is one planner command (printed in the table); its JSON plan is kept in OUT, and a row
whose JSON is there is not planned again (delete it to redo it), so an interrupted run resumes.
A row that does not fit is recorded with the planner's error. Then OUT/table.md (the README's
table) and OUT/mfu.md (benchmarks/README.md's) are written.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=-1")
DOTS = ("--config.model.remat_policy=dots_saveable",)
REMAT = ("--config.model.remat_policy=nothing_saveable",)
I1K = "configs/imagenet_scratch.py:imagenet1k,"

# (name, config, topology, extra flags). Each recipe as shipped, then, where that does not fit,
# the planner's first suggestion that does: recomputing what is not a matmul's output
# (remat_policy=dots_saveable; bf16 activations did not help: the saved GELU and softmax
# intermediates stay f32), else FSDP with it, else recomputing everything.
ROWS = [
    ("ViT-S/16 plain", I1K + "ViT-S/16,recipe=plain", "v3:2x2", ()),
    ("ViT-S/16 plain, dots_saveable", I1K + "ViT-S/16,recipe=plain", "v3:2x2", DOTS),
    ("ViT-S/16 plain", I1K + "ViT-S/16,recipe=plain", "v5e:4x4", ()),
    ("ViT-B/16", I1K + "ViT-B/16", "v5e:8x8", ()),
    ("ViT-B/16, dots_saveable", I1K + "ViT-B/16", "v5e:8x8", DOTS),
    ("ViT-B/16", I1K + "ViT-B/16", "v4:2x4x4", ()),
    ("ViT-B/16, dots_saveable", I1K + "ViT-B/16", "v4:2x4x4", DOTS),
    ("ViT-L/16", I1K + "ViT-L/16", "v5e:16x16", ()),
    ("ViT-L/16, dots_saveable", I1K + "ViT-L/16", "v5e:16x16", DOTS),
    ("ViT-L/16", I1K + "ViT-L/16", "v4:4x4x8", ()),
    ("ViT-H/14", I1K + "ViT-H/14", "v5e:16x16", ()),
    ("ViT-H/14 FSDP", I1K + "ViT-H/14", "v5e:16x16", FSDP),
    ("ViT-H/14 FSDP, dots_saveable", I1K + "ViT-H/14", "v5e:16x16", FSDP + DOTS),
    ("ViT-H/14 FSDP, nothing_saveable", I1K + "ViT-H/14", "v5e:16x16", FSDP + REMAT),
    ("ViT-H/14 FSDP", I1K + "ViT-H/14", "v4:4x4x8", FSDP),
    ("ViT-H/14 FSDP, dots_saveable", I1K + "ViT-H/14", "v4:4x4x8", FSDP + DOTS),
    ("ViT-H/14 FSDP", I1K + "ViT-H/14", "v5p:4x4x4", FSDP),
    ("ViT-H/14 FSDP, dots_saveable", I1K + "ViT-H/14", "v5p:4x4x4", FSDP + DOTS),
    ("ViT-H/14 FSDP, dots_saveable, 4 micro-batches", I1K + "ViT-H/14", "v5e:16x16",
     FSDP + DOTS + ("--config.grad_accum_steps=4",)),
    ("ViT-H/14 FSDP, dots_saveable, 2 micro-batches", I1K + "ViT-H/14", "v4:4x4x8",
     FSDP + DOTS + ("--config.grad_accum_steps=2",)),
    ("R50+ViT-B/16", I1K + "R50+ViT-B/16", "v4:2x4x4", ()),
    ("R50+ViT-B/16, dots_saveable", I1K + "R50+ViT-B/16", "v4:2x4x4", DOTS),
    ("Swin-B", I1K + "Swin-B", "v4:2x4x4", ()),
    ("DeiT-B", "configs/deit.py:DeiT-B/16", "v4:2x4x4", ()),
    ("DeiT-B", "configs/deit.py:DeiT-B/16", "v5e:8x8", ()),
]


def slug(name: str, topology: str, flags) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{topology}_{'_'.join(flags)}").strip("_")


def command(config: str, topology: str, flags) -> list:
  return ["python", "-m", "vit_jax.plan", f"--config={config}", f"--topology={topology}",
          *flags]


def run_row(out: str, name: str, config: str, topology: str, flags) -> dict:
  path = os.path.join(out, slug(name, topology, flags) + ".json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  cmd = command(config, topology, flags)
  t0 = time.monotonic()
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  tmp = path + ".plan.tmp"
  run = subprocess.run([sys.executable] + cmd[1:] + [f"--json={tmp}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  errors = [l[len("error: "):] for l in run.stderr.splitlines() if l.startswith("error: ")]
  row = dict(name=name, command=" ".join(cmd), returncode=run.returncode,
             seconds=round(time.monotonic() - t0, 1), error=errors[-1] if errors else None)
  if os.path.exists(tmp):
    with open(tmp) as f:
      row["plan"] = json.load(f)
    os.remove(tmp)
  elif run.returncode not in (0, 1):
    raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
  with open(path + ".tmp", "w") as f:
    json.dump(row, f, indent=1)
  os.replace(path + ".tmp", path)
  return row


def _per_chip_batch(p: dict) -> float:
  """Images per chip: the batch over data x fsdp (pmap: over every device)."""
  return p["batch_size"] / (p["devices"] if p["mode"] == "pmap" else
                            p["mesh"]["data"] * p["mesh"]["fsdp"])


def _roofline(p: dict) -> dict:
  """The plan's roofline, recomputed from its JSON with vit_jax.plan.roofline (so a change of
  that model redraws the tables without compiling again)."""
  if not p.get("chip"):
    return {}
  from vit_jax import plan  # pylint: disable=g-import-not-at-top
  t = p["train"]
  hbm = plan.least_hbm_bytes(t["argument_bytes"], t["output_bytes"], t["temp_bytes"])
  return plan.roofline(t["dot_flops"], hbm, sum(c["wire_bytes"] for c in t["collectives"].values()),
                       p["forward_flops_per_image"], _per_chip_batch(p),
                       plan.Chip(**p["chip"]))


def _cell_collectives(coll: dict) -> str:
  if not coll:
    return "none"
  return ", ".join(f"{k} x{int(v['count'])} ({v['bytes'] / 2 ** 30:.2f} GiB)"
                   for k, v in sorted(coll.items()))


def table(rows) -> str:
  lines = ["| recipe | slice | chips | mesh | batch / chip | GiB per chip (of HBM) | fits | "
           "TFLOPs per step per chip | collectives per step | step (ms, >=) | img/s per chip "
           "(<=) | MFU ceiling | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    p = r.get("plan")
    cmd = f"`{r['command']}`"
    if p is None:
      m = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)",
                    r["error"] or "")
      why = (f"no: {m.group(1)} of temporaries, {m.group(2)} available (the compiler)" if m
             else f"no: {r['error']}")
      lines.append(f"| {r['name']} | {r['command'].split('--topology=')[1].split()[0]} | | | | | "
                   f"{why} | | | | | | {cmd} |")
      continue
    t, roof = p["train"], _roofline(p)
    mesh = "pmap" if p["mode"] == "pmap" else (
        f"data {p['mesh']['data']} x fsdp {p['mesh']['fsdp']}")
    hbm = f" ({p['hbm_bytes'] / 2 ** 30:.0f})" if p["hbm_bytes"] else ""
    mfu = roof.get("mfu_ceiling")
    lines.append(
        f"| {r['name']} | {p['topology']} | {p['devices']} | {mesh} | "
        f"{_per_chip_batch(p):g} | {t['total_bytes'] / 2 ** 30:.2f}{hbm} | "
        f"{'yes' if p['fits'] else 'NO'} | {t['dot_flops'] / 1e12:.2f} | "
        f"{_cell_collectives(t['collectives'])} | {roof.get('step_s', 0) * 1e3:.0f} | "
        f"{roof.get('images_per_s_per_chip', 0):.0f} | "
        f"{f'{mfu:.0%}' if mfu else 'n/a'} | {cmd} |")
  return "\n".join(lines)


def mfu_table(rows) -> str:
  """The plans that fit, with their roofline: benchmarks/README.md's MFU-ceiling table."""
  lines = ["| recipe | slice | step (ms, >=) | img/s per chip (<=) | bound by | MFU ceiling |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    p = r.get("plan")
    roof = _roofline(p) if p else {}
    if not roof:
      continue
    parts = {"compute": roof["compute_s"], "HBM": roof["hbm_s"], "ICI": roof["ici_s"] or 0}
    lines.append(f"| {r['name']} | {p['topology']} | {roof['step_s'] * 1e3:.0f} | "
                 f"{roof['images_per_s_per_chip']:.0f} | {max(parts, key=parts.get)} | "
                 f"{roof['mfu_ceiling']:.0%} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results",
                                                    "tpu_plans"))
  parser.add_argument("--only", default="", help="regex: plan only the rows whose name and "
                      "topology match")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name, config, topology, flags in ROWS:
    if args.only and not re.search(args.only, f"{name} {topology}"):
      continue
    row = run_row(args.out, name, config, topology, flags)
    print(f"{name} on {topology}: {row['seconds']} s, "
          f"{'error: ' + row['error'] if row['error'] else 'planned'}", flush=True)
    rows.append(row)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table(rows) + "\n")
  with open(os.path.join(args.out, "mfu.md"), "w") as f:
    f.write(mfu_table(rows) + "\n")


if __name__ == "__main__":
  main()
