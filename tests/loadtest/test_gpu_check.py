"""`make gpu-check` runs end to end; here on the CPU (`--device cpu --quick`), since CI has no
GPU: the same correctness checks, timings and real server, at small sizes."""

import json

import pytest
import torch

from loadtest.bench.gpu_check import main


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["--device", "cpu", "--quick", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    for layer in ("s4d", "s4"):
        assert result[layer]["correctness"]["ok"]
        assert result[layer]["speed"]["device_resident_s"] > 0
    assert result["server"]["device"] == "cpu" and result["server"]["ok"]
    assert "## GPU check" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: nothing to refuse")
def test_gpu_check_without_cuda_says_so(capsys):
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
