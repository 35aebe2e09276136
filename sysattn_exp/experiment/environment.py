"""What a job ran on: versions, devices and the attention kernels' first-use verdicts.

Recorded in every job's config.yaml (section `environment`, not in the job key) and so in
its MLflow params; the parts that change scores (versions, device names) are also in the
score cache's condition (identity.condition)."""

import platform

import torch
import transformers

from sysattn_exp.attention import kernels


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices the model's weights are on (several under a device_map), sorted."""
    return sorted({parameter.device for parameter in model.parameters()}, key=str)


def device_names(model: torch.nn.Module) -> str:
    """The devices the model's weights are on, by name ("NVIDIA H100 80GB HBM3", "cpu"),
    sorted and joined by " + " when a device_map spreads it over several."""
    return " + ".join(sorted({device_name(device) for device in model_devices(model)}))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type  # "cpu", "mps", "meta": the CPU's model is not recorded


def cuda_capabilities(model: torch.nn.Module) -> str | None:
    """The compute capability of each CUDA device the weights are on ("8.0"), or None."""
    devices = [device for device in model_devices(model) if device.type == "cuda"]
    found = [".".join(map(str, torch.cuda.get_device_capability(d))) for d in devices]
    return " + ".join(found) if found else None


def environment(model: torch.nn.Module) -> dict:
    """python, torch, transformers and CUDA versions, device names and CUDA capability,
    and the kernel verdicts this process has reached so far (kernels.verdicts)."""
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, which YAML cannot write
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device_name": device_names(model),
        "cuda_capability": cuda_capabilities(model),
        "kernel_verdicts": kernels.verdicts(),
    }
