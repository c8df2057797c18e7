"""Standard TFDS names: read where prepared as array_record, else a one-line how-to."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxcnn import data
from flaxcnn.data import catalog
from flaxcnn.data.builders import prepare_array_record
from flaxcnn.data.imaging import encode_png


class FlaxcnnTestShapes(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS set shaped like the catalog's: an extra feature, a validation split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(6, 6, 3)),
                    "label": tfds.features.ClassLabel(names=["dark", "light"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "validation": self._generate_examples(6)}

    def _generate_examples(self, count):
        for i in range(count):
            image = np.full((6, 6, 3), 50 if i % 2 else 200, np.uint8)
            yield i, {"id": f"x{i}", "image": encode_png(image), "label": 1 - i % 2}


@pytest.fixture(autouse=True)
def no_tensorflow(monkeypatch):
    """Behave as on a machine without TensorFlow even where it is installed: never download."""
    monkeypatch.setattr(catalog, "tensorflow_installed", lambda: False)


def test_unprepared_mnist_says_in_one_line_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetNotPrepared) as error:
        data.load("mnist", data_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    assert f"tfds build mnist --data_dir={tmp_path} --file_format=array_record" in message
    assert "TensorFlow" in message


def test_unreachable_network_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "tensorflow_installed", lambda: True)
    monkeypatch.setattr(catalog, "network_reachable", lambda: False)
    with pytest.raises(data.DatasetNotPrepared, match="network is unreachable"):
        data.load("cifar10", data_dir=tmp_path)


def test_manual_downloads_are_explained(tmp_path):
    with pytest.raises(data.DatasetNotPrepared, match=r"manual download.*downloads/manual"):
        data.load("imagenet2012", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("minst", "did you mean mnist"), ("cifar-10", "cifar10"), ("imagenette/99px", "160px-v2")],
)
def test_unknown_names_get_suggestions(tmp_path, name, hint):
    with pytest.raises(ValueError, match=hint) as error:
        data.load(name, data_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_prepared_set_is_read_by_name_without_its_other_features(tmp_path):
    prepare_array_record(FlaxcnnTestShapes(data_dir=str(tmp_path)))
    ds = data.load("flaxcnn_test_shapes", data_dir=tmp_path)
    info = ds.info
    assert (info.num_train, info.num_test) == (20, 6)  # "validation" serves as the test split
    assert info.class_names == ("dark", "light") and info.image_shape == (6, 6, 3)
    assert info.hflip is True
    assert set(ds.test[0]) == {"image", "label"}
    # Statistics measured once on the training split, then cached.
    np.testing.assert_allclose(info.mean, [125 / 255] * 3, atol=1e-6)
    np.testing.assert_allclose(info.std, [75 / 255] * 3, atol=1e-6)
    (cache,) = (tmp_path / catalog.STATS_DIR).iterdir()
    assert json.loads(cache.read_text())["mean"] == list(info.mean)


def test_set_prepared_only_as_tfrecord_says_how_to_convert(tmp_path):
    builder = FlaxcnnTestShapes(data_dir=str(tmp_path))
    prepare_array_record(builder)
    info_file = builder.data_path / "dataset_info.json"
    info_file.write_text(info_file.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(data.DatasetNotPrepared, match="tfds convert_format --dataset_version_dir="):
        data.load("flaxcnn_test_shapes", data_dir=tmp_path)


def test_known_statistics_and_flips():
    assert catalog.KNOWN_STATISTICS["cifar10"][0] == (0.4914, 0.4822, 0.4465)
    assert "mnist" in catalog.NO_HFLIP and "cifar10" not in catalog.NO_HFLIP
