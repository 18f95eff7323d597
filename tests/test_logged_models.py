"""Models logged by an earlier sweeplab still load: a logged model pickles its class by import
path, so every class a model is saved as must stay importable where it was saved from."""

from pathlib import Path

import mlflow.pytorch
import pytest
import torch

LOGGED = Path(__file__).parent / "data" / "logged_models"


@pytest.mark.parametrize("name", ["LogisticRegression", "MLP"])
def test_a_model_logged_before_the_package_moved_loads_and_predicts_the_same(name: str) -> None:
    # logged by sweeplab at fa4c7d6 (digits, one epoch), when the models lived in sweeplab/models.py
    model = mlflow.pytorch.load_model(str(LOGGED / name))
    expected = torch.load(LOGGED / name / "expected.pt")
    assert type(model).__name__ == name
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(expected["x"]), expected["logits"])
