"""Experiments: sweep definitions (`fmnist_data_scaling.py`, `paper_scale.py`), their building
blocks (`sweep.py`), the runner (`runner.py`) and the results table and plots (`aggregate.py`).

  python -m experiments.runner experiments/fmnist_data_scaling.py --out=workdirs/fmnist_scaling
"""
