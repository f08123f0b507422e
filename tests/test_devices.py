"""``--device``: one rule for every stage, and a clear error instead of a silent CPU fall back."""

from __future__ import annotations

import pytest
import torch

from slidemil.devices import resolve_device
from slidemil.errors import ConfigError


def test_auto_and_cpu_resolve_to_a_device_that_exists():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_where_there_is_none_is_one_clear_error(name):
    with pytest.raises(ConfigError, match=rf"device '{name}' asked for but no CUDA GPU") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_this_ranks_gpu_and_one_gpu_for_all_ranks_is_refused():
    assert resolve_device("cuda", local_rank=0, world_size=2) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="puts every rank on one GPU"):
        resolve_device("cuda:0", local_rank=1, world_size=2)
