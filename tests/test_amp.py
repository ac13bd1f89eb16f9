"""utils/amp.py: the AMP mode used per device (amp=auto with patched capability answers), the dtype table, the CPU
flag parsing, and the config accepting auto."""
import os

import pytest
import torch

from utils import amp
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: spectre\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text,expected", [
    (X86.format(extra="avx512_bf16 amx_tile"), {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_tile"}),
    (ARM.format(extra="bf16 i8mm"), {"fp", "asimd", "sve", "bf16", "i8mm"}),
    ("processor\t: 0\n", set()),
])
def test_cpu_flags_parses_x86_and_arm(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text + text.replace("processor\t: 0", "processor\t: 1").replace("sse2", "other"))
    assert amp.cpu_flags(str(path)) == expected  # the first CPU's line only
    assert amp.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("flags,native", [
    ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"asimd", "bf16"}, True),
    ({"avx512f", "avx512bw", "avx2"}, False), (set(), False),
])
def test_cpu_native_bf16(monkeypatch, flags, native):
    monkeypatch.setattr(amp, "cpu_flags", lambda: flags)
    assert amp.cpu_has_native_bf16() is native


@pytest.mark.parametrize("device,cpu_bf16,cuda_bf16,expected", [
    ("cpu", True, None, "bf16"),
    ("cpu", False, None, "none"),
    ("cuda", None, True, "bf16"),
    ("cuda", None, False, "fp16"),
    ("mps", None, None, "none"),
])
def test_auto_selection(monkeypatch, device, cpu_bf16, cuda_bf16, expected):
    calls = []

    def cuda_answer(including_emulation=True):
        calls.append(including_emulation)
        return cuda_bf16

    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", cuda_answer)
    assert amp.resolve_amp("auto", torch.device(device)) == expected
    assert calls == ([False] if device == "cuda" else [])  # native bf16 only, never the emulated answer


@pytest.mark.parametrize("mode,device,expected", [
    ("fp16", "cuda", "fp16"), ("fp16", "cpu", "bf16"), ("bf16", "cpu", "bf16"), ("bf16", "cuda", "bf16"),
    ("none", "cpu", "none"), ("none", "cuda", "none"),
])
def test_explicit_modes(mode, device, expected):
    assert amp.resolve_amp(mode, device) == expected


def test_dtypes_and_bad_mode():
    assert amp.AMP_DTYPES == {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
    assert amp.AMP_MODES == ("auto", "fp16", "bf16", "none")
    with pytest.raises(ValueError, match=r"amp must be one of \('auto', 'fp16', 'bf16', 'none'\), got 'fp32'"):
        amp.resolve_amp("fp32", "cpu")


def test_config_accepts_auto():
    config = os.path.join(REPO, "configs", "tiny_cpu.py")
    assert get_config(config, ["amp=auto"]).amp == "auto"
    with pytest.raises(ValueError, match=r"config field amp must be one of \('auto', 'fp16', 'bf16', 'none'\), "
                                         r"got 'fp32'"):
        get_config(config, ["amp=fp32"])
