import pytest
import torch

from core.loading import load_model


@pytest.fixture(scope="session")
def smollm():
    """The default model with its trained weights, float32 on CPU."""
    return load_model("smollm2-135m", "cpu", "float32")


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama (GQA, tied embeddings) for fast structural tests."""
    return load_model("tiny", "cpu", "float32", random_weights=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
