"""Reliability drills: what the trainer survives (kills, damaged checkpoints, bad configs and data,
a dying process, a full disk), each run as a test and counted by `python -m tests.drills.report`."""
