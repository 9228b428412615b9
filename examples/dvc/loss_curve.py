"""The training loss of a run as DVC plots it: <run>/metrics.jsonl -> [{"step": N, "loss": L}, ...].

python loss_curve.py runs/train loss.json
"""

import json
import sys
from pathlib import Path

from distributed_peft.runtime.tracking import read_metrics

run_dir, output = Path(sys.argv[1]), Path(sys.argv[2])
losses = {row["step"]: row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row}  # a resume repeats
output.write_text(json.dumps([{"step": step, "loss": loss} for step, loss in sorted(losses.items())], indent=1) + "\n")
