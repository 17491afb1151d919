import pytest
import torch

from tensorfold import functional as F
from tensorfold.errors import ImplementationError, ShapeError
from tensorfold.formats import get_format


@pytest.mark.parametrize("implementation", F.IMPLEMENTATIONS)
def test_functional_tt_matches_dense(implementation):
    g = torch.Generator().manual_seed(0)
    cores = [
        torch.randn(1, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 1, generator=g, dtype=torch.float64),
    ]
    network = get_format("tt").network_for(2, 1)  # out modes (3, 4), in mode (5,)
    weight = (cores[0].reshape(3, 2) @ cores[1].reshape(2, 12)).reshape(12, 3) @ cores[2].reshape(
        3, 5
    )
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(12, generator=g, dtype=torch.float64)
    got = F.factorized_linear(x, cores, network, bias, implementation)
    torch.testing.assert_close(got, x @ weight.T + bias)
    torch.testing.assert_close(F.reconstruct_weight(cores, network), weight)


def test_functional_errors():
    cores = [torch.randn(1, 3, 2), torch.randn(2, 5, 1)]
    network = get_format("tt").network_for(1, 1)
    with pytest.raises(
        ShapeError, match="input has last dimension 4, but the layer has in_features=5"
    ):
        F.factorized_linear(torch.randn(2, 4), cores, network)
    with pytest.raises(ImplementationError, match="implementation='fastest' is not one of"):
        F.factorized_linear(torch.randn(2, 5), cores, network, implementation="fastest")
