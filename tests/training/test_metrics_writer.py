"""The TensorBoard side of `MetricsWriter`: real scalar events, and no PyTorch start-up cost.

tensorboardX imports torch whenever it is installed (2.7 s here); the writer hides it
during that import. Checked in a fresh interpreter, where nothing has imported torch yet.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

WRITE = """
import json, sys
from flaxcnn.training import metrics
writer = metrics.MetricsWriter(sys.argv[1])
writer.write({"split": "train", "epoch": 1, "step": 7, "loss": 1.5, "accuracy": 0.25})
writer.close()
hidden_during_the_run = "torch" not in sys.modules
try:
    import torch  # noqa: F401  (importable again afterwards, where installed)
    importable = True
except ImportError:
    importable = False
print(json.dumps({"hidden": hidden_during_the_run, "importable": importable}))
"""


def events(directory: Path) -> list[event_pb2.Event]:
    """The records of TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
    found = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            found.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return found


@pytest.mark.slow
def test_scalars_are_written_without_importing_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", WRITE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hidden"]
    assert report["importable"] == (importlib.util.find_spec("torch") is not None)

    scalars = {
        (value.tag, event.step): value.simple_value
        for event in events(tmp_path / "tensorboard")
        for value in event.summary.value
    }
    assert scalars == {("train/loss", 7): 1.5, ("train/accuracy", 7): 0.25}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "split": "train", "epoch": 1, "step": 7, "loss": 1.5, "accuracy": 0.25,
    }  # fmt: skip
