"""The files of `flaxcnn.convert`: reading a state_dict safely, writing a run atomically.

`read_state_dict` reads `.safetensors` with safetensors' numpy loader (no torch needed) and
anything else only through `torch.load(..., weights_only=True)`, torch's restricted
unpickler, which refuses every Python object that is not a tensor or a plain container: no
code in a file can run. `write_run` builds the run directory beside its destination and
renames it into place when complete, so a failure leaves nothing behind. Every problem is
a `UsageError` of one line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn.cli import UsageError

TORCH_HINT = "pip install 'flaxcnn[torch]', or give a .safetensors file"
CONVERTED_FORMAT = "torchvision"


# -- reading -------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: numpy array} from a `.safetensors` file or a PyTorch file of a state_dict.

    bfloat16 tensors come back as float32 (numpy has no bfloat16). UsageError, one line
    naming the file (and the first offending key), for anything else: a missing file, a
    directory, an empty or unreadable file, a file that is not a checkpoint, a pickle that
    holds other Python objects than tensors (refused unread), a top level that is not a
    mapping of names to tensors, or a .pth without torch installed.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a state_dict file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if size == 0:
        raise UsageError(f"{path} is empty")
    loaded = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return _state_dict(path, loaded)


def _read_safetensors(path: Path) -> Any:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise UsageError(f"cannot read {path} as safetensors: {_one_line(e)}") from None
        return _read_safetensors_bf16(path)  # numpy has no bfloat16: read it ourselves
    except Exception as e:  # SafetensorError and the like
        raise UsageError(f"cannot read {path} as safetensors: {_one_line(e)}") from None


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _read_safetensors_bf16(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file with bfloat16 tensors, those widened to float32 (the format: an
    8-byte little-endian header length, a JSON header, the raw little-endian data)."""
    try:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        body = memoryview(data)[8 + length :]
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = body[start:end]
            if info["dtype"] == "BF16":
                bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
            out[key] = array.reshape(info["shape"]).copy()
        return out
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise UsageError(f"cannot read {path} as safetensors: {_one_line(e)}") from None


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise UsageError(
            f"{path} is a PyTorch file; reading it needs torch: {TORCH_HINT}"
        ) from None

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # What torch.load raises, in every version the torch extra allows, when its
        # restricted unpickler refuses a file. Its text advises re-running with
        # weights_only=False, which a user must not do with a file they cannot trust, and
        # its wording changes between versions: the file's own pickle says what it holds.
        objects = _pickled_objects(path)
        if objects is None:  # garbage, or a pickle torch's safe loader does not read
            raise UsageError(f"{path} is not a PyTorch checkpoint (not a pickle)") from None
        named = f" ({', '.join(objects[:3])}{', ...' if len(objects) > 3 else ''})"
        raise UsageError(
            f"{path} holds Python objects other than tensors{named if objects else ''}; "
            "refused unread, as reading it could run code from the file. Save "
            "model.state_dict(), or give a .safetensors file"
        ) from None
    except Exception as e:  # torch's errors for files that are not checkpoints vary
        raise UsageError(f"{path} is not a PyTorch checkpoint ({_reason(e)})") from None


_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}


def _pickled_objects(path: str | os.PathLike) -> list[str] | None:
    """The classes and functions a PyTorch file's pickle names that torch's restricted
    unpickler does not allow (a set or the like has no name), or None if the file holds no
    readable pickle. `pickletools` reads the opcodes and runs nothing: those of the file
    (a legacy .pth is several pickles in a row, then raw tensor data) or of the `data.pkl`
    in a zip archive (torch.save's format since PyTorch 1.6)."""
    from torch import _weights_only_unpickler

    allowed = set(getattr(_weights_only_unpickler, "_get_allowed_globals", dict)())
    names: list[str] = []
    parsed = False
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not members:
                    return None
                stream = stack.enter_context(archive.open(members[0]))
            else:
                stream = stack.enter_context(open(path, "rb"))
            for _ in range(8):  # a legacy file's pickles; the raw data after them ends this
                for name in _globals(stream):
                    if name not in allowed and name not in names:
                        names.append(name)
                parsed = True
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, UnicodeDecodeError):
        pass  # the end of the pickles, or no pickle at all
    return names if parsed else None


def _globals(stream: Any) -> list[str]:
    """The "module.name" of every global one pickle in `stream` refers to (ValueError at
    the end of the data or where it is not a pickle)."""
    found, strings, memo = [], [], {}
    top = None  # what the last opcode pushed, where it is a string
    for opcode, arg, _ in pickletools.genops(stream):
        name = None
        if opcode.name in _STRING_OPCODES:
            top = arg
            strings.append(arg)
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = top
        elif opcode.name in _PUT_OPCODES:
            memo[arg] = top
        elif opcode.name in _GET_OPCODES:
            top = memo.get(arg)
            strings.append(top)
        else:
            top = None
            if opcode.name in ("GLOBAL", "INST"):  # protocols 0-3: "module name"
                name = arg.replace(" ", ".", 1)
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4 on
                name = f"{strings[-2]}.{strings[-1]}"
        if name is not None:
            found.append(re.sub(r"^__builtin__\.", "builtins.", name))  # Python 2's name
    return found


def _reason(e: BaseException) -> str:
    """torch.load's complaint in a few words; never its advice to load unsafely."""
    detail = _one_line(e)
    if "weights_only" in detail:
        detail = type(e).__name__
    return f"torch.load: {detail[:160]}"


def _state_dict(path: Path, loaded: Any) -> dict[str, np.ndarray]:
    """The loaded top level as {name: numpy array}; UsageError for anything else."""
    if not isinstance(loaded, Mapping):
        raise UsageError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict (a mapping of names "
            "to tensors): save model.state_dict()"
        )
    if not loaded:
        raise UsageError(f"{path} holds an empty state_dict")
    out = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise UsageError(f"{path}: key {key!r} is not a name (a {type(key).__name__})")
        array = _to_numpy(value)
        if array is None:
            nested = (
                " (a training checkpoint? save model.state_dict() itself)"
                if isinstance(value, Mapping)
                else ""
            )
            raise UsageError(
                f"{path}: {key!r} holds a {type(value).__name__}, not a tensor{nested}"
            )
        out[key] = array
    return out


def _to_numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        if value.dtype.name == "bfloat16" or value.dtype.name.startswith("float8"):
            return value.astype(np.float32)  # ml_dtypes' (once jax is loaded): widened, as below
        return value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        try:
            tensor = value.detach().cpu()
            if (
                tensor.is_floating_point()
                and tensor.dtype.itemsize < 4
                and str(tensor.dtype) != "torch.float16"
            ):
                tensor = tensor.float()  # bfloat16, float8: numpy has neither
            return tensor.numpy()
        except Exception:
            return None
    return None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- writing -------------------------------------------------------------------------------


def check_out(out: str | os.PathLike) -> Path:
    """`out` as a Path, if a run can be written there: it must not exist (or be an empty
    directory), and the nearest existing directory above it must be writable. Writes
    nothing; UsageError otherwise."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            raise UsageError(f"--out {out} is not empty; choose a new directory")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write to {parent}")
    return out


def converted_from(source_path: str | os.PathLike) -> dict[str, str]:
    path = Path(source_path).absolute()
    return {"format": CONVERTED_FORMAT, "file": str(path), "sha256": sha256(path)}


def write_run(
    out: str | os.PathLike,
    arch: str,
    variables: Mapping[str, Any],
    options: Mapping[str, Any],
    source_path: str | os.PathLike,
) -> Path:
    """Write converted ImageNet weights as a run directory at `out` and return its path:
    `checkpoints/0/` (params, batch_stats, and metadata naming the 1000 classes, the
    preprocessing and the source file) and `config.json`. Built in a hidden sibling and
    renamed into place when complete; UsageError, before anything is written, if `out` is
    not new (or an empty directory) or cannot be written."""
    from flaxcnn import imagenet
    from flaxcnn.training.build import Network
    from flaxcnn.training.checkpoint import Checkpoints
    from flaxcnn.training.rundir import CHECKPOINTS, CONFIG, absl_errors_only, write_json_atomic

    out = check_out(out)
    source = converted_from(source_path)
    options = dict(options)
    meta = {
        **Network(arch, 1000, imagenet.CROP, 3, "float32", options).meta(),
        "class_names": imagenet.wordnet_ids(),
        "class_descriptions": imagenet.class_names(),
        "dataset": imagenet.DATASET,
        "preprocessing": imagenet.preprocessing(),
        "converted_from": source,
    }
    config = {
        "arch": arch,
        "dataset": imagenet.DATASET,
        "image_size": imagenet.CROP,
        "model_options": options,
        "converted_from": source,
    }
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats") or {},
    }
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with absl_errors_only():
            checkpoints = Checkpoints(tmp / CHECKPOINTS, keep=1)
            try:
                checkpoints.save(0, state, {}, meta, None)
            finally:
                checkpoints.close()
        write_json_atomic(tmp / CONFIG, config)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
