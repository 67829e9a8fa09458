"""What only the int4 (W4A16) engine has, on the CPU: int4 with tensor parallelism or another scheme's checkpoint
is refused, and --help names int4. The engine tests int4 shares with FP8 (tokens identical to the int4 reference
for 0/1/3 images, load-time RTN = the int4 checkpoint, --json, the --random-weights model):
test_engine_quantized.py."""
import subprocess
import sys

import pytest

from pixtral_rt.engine import Engine
from tests.quantized_helpers import write_engine_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """bf16 (Mistral layout), fp8, int4: the tiny() random model of seed 3."""
    return write_engine_checkpoints(tmp_path_factory.mktemp("int4"))


def test_int4_refusals(ckpts):
    with pytest.raises(ValueError, match=r"is an fp8 checkpoint.*--quantization int4 cannot convert it"):
        Engine.load(ckpts / "fp8", device="cpu", progress=False, quantization="int4")
    with pytest.raises(ValueError, match=r"is an int4 checkpoint.*--quantization fp8 cannot convert it"):
        Engine.load(ckpts / "int4", device="cpu", progress=False, quantization="fp8")
    out = subprocess.run([sys.executable, "-m", "pixtral_rt.generate", "--model", str(ckpts / "bf16"), "--device",
                          "cpu", "--quantization", "int4", "--tensor-parallel", "2", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--quantization int4 with --tensor-parallel is not supported" in out.stderr


def test_cli_help_says_int4():
    for cmd in ("pixtral_rt.generate", "pixtral_rt.serve"):
        h = subprocess.run([sys.executable, "-m", cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert h.returncode == 0 and "{fp8,int4}" in h.stdout and "int4: 4-bit weights" in " ".join(h.stdout.split())
