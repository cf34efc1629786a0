"""The paper's networks by name, and user networks named module:function."""
import pytest
import torch
from torch import nn

from nn_adapter.networks import build_network, resolve_network
from occore.errors import InputError


def _linear_widths(net):
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


def test_fcn_has_five_layers_width_and_activation_by_data_set():
    wine = build_network("fcn", (13,), 3, dataset="wine")
    assert _linear_widths(wine) == [(13, 10), (10, 10), (10, 10), (10, 10), (10, 3)]
    assert sum(isinstance(m, nn.Tanh) for m in wine) == 4
    digits = build_network("fcn", (64,), 10, dataset="digits")
    assert _linear_widths(digits)[0] == (64, 16) and any(isinstance(m, nn.Tanh) for m in digits)
    fm = build_network("fcn", (1, 28, 28), 10, dataset="fashion-mnist")
    assert _linear_widths(fm)[0] == (784, 32) and sum(isinstance(m, nn.ReLU) for m in fm) == 4
    assert isinstance(fm[0], nn.Flatten) and fm(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert len(_linear_widths(build_network("fcn", (4,), 3, width=7, depth=3))) == 3


def test_cnn_is_four_3x3_convolutions_of_32_channels_then_two_linear_layers():
    net = build_network("cnn", (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 32 for c in convs)
    assert len(_linear_widths(net)) == 2 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(InputError, match="square images"):
        build_network("cnn", (13,), 3)


def test_sigmoid_mlp_is_deep_with_sigmoids():
    net = build_network("sigmoid-mlp", (64,), 10)
    assert len(_linear_widths(net)) >= 9 and sum(isinstance(m, nn.Sigmoid) for m in net) == len(_linear_widths(net)) - 1


def test_user_networks_by_module_or_file(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def tiny(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(int(__import__('math').prod(input_shape)), num_classes))\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_network("my_nets:tiny", (2, 3), 4)(torch.zeros(5, 2, 3)).shape == (5, 4)
    assert build_network(f"{tmp_path / 'my_nets.py'}:tiny", (6,), 2)(torch.zeros(1, 6)).shape == (1, 2)
    for spec, message in (("no_such_module_xyz:f", "cannot import"), ("my_nets:missing", "no callable"),
                          ("my_nets:NOT_CALLABLE", "no callable"), ("resnet", "unknown"),
                          (f"{tmp_path / 'none.py'}:f", "no file")):
        with pytest.raises(InputError, match=message):
            resolve_network(spec)


@pytest.mark.parametrize("kwargs, word", [({"width": 0}, "width=0"), ({"width": -1}, "width=-1"),
                                          ({"depth": 2.5}, "depth=2.5"), ({"width": True}, "width=True"),
                                          ({"num_classes": 0}, "num_classes=0")])
def test_bad_sizes_are_refused_by_name_before_any_layer_is_built(kwargs, word):
    args = {"num_classes": 3, **kwargs}
    for spec in ("fcn", "cnn", "sigmoid-mlp"):
        shape = (1, 8, 8) if spec == "cnn" else (13,)
        with pytest.raises(InputError, match=word.replace(".", r"\.")):
            build_network(spec, shape, **args)
