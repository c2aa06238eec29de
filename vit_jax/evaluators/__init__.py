"""Evaluators: top-1 classification and few-shot linear probes. Each checks `should_stop()` (if
given) between batches and raises `Stopped`, so a preemption signal never waits for a whole
evaluation."""


class Stopped(Exception):
  """An evaluation was abandoned between two batches because `should_stop()` became true."""


def check(should_stop) -> None:
  if should_stop is not None and should_stop():
    raise Stopped()
