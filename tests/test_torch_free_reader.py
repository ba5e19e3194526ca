"""`checkpoints.torch_files`: .pt/.pth files read without torch, bit for bit, and safely.

Every file here is written by torch itself (`torch.save`, zip and legacy formats) or is a
torch file with one part rewritten (the pickle, a record); the reference for every value
is `torch.load(weights_only=True)` on the same file.
"""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusion_jax.checkpoints import read_torch_state_dict, torch_files  # noqa: E402
from diffusion_jax.evaluation import read_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZIP_ONLY_DTYPES = (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    *ZIP_ONLY_DTYPES,  # pickled with _rebuild_tensor_v3; torch cannot read them as legacy
)


def reference_state_dict(legacy: bool) -> OrderedDict:
    """Every dtype, plus views that share, stride, transpose, broadcast and offset storage."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=gen) * 50
    state = OrderedDict()
    for dtype in DTYPES:
        if not (legacy and dtype in ZIP_ONLY_DTYPES):
            state[f"every_dtype.{str(dtype)[6:]}"] = base.to(dtype)
    state["base"] = base
    state["shared.row"] = base[2]  # contiguous view at an offset: shares base's storage
    state["shared.column"] = base[:, 3]  # strided
    state["shared.transposed"] = base.t()
    state["shared.stepped"] = base[1::2, ::3]
    state["broadcast"] = torch.arange(3.0).expand(4, 3)  # stride 0
    state["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    state["empty"] = torch.zeros(0, 4)
    state["conv.weight"] = torch.randn(8, 3, 3, 3, generator=gen).permute(0, 2, 3, 1)
    state["num_batches_tracked"] = torch.tensor(7)
    state["parameter"] = torch.nn.Parameter(torch.ones(3))  # _rebuild_parameter
    return state


@pytest.fixture(scope="module", params=["zip", "legacy"])
def saved(request, tmp_path_factory):
    legacy = request.param == "legacy"
    path = tmp_path_factory.mktemp(request.param) / "state.pt"
    torch.save(reference_state_dict(legacy), path, _use_new_zipfile_serialization=not legacy)
    return path


def _raw_bytes(tensor) -> bytes:
    tensor = tensor.detach().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def assert_same_as_torch(ours: dict, path) -> None:
    """Key for key (in the file's order), dtype, shape and every bit as torch.load's."""
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        got = ours[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype.name == str(tensor.dtype).removeprefix("torch."), key
        assert got.shape == tuple(tensor.shape), key
        assert got.tobytes() == _raw_bytes(tensor), key  # NaN payloads and -0.0 included


def test_equals_torch_load_key_for_key_and_bit_for_bit(saved):
    ours = torch_files.load_state_dict(saved)
    assert_same_as_torch(ours, saved)
    assert len(ours) >= 20
    # Views of one storage stay views of one buffer, as torch's tensors share theirs.
    assert np.shares_memory(ours["shared.row"], ours["base"])
    np.testing.assert_array_equal(ours["shared.transposed"], ours["base"].T)
    assert ours["scalar"].shape == () and ours["scalar"] == 2.5


def test_guided_diffusion_and_inception_readers_get_the_same_values(saved):
    theirs = torch.load(saved, map_location="cpu", weights_only=True)
    with pytest.warns(np.exceptions.ComplexWarning):  # complex -> float32 drops imaginary parts
        converted = read_torch_state_dict(saved)
    assert list(converted) == list(theirs)
    for key, value in converted.items():
        assert value.dtype == np.float32
        if not theirs[key].is_complex():
            np.testing.assert_array_equal(value, theirs[key].detach().to(torch.float32).numpy())


def _rewrite_zip(src, dst, replace: dict[str, bytes]) -> None:
    """Copies torch's zip `src` to `dst`, uncompressed as torch writes, replacing records."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            suffix = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(suffix, zin.read(info.filename)))


def test_file_saved_on_a_gpu_reads_on_a_cpu(tmp_path):
    # The released checkpoints were saved from CUDA tensors: their storages say 'cuda:0'.
    path = tmp_path / "cpu.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read("cpu/data.pkl")
    assert b"X\x03\x00\x00\x00cpu" in pkl
    gpu = tmp_path / "gpu.pt"
    _rewrite_zip(
        path, gpu, {"data.pkl": pkl.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")}
    )
    np.testing.assert_array_equal(
        torch_files.load_state_dict(gpu)["w"], np.arange(6.0).reshape(2, 3)
    )
    assert_same_as_torch(torch_files.load_state_dict(gpu), gpu)


def test_reads_without_torch_installed(saved):
    """In a process where `import torch` fails, the files read with the same bytes."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
        "import hashlib, json\n"
        "from diffusion_jax.checkpoints import torch_files\n"
        "from diffusion_jax.checkpoints import read_torch_state_dict\n"
        f"state = torch_files.load_state_dict({str(saved)!r})\n"
        f"assert read_torch_state_dict({str(saved)!r}).keys() == state.keys()\n"
        "digests = [[k, hashlib.sha256(v.tobytes()).hexdigest()] for k, v in state.items()]\n"
        "print(json.dumps(digests))"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(saved, map_location="cpu", weights_only=True)
    want = [[k, hashlib.sha256(_raw_bytes(t)).hexdigest()] for k, t in theirs.items()]
    assert json.loads(result.stdout) == want


class _RunsCommand:
    """Unpickling this object runs a shell command (what a malicious .pt would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    """Unpickling this object evaluates Python code."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def _legacy_bytes(obj_pickle: bytes) -> bytes:
    """A legacy-format file: torch's three header pickles, then `obj_pickle`, no storages."""
    magic = 0x1950A86A20F9469CFC6C
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    header = b"".join(pickle.dumps(x, protocol=2) for x in (magic, 1001, info))
    return header + obj_pickle + pickle.dumps([], protocol=2)


@pytest.fixture
def malicious(tmp_path):
    """{name: (path, what the message names)}; each file, unpickled, would create `sentinel`."""
    sentinel = tmp_path / "sentinel"
    attack = {"sd": _RunsCommand(f"touch {sentinel}")}
    files = {}
    for protocol in (2, 4, 5):
        files[f"pickle{protocol}"] = (pickle.dumps(attack, protocol=protocol), "posix.system")
    code = f"open({str(sentinel)!r}, 'w')"
    files["eval"] = (pickle.dumps({"x": _Evaluates(code)}, protocol=4), "builtins.eval")
    files["legacy"] = (_legacy_bytes(pickle.dumps(attack, protocol=2)), "posix.system")
    # A real torch zip whose data.pkl is replaced by the attack.
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    _rewrite_zip(real, tmp_path / "zip.pt", {"data.pkl": pickle.dumps(attack, protocol=2)})
    files["zip"] = ((tmp_path / "zip.pt").read_bytes(), "posix.system")
    # Object creation opcodes without any global this reader admits.
    files["newobj"] = (b"\x80\x02)\x81.", "NEWOBJ")
    files["build"] = (b"\x80\x02}q\x00}q\x01b.", "BUILD")
    paths = {}
    for name, (content, named) in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        paths[name] = (tmp_path / f"{name}.pt", named)
    return paths, sentinel


def test_malicious_pickles_are_refused_without_running(malicious):
    paths, sentinel = malicious
    pickle.loads(paths["pickle2"][0].read_bytes())
    assert sentinel.exists()  # plain pickle runs the command: the files really are attacks...
    sentinel.unlink()
    for name, (path, named) in paths.items():
        with pytest.raises(torch_files.TorchFileError) as info:
            torch_files.load(path)
        message = str(info.value)
        assert str(path) in message and named in message, (name, message)
        assert "refused" in message and "\n" not in message, (name, message)
        assert "weights_only=False" not in message
    assert not sentinel.exists()  # ...and none of them ran


def test_whole_module_pickle_is_refused_naming_the_class(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(torch_files.TorchFileError) as info:
        torch_files.load_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a plain state dict of tensors")
    assert "torch.nn.modules.linear.Linear" in message and "model.state_dict()" in message


def _message(path) -> str:
    with pytest.raises((torch_files.TorchFileError, FileNotFoundError)) as info:
        torch_files.load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path, saved):
    good = saved.read_bytes()
    rng = np.random.default_rng(0)
    cases = {
        "random.pt": (b"\x13" + rng.bytes(999), "is not a PyTorch file"),
        "random_pickle_like.pt": (b"\x80" + rng.bytes(999), "truncated or corrupt"),
        "truncated.pt": (good[: len(good) * 2 // 3], "truncated or corrupt"),
        "text.pt": (b"just some text\n", "is not a PyTorch file: neither a zip"),
        "empty.pt": (b"", "is not a PyTorch file"),
        "plain_pickle.pt": (pickle.dumps({"a": 1}, protocol=2), "not one written by torch.save"),
    }
    npz = io.BytesIO()
    np.savez(npz, a=np.zeros(3))
    cases["npz.pt"] = (npz.getvalue(), "a zip archive, but not a PyTorch file")
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert expected in _message(tmp_path / name), name
    assert "does not exist" in _message(tmp_path / "missing.pt")
    assert "is a directory" in _message(tmp_path)


def test_corrupt_storage_bytes_and_forged_sizes_are_caught(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(8.0)}, path)
    with zipfile.ZipFile(path) as z:
        pkl, data = z.read("w/data.pkl"), z.read("w/data/0")
    # A tensor claiming more elements than its storage holds (an out-of-bounds read).
    forged = pkl.replace(b"K\x08\x85", b"K\x09\x85")  # size (8,) -> (9,)
    assert forged != pkl
    _rewrite_zip(path, tmp_path / "oob.pt", {"data.pkl": forged})
    assert "reads past the end of its storage" in _message(tmp_path / "oob.pt")
    # A storage record shorter than the pickle says.
    _rewrite_zip(path, tmp_path / "short.pt", {"data/0": data[:-4]})
    assert "does not hold 32 bytes" in _message(tmp_path / "short.pt")
    # A record damaged after the zip directory was written (same size, wrong CRC).
    damaged = bytearray(path.read_bytes())
    offset = damaged.find(data)
    damaged[offset] ^= 1
    (tmp_path / "crc.pt").write_bytes(bytes(damaged))
    assert "CRC" in _message(tmp_path / "crc.pt")
    # Saved on a big-endian machine: refused rather than read byte-swapped.
    _rewrite_zip(path, tmp_path / "big.pt", {"byteorder": b"big"})
    assert "big-endian" in _message(tmp_path / "big.pt")


def test_wrapped_checkpoint_is_not_a_flat_state_dict(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, path)
    loaded = torch_files.load(path)  # plain containers load...
    assert loaded["step"] == 3 and loaded["model"]["w"].tolist() == [1.0, 1.0]
    assert "not a flat state dict of tensors" in _message(path)  # ...but are no state dict


def test_legacy_inception_weights_read_as_torch_reads_them(tmp_path):
    # pytorch-fid's pt_inception .pth is a legacy-format file; its reader must take it.
    from test_inception import build_random_fid_inception

    state = build_random_fid_inception(seed=2).state_dict()
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert not f.read(2).startswith(b"PK")  # really the legacy format
    ours = read_state_dict(path)
    assert list(ours) == list(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy().astype(np.float32))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_randomly_damaged_pickles_fail_in_one_line(tmp_path, legacy):
    """Bytes of the pickle changed at random: a clean read or a TorchFileError, nothing else."""
    path = tmp_path / "w.pt"
    base = torch.arange(12.0).reshape(3, 4)
    state = OrderedDict(a=base, b=torch.arange(5), t=base.t(), h=torch.ones(2, dtype=torch.half))
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    good = path.read_bytes()
    if legacy:
        region = good[: good.index(b"\x80\x02]")]  # the header and object pickles
    else:
        with zipfile.ZipFile(path) as z:
            region = z.read("w/data.pkl")
    rng = np.random.default_rng(1)
    outcomes = {"read": 0, "refused or corrupt": 0}
    for i in range(150):
        damaged = bytearray(region)
        for position in rng.integers(0, len(region), rng.integers(1, 4)):
            damaged[position] = rng.integers(0, 256)
        target = tmp_path / f"damaged{i}.pt"
        if legacy:
            target.write_bytes(bytes(damaged) + good[len(region) :])
        else:
            _rewrite_zip(path, target, {"data.pkl": bytes(damaged)})
        try:
            torch_files.load(target)
            outcomes["read"] += 1
        except torch_files.TorchFileError as e:
            assert str(target) in str(e) and "\n" not in str(e), str(e)
            outcomes["refused or corrupt"] += 1
    assert outcomes["refused or corrupt"] > 50, outcomes
