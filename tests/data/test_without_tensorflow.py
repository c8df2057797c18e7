"""The digits and folder paths, from preparation to batches, never import TensorFlow."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flaxcnn import data
from flaxcnn.data.bench import main as bench_main

REPO_ROOT = str(Path(data.__file__).resolve().parents[2])

SCRIPT = """
import sys
from flaxcnn import data

for name in ("digits", "folder:" + sys.argv[2]):
    ds = data.load(name, data_dir=sys.argv[1])
    batch = next(iter(data.TrainPipeline(ds, global_batch_size=4, image_size=16, channels=3,
                                         seed=0, process_index=0, process_count=1)))
    evaluation = data.eval_batches(ds, global_batch_size=4, image_size=16, channels=3,
                                   process_index=0, process_count=1)
    next(iter(evaluation))
loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print("TF:", loaded)
"""

# Shadows any real TensorFlow in the subprocess, so that an import is caught even on machines
# without TensorFlow, where a failed import would leave no trace in sys.modules.
TRIPWIRE = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("tensorflow was imported")
raise ImportError("tensorflow tripwire")
"""


@pytest.mark.slow
def test_digits_and_folders_never_import_tensorflow(tmp_path, image_folder):
    folder = image_folder(per_class=4)
    script = tmp_path / "no_tf.py"
    script.write_text(textwrap.dedent(SCRIPT))
    tripwire = tmp_path / "tripwire" / "tensorflow"
    tripwire.mkdir(parents=True)
    (tripwire / "__init__.py").write_text(TRIPWIRE)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tfds"), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tripwire.parent), REPO_ROOT])},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TF: []" in result.stdout
    assert not (tripwire / "imported").exists()


def test_bench_reports_images_per_second(digits_data_dir, capsys):
    bench_main(["--data-dir", str(digits_data_dir), "--batches", "5", "--batch-size", "64"])
    assert "images/s" in capsys.readouterr().out
