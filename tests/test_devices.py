"""ktinject.devices: the rules' ``auto`` device and the one table of dtype names."""

import logging

import pytest
import torch

import ktinject
from ktinject import devices
from ktinject.devices import auto_device, config_dtype, resolve_dtype


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(devices, "_logged_auto", set())


@pytest.mark.parametrize("cuda, expected", [(True, "cuda:0"), (False, "cpu")])
def test_builtin_gpu_is_auto_resolved_at_rule_load(monkeypatch, fresh_log, caplog, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with caplog.at_level(logging.INFO, logger="ktinject"):
        rules = ktinject.load_rules("qwen3_moe")
        ktinject.load_rules("llama")
    rest = next(r for r in rules if r.label == "rest-on-gpu")
    assert str(rest.replace.device) == expected
    assert str(next(r for r in rules if r.label == "projections").replace.device) == expected
    said = [r.getMessage() for r in caplog.records if "device 'auto'" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"device 'auto' is {expected} ")  # once, though resolved often
    assert ("CUDA is available" if cuda else "CUDA is not available") in said[0]


def test_explicit_gpu_overrides_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rules = ktinject.load_rules("qwen3_moe", vars={"gpu": "cpu"})
    assert {str(r.replace.device) for r in rules} == {"cpu"}
    assert str(ktinject.load_rules("llama", vars={"gpu": "cuda:1"}).rules[-1].replace.device) == "cuda:1"


def test_auto_in_any_rule_and_without_cuda_optimize_runs_on_cpu(monkeypatch, fresh_log):
    from tiny_models import tiny_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_device() == torch.device("cpu")
    model = tiny_model("llama")
    plan = ktinject.optimize(model, "- match: {name: '^$'}\n  replace: {op: keep, device: auto}\n")
    assert plan.devices() == {torch.device("cpu")}


def test_resolve_dtype_names_and_errors():
    assert resolve_dtype("auto", torch.float16) is torch.float16
    assert resolve_dtype(None, torch.float16) is torch.float16
    assert resolve_dtype("torch.bfloat16", torch.float32) is torch.bfloat16
    assert resolve_dtype(torch.float64, torch.float32) is torch.float64
    with pytest.raises(
        ktinject.KtInjectError,
        match=r"dtype must be one of float32, bfloat16, float16, 'auto' or a "
        r"torch dtype, got 'fp8'",
    ):
        resolve_dtype("fp8", torch.float32)


def test_config_dtype_reads_names_and_dtypes():
    class Config:
        dtype = "float16"

    assert config_dtype(Config()) is torch.float16
    Config.dtype = torch.float32
    assert config_dtype(Config()) is torch.float32
    Config.dtype = None
    assert config_dtype(Config()) is torch.bfloat16 and config_dtype(Config(), torch.float32) is torch.float32


def test_operator_dtype_kwargs_use_the_same_table():
    from ktinject.operators import devices as op_devices

    assert op_devices.resolve_dtype is resolve_dtype
    from ktinject.loading.model import resolve_dtype as load_dtype

    class Config:
        dtype = "float16"

    assert load_dtype(None, Config()) is torch.float16 and load_dtype("float32", Config()) is torch.float32
