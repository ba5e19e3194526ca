"""Every launcher turns bad input into exit status 1 and one `error: ...` line on stderr.

Each case runs `python -m launch.<name> ...` as a user would (the cases run concurrently,
once per module) and checks: status 1, exactly one line on stderr, starting with
`error:`, no traceback, and the words that name the problem and its fix. The
prepare_data cases go through tfds' registered builders (imagenet2012, lsun), not test
builders; the offline one reads lsun's download URLs (tfds' importlib_resources path).
"""

import os
import pickle
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONVERT = ["--torch_checkpoint={tmp}/model.pt", "--output={tmp}/out"]
TINY = "--config=configs/imagenet64.py:tiny"
SWEEP = ["--checkpoint={tmp}/none", "--reference={tmp}/ref.npz", "--workdir={tmp}/sweep"]
# Runs a launcher with every outgoing connection failing, as on a machine without network.
OFFLINE = textwrap.dedent(
    """
    import runpy, socket, sys
    def offline(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    socket.create_connection = offline
    socket.socket.connect = offline
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
)

# id: (launcher, arguments, words the error line must contain)
CASES = {
    # Config handling (any launcher with --config; convert_checkpoint here).
    "config_unknown_field": (
        "convert_checkpoint",
        [TINY, "--config.model.foo=1", *CONVERT],
        ["--config.model.foo", "config.model has no field 'foo'", "num_channels"],
    ),
    "config_misspelt_field": (
        "convert_checkpoint",
        [TINY, "--config.model.image_sise=8", *CONVERT],
        ["config.model has no field 'image_sise'", 'Did you mean "image_size"'],
    ),
    "config_misspelt_section": (
        "convert_checkpoint",
        [TINY, "--config.modle.image_size=8", *CONVERT],
        ["config has no field 'modle'", 'Did you mean "model" instead of "modle"?'],
    ),
    "config_missing_path": (
        "convert_checkpoint",
        ["--config=configs/imagenet65.py", *CONVERT],
        ["no config file configs/imagenet65.py", "repository root"],
    ),
    "config_not_python": (
        "convert_checkpoint",
        ["--config=README.md", *CONVERT],
        ["--config=README.md", "not a config file"],
    ),
    "config_bad_variant": (
        "convert_checkpoint",
        ["--config=configs/imagenet64.py:tinny", *CONVERT],
        ["unknown config variant 'tinny'", "'tiny'"],
    ),
    # The mesh, before any work (nothing is written to the workdir).
    "train_mesh_not_dividing": (
        "train",
        [TINY, "--workdir={tmp}/run", "--config.mesh.fsdp=3"],
        ["mesh.fsdp=3 does not divide the 8 devices", "--config.mesh.fsdp to one of [1, 2, 4, 8]"],
    ),
    # The .pt file.
    "pt_random_bytes": (
        "convert_checkpoint",
        [TINY, "--torch_checkpoint={tmp}/random.pt", "--output={tmp}/out"],
        ["random.pt is not a PyTorch file"],
    ),
    "pt_truncated": (
        "convert_checkpoint",
        [TINY, "--torch_checkpoint={tmp}/truncated.pt", "--output={tmp}/out"],
        ["truncated.pt is a truncated or corrupt PyTorch file"],
    ),
    "pt_text": (
        "convert_checkpoint",
        [TINY, "--torch_checkpoint={tmp}/notes.pt", "--output={tmp}/out"],
        ["notes.pt is not a PyTorch file", "starts with b'see "],
    ),
    "pt_whole_module": (
        "convert_checkpoint",
        [TINY, "--torch_checkpoint={tmp}/module.pt", "--output={tmp}/out"],
        ["module.pt is not a plain state dict", "torch.nn.modules.linear.Linear"],
    ),
    "pt_malicious": (
        "convert_checkpoint",
        [TINY, "--torch_checkpoint={tmp}/evil.pt", "--output={tmp}/out"],
        ["evil.pt is not a plain state dict", "posix.system", "refused without running it"],
    ),
    # prepare_data: registered tfds builders' real code paths.
    "prepare_unknown_name": (
        "prepare_data",
        ["--dataset=imagenet2013", "--data_dir={tmp}/data"],
        ["dataset='imagenet2013' is not a tfds dataset name", "did you mean 'imagenet2012'"],
    ),
    "prepare_misspelt_config": (
        "prepare_data",
        ["--dataset=lsun/bedrom", "--data_dir={tmp}/data"],
        ["tfds dataset 'lsun' has no config 'bedrom'", "did you mean 'bedroom'?"],
    ),
    "prepare_no_manual_dir": (
        "prepare_data",
        ["--dataset=imagenet2012", "--data_dir={tmp}/data"],
        [
            "{tmp}/data/downloads/manual",
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
            "--manual_dir=",
        ],
    ),
    "prepare_missing_archive": (
        "prepare_data",
        ["--dataset=imagenet2012", "--data_dir={tmp}/data", "--manual_dir={tmp}/manual"],
        ["{tmp}/manual lacks ILSVRC2012_img_val.tar", "Put the files there"],
    ),
    "prepare_no_network": (
        OFFLINE,
        ["--dataset=lsun/bedroom", "--data_dir={tmp}/data"],
        ["cannot reach dl.yf.io to download 'lsun/bedroom'", "Network is unreachable"],
    ),
    # evaluate: numeric flags before any work, a wrong weights file recognised.
    "evaluate_split_size_zero": (
        "evaluate",
        ["{tmp}/ref.npz", "{tmp}/ref.npz", "--is_split_size=0"],
        ["--is_split_size=0"],
    ),
    "evaluate_batch_size_zero": (
        "evaluate",
        ["{tmp}/ref.npz", "{tmp}/ref.npz", "--batch_size=0"],
        ["--batch_size=0"],
    ),
    "evaluate_image_npz_as_weights": (
        "evaluate",
        ["{tmp}/ref.npz", "{tmp}/ref.npz", "--inception_weights={tmp}/ref.npz"],
        ["ref.npz is not the FID Inception weights", "arr_0"],
    ),
    # sweep: the grid and the reference, before any sampling.
    "sweep_empty_grid": (
        "sweep",
        [TINY, *SWEEP, "--scales="],
        ["the grid is empty: --scales lists no values"],
    ),
    "sweep_bad_scale": (
        "sweep",
        [TINY, *SWEEP, "--scales=0,x"],
        ["--scales", "'0,x' is not a comma-separated list of floats"],
    ),
    "sweep_reference_size": (
        "sweep",
        [TINY, *SWEEP, "--scales=0"],
        ["--reference={tmp}/ref.npz holds 8x8 images; the model samples 16x16"],
    ),
    # make_reference.
    "reference_exists": (
        "make_reference",
        ["--images=mnist_5k", "--output={tmp}/ref.npz", "--image_size=8"],
        ["ref.npz exists; pass --overwrite"],
    ),
    "reference_zero_images": (
        "make_reference",
        ["--images=mnist_5k", "--output={tmp}/new.npz", "--num_images=0"],
        ["--num_images=0"],
    ),
    "reference_one_image": (  # refused before the Inception weights load
        "make_reference",
        ["--images={tmp}/one_png", "--output={tmp}/new.npz", "--image_size=8"],
        ["--images={tmp}/one_png holds 1 readable image(s); a reference batch needs at least 2"],
    ),
    "reference_misspelt_tfds_name": (
        "make_reference",
        ["--images=lsun/bedrom", "--output={tmp}/new.npz"],
        ["has no config 'bedrom' (did you mean 'bedroom'?); its configs: classroom, bedroom"],
    ),
}


class _RunsCommand:
    """Unpickling this object runs a shell command (what a malicious .pt does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _make_inputs(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp / "random.pt").write_bytes(b"\x13" + rng.bytes(4095))
    (tmp / "notes.pt").write_bytes(b"see the README for the checkpoint\n")
    evil = {"input_blocks.0.0.weight": _RunsCommand(f"touch {tmp}/sentinel")}
    (tmp / "evil.pt").write_bytes(pickle.dumps(evil, protocol=2))
    np.savez(tmp / "ref.npz", rng.integers(0, 256, (4, 8, 8, 3), np.uint8))
    (tmp / "one_png").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp / "one_png" / "a.png")
    (tmp / "manual").mkdir()
    (tmp / "manual" / "ILSVRC2012_img_train.tar").write_bytes(b"")
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.randn(256, 256)}, tmp / "good.pt")
    good = (tmp / "good.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save(torch.nn.Linear(2, 3), tmp / "module.pt")


def _run(case: str, tmp: Path) -> subprocess.CompletedProcess:
    launcher, args, _ = CASES[case]
    args = [a.format(tmp=tmp) for a in args]
    if launcher == OFFLINE:
        command = [sys.executable, "-c", OFFLINE, "launch.prepare_data", *args]
    else:
        command = [sys.executable, "-m", f"launch.{launcher}", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launcher_errors")
    _make_inputs(tmp)
    with futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2))) as pool:
        running = {case: pool.submit(_run, case, tmp) for case in CASES}
        done = {case: future.result() for case, future in running.items()}
    return tmp, done


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(results, case):
    tmp, done = results
    result = done[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for words in CASES[case][2]:
        assert words.format(tmp=tmp) in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]  # torch's unsafe advice is never repeated


def test_the_malicious_checkpoint_did_not_run(results):
    tmp, done = results
    assert done["pt_malicious"].returncode == 1
    assert not (tmp / "sentinel").exists()
    # The file is a working attack: plain pickle would have run the command.
    pickle.loads((tmp / "evil.pt").read_bytes())
    assert (tmp / "sentinel").exists()


def test_registered_tfds_builders_find_their_own_files(tmp_path):
    # tfds locates a registered builder's checksums (its download URLs) through
    # importlib_resources, which it declares only for Python < 3.9: requirements.txt has it.
    pytest.importorskip("tensorflow_datasets")
    from diffusion_jax.data import prepare

    builder = prepare.open_builder("lsun/bedroom", tmp_path)
    assert "http://dl.yf.io/lsun/scenes/bedroom_train_lmdb.zip" in builder.url_infos
