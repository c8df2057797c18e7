"""`flaxcnn.bench.memory`: configurations parse, the table reads right, a real measurement
comes back from its own process. The peaks themselves are what the script is for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flaxcnn import cli
from flaxcnn.bench import memory
from flaxcnn.bench.memory import Config


def test_configurations_parse_with_their_defaults():
    assert Config.parse("vgg11:224:16") == Config("vgg11", 224, 16, "float32", "pmap")
    assert Config.parse("resnet18:128:64:bfloat16:shard_map").strategy == "shard_map"
    for bad in ("vgg11:224", "vgg11:big:16", "vgg11::16", "a:1:2:3:4:5"):
        with pytest.raises(cli.UsageError):
            Config.parse(bad)
    for text in memory.DEFAULT_CONFIGS:
        assert Config.parse(text).text() == text


def test_a_bad_configuration_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run_main(lambda: memory.main(["--config", "vgg11:224"]))
    assert info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config 'vgg11:224'") and "\n" not in err


def test_the_table_shows_each_ratio_and_the_extremes():
    rows = [
        {
            **Config("vgg11", 224, 16).__dict__,
            "peak_bytes": 2**30,
            "estimate_bytes": 2**29,
            "ratio": 0.5,
            "xla_step_bytes": None,
        },
        {
            **Config("lenet5", 32, 8, "bfloat16").__dict__,
            "peak_bytes": 2**20,
            "estimate_bytes": 3 * 2**20,
            "ratio": 3.0,
            "xla_step_bytes": 2**20,
        },
    ]
    lines = memory.table(rows)
    assert "| vgg11 224px/16 | 1,024 | 512 | 0.50 |  | yes |" in lines
    assert "| lenet5 32px/8 bfloat16 | 1 | 3 | 3.00 | 1 | no |" in lines
    assert lines[-1] == "estimate/measured from 0.50 (vgg11) to 3.00 (lenet5)"


def test_recorded_peaks_are_estimated_again_without_measuring(tmp_path, capsys):
    recorded = tmp_path / "memory.json"
    measured = {**Config("lenet5", 32, 128).__dict__, "peak_bytes": 2**28, "devices": 1}
    recorded.write_text(json.dumps({"header": ["measured then"], "rows": [measured]}))
    memory.main(["--from-json", str(recorded)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "measured then"
    (line,) = [x for x in out if x.startswith("| lenet5 32px/128 | 256 |")]
    estimate = float(line.split("|")[3].replace(",", ""))
    assert line.split("|")[4].strip() == f"{estimate / 256:.2f}"


def test_a_file_that_is_not_a_record_is_one_line_and_exit_2(tmp_path, capsys):
    recorded = tmp_path / "memory.json"
    recorded.write_text(json.dumps({"rows": [{"arch": "lenet5"}]}))
    with pytest.raises(SystemExit) as info:
        memory.main(["--from-json", str(recorded)])
    assert info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --from-json {recorded}: not a file --json wrote")


@pytest.mark.slow
def test_a_measurement_runs_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--config", "lenet5:32:8", "--steps", "1", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "flaxcnn.bench.memory", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["peak_bytes"] > 0 and row["estimate_bytes"] > 0
    assert row["ratio"] == pytest.approx(row["estimate_bytes"] / row["peak_bytes"])
    assert "| lenet5 32px/8 |" in result.stdout
