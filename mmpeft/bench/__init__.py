"""Benchmarks run as commands (never as timed tests); each prints the machine and settings."""

import os
import platform

# Full fine-tuning of a pretrained encoder needs a far smaller learning rate than adapters
# (2e-3 took the easy-VQA text encoder to 52.5%; 5e-5 to 82.9%).
FULL_FINETUNE_LR = 5e-5


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info
