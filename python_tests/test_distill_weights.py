"""Published weights (kdkernels.distill.weights.load_weights): every checkpoint format of the distillation
repositories loads strictly and gives the saved model's outputs; mismatches and bad files are clear errors."""
import pytest
import torch
from torch import nn

from kdkernels.distill.weights import load_weights


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def trained() -> Small:
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_same_model(loaded: nn.Module, saved: nn.Module) -> None:
    x = torch.randn(2, 3, 6, 6)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    torch.testing.assert_close(loaded.eval()(x), saved(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [
    lambda state: state,                                                                 # bare state dict
    lambda state: {"epoch": 240, "model": state, "accuracy": 79.4, "optimizer": {}},    # RepDistiller / mdistiller
    lambda state: {"state_dict": state, "epoch": 3},                                     # Lightning-style
    lambda state: {"net": state},
    lambda state: {f"module.{key}": value for key, value in state.items()},              # saved from DataParallel
    lambda state: {"model": {f"_orig_mod.{key}": value for key, value in state.items()}},   # torch.compile wrapper
], ids=["bare", "model", "state_dict", "net", "module-prefix", "compile-prefix"])
def test_every_checkpoint_format_loads_strictly(tmp_path, wrap):
    saved = trained()
    torch.save(wrap(saved.state_dict()), tmp_path / "teacher.pth")
    assert_same_model(load_weights(Small(), tmp_path / "teacher.pth"), saved)


def test_a_whole_saved_model_needs_allow_pickle(tmp_path):
    saved = trained()
    torch.save(saved, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_weights(Small(), tmp_path / "whole.pt")
    assert_same_model(load_weights(Small(), tmp_path / "whole.pt", allow_pickle=True), saved)
    torch.save({"epoch": 1, "model": saved}, tmp_path / "inside.pt")
    assert_same_model(load_weights(Small(), tmp_path / "inside.pt", allow_pickle=True), saved)


def test_mismatches_are_listed(tmp_path):
    state = trained().state_dict()
    state["fc.weight"] = torch.zeros(7, 4)
    del state["bn.running_var"]
    state["head.bias"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        load_weights(Small(), tmp_path / "bad.pth")
    message = str(error.value)
    assert "3 mismatches" in message and "bad.pth" in message
    assert "missing bn.running_var (4,)" in message and "unexpected head.bias (3,)" in message
    assert "shape of fc.weight: checkpoint (7, 4), model (5, 4)" in message


def test_bad_files_and_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_weights(Small(), tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint"):
        load_weights(Small(), tmp_path / "garbage.pth", allow_pickle=True)
    torch.save({"epoch": 3, "accuracy": 1.0}, tmp_path / "nomodel.pth")
    with pytest.raises(ValueError, match=r"no state dict found.*\['accuracy', 'epoch'\]"):
        load_weights(Small(), tmp_path / "nomodel.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="got list"):
        load_weights(Small(), tmp_path / "list.pth")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_weights("resnet", tmp_path / "list.pth")
    with pytest.raises(TypeError, match="path must be a path"):
        load_weights(Small(), 3)
