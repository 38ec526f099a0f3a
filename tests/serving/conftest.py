"""Fixtures for the serving tests: the tiny chat model directory, and that model loaded through ktinject."""

from __future__ import annotations

import pytest
import torch
from tiny_chat_model import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-model")
    save_tiny_model_dir(path)
    return path


@pytest.fixture(scope="session")
def loaded_model(tiny_model_dir):
    """The tiny model through ktinject.from_pretrained with the built-in rules on the CPU (cpu_experts)."""
    import ktinject

    torch.manual_seed(0)
    return ktinject.from_pretrained(tiny_model_dir, vars={"gpu": "cpu"}, progress=False)
