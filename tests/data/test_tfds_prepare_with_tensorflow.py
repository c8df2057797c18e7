"""The Colab path: a standard TFDS set that is not prepared yet is prepared on first use.

Where TensorFlow and the network are present (Colab), ``data.load("mnist")`` downloads the raw
files and writes array_record through tfds's real MNIST builder, then reads them back through
``tfds.data_source``. No other test runs that path, because it needs TensorFlow and a network.
Here it runs offline: the raw files are small fake MNIST files in the real IDX format, served
over HTTP by a server on 127.0.0.1, and only two things are redirected to that server, the
builder's base URL and flaxcnn's network probe. Everything else is the real code: flaxcnn's
``load_tfds -> _prepare_or_explain -> prepare_array_record``, tfds's download manager (HTTP
download, gzip extraction), the MNIST builder (which reads the files with TensorFlow) and the
array_record writer. Any connection to a host other than 127.0.0.1 fails the test.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import importlib.util
import ipaddress
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# Checked without importing TensorFlow, as flaxcnn itself checks: every test worker collects
# this module, and only the one that runs the test should pay for TensorFlow's import.
if importlib.util.find_spec("tensorflow") is None:
    pytest.skip(
        "preparing a TFDS set needs TensorFlow (pip install tensorflow-cpu); reading does not",
        allow_module_level=True,
    )

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from flaxcnn import data
from flaxcnn.data import catalog

NUM_TRAIN, NUM_TEST = 12, 5
SIDE = 28


def fake_split(count: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first pixel is their id (offset + index) and labels equal to id % 10.

    Every other pixel is a constant of the id, so a read-back image can be checked whole.
    """
    ids = np.arange(offset, offset + count)
    images = ((ids[:, None, None] * 37 + 11) % 256).astype(np.uint8)
    images = np.broadcast_to(images, (count, SIDE, SIDE)).copy()
    images[:, 0, 0] = ids
    return images, (ids % 10).astype(np.uint8)


def write_idx(directory: Path, stem: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX format (big-endian magic and sizes, then the bytes), gzipped as served."""
    count = len(labels)
    image_header = struct.pack(">IIII", 2051, count, SIDE, SIDE)
    (directory / f"{stem}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(image_header + images.tobytes())
    )
    label_header = struct.pack(">II", 2049, count)
    (directory / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(label_header + labels.tobytes())
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; records each path requested instead of logging it to stderr."""

    requested: list[str]

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()


@pytest.fixture
def raw_server(tmp_path) -> Iterator[tuple[str, tuple[str, int], list[str]]]:
    """(base URL, (host, port), requested paths) of a local server of fake MNIST files."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_idx(raw, "train", *fake_split(NUM_TRAIN, 0))
    write_idx(raw, "t10k", *fake_split(NUM_TEST, NUM_TRAIN))
    requested: list[str] = []
    handler = type("Handler", (QuietHandler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(raw))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/", (host, port), requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def loopback_only(monkeypatch) -> list:
    """Refuse (and record) every connection to a host other than the loopback interface."""
    refused: list = []
    connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        try:
            loopback = host is None or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: refuse it, it would need DNS
            loopback = False
        if not loopback:
            refused.append(address)
            raise OSError(f"test is offline: connection to {address!r} refused")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return refused


def test_mnist_is_prepared_with_tensorflow_and_read_back(
    tmp_path, monkeypatch, raw_server, loopback_only
):
    url, probe, requested = raw_server
    # The only redirections: where the raw files and the network probe point, and the split
    # sizes the builder reads (tfds's own mnist_test.py shrinks them the same way).
    monkeypatch.setattr(mnist.MNIST, "URL", url)
    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", NUM_TRAIN)
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", NUM_TEST)
    monkeypatch.setattr(catalog, "NETWORK_PROBE", probe)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    data_dir = tmp_path / "tfds"
    assert catalog.tensorflow_installed()

    ds = data.load("mnist", data_dir=data_dir)

    # Downloaded over HTTP by tfds's download manager, and nothing else was contacted.
    assert sorted(requested) == [
        "/t10k-images-idx3-ubyte.gz",
        "/t10k-labels-idx1-ubyte.gz",
        "/train-images-idx3-ubyte.gz",
        "/train-labels-idx1-ubyte.gz",
    ]
    assert loopback_only == []
    assert "tensorflow" in sys.modules  # the builder read the raw files with TensorFlow
    (version_dir,) = (data_dir / "mnist").iterdir()
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "mnist-test.array_record-00000-of-00001",
        "mnist-train.array_record-00000-of-00001",
    ]

    info = ds.info
    assert (info.num_train, info.num_test) == (NUM_TRAIN, NUM_TEST)
    assert info.num_classes == 10 and info.class_names == tuple(str(c) for c in range(10))
    assert info.image_shape == (SIDE, SIDE, 1)
    assert info.hflip is False  # a mirrored digit is not a digit
    assert (info.mean, info.std) == catalog.KNOWN_STATISTICS["mnist"]
    for split, count, offset in ((ds.train, NUM_TRAIN, 0), (ds.test, NUM_TEST, NUM_TRAIN)):
        assert len(split) == count
        expected_images, _ = fake_split(count, offset)
        seen = []
        for i in range(count):
            example = split[i]
            image = np.asarray(example["image"])
            assert image.shape == (SIDE, SIDE, 1) and image.dtype == np.uint8
            ident = int(image[0, 0, 0])
            assert int(example["label"]) == ident % 10
            np.testing.assert_array_equal(image[..., 0], expected_images[ident - offset])
            seen.append(ident)
        assert sorted(seen) == list(range(offset, offset + count))  # each example once

    # tfds itself reads the same files without TensorFlow's help.
    source = tfds.data_source("mnist", data_dir=str(data_dir), split="test")
    assert len(source) == NUM_TEST and source[0]["image"].shape == (SIDE, SIDE, 1)

    # Prepared once: a second load neither downloads nor needs the network.
    monkeypatch.setattr(catalog, "network_reachable", lambda *a, **k: pytest.fail("probed"))
    again = data.load("mnist", data_dir=data_dir)
    assert len(requested) == 4 and again.info == info
