"""Mixed precision: the config's `amp` name -> the autocast dtype actually used on a device.

    amp="fp16"  float16 autocast + GradScaler (CUDA; on other devices bf16 instead, fp16 autocast there is poor)
    amp="bf16"  bfloat16 autocast, no scaler
    amp="none"  float32
    amp="auto"  CUDA: bf16 where the GPU has native bf16, else fp16. CPU: bf16 where the CPU has native bf16
                instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), else float32 (emulated bf16 is slower than
                float32). Other devices: float32.
"""
import torch

AMP_MODES = ("auto", "fp16", "bf16", "none")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


def cpu_flags(path="/proc/cpuinfo"):
    """The feature flags of the first CPU in /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there is no
    /proc/cpuinfo (macOS, Windows)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16():
    """True when the CPU executes bf16 natively: x86 avx512_bf16 / amx_bf16, Arm bf16 (FEAT_BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_amp(amp, device):
    """The mode ("fp16" | "bf16" | "none") used on `device` for the configured `amp` (one of AMP_MODES)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    device = torch.device(device)
    if amp == "auto":
        if device.type == "cuda":
            # native bf16 only (Ampere and newer): emulated bf16 on older GPUs is slower than fp16 + GradScaler
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "none"
        return "none"
    if amp == "fp16" and device.type != "cuda":
        return "bf16"
    return amp
