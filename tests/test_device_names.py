"""The device names drivers report resolve to catalog GPUs (`kvmodel calibrate` files a calibration under them)."""

import pytest

from kvmodel.specs import gpu_for_device_name


@pytest.mark.parametrize("device_name, catalog_name", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"),  # torch.cuda.get_device_name on an H100 SXM
    ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA H200", "H200-SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX-4090"),
    ("AMD Instinct MI300X", "MI300X"),
    ("AMD Radeon PRO W7900", "Radeon-Pro-W7900"),
])
def test_driver_device_name_resolves_to_its_catalog_gpu(device_name, catalog_name):
    assert gpu_for_device_name(device_name).name == catalog_name


@pytest.mark.parametrize("device_name", ["NVIDIA Tesla T4", "Intel Arc A770", "NVIDIA"])
def test_unknown_device_name_raises_lookup_error(device_name):
    with pytest.raises(KeyError):
        gpu_for_device_name(device_name)
