import pytest
import torch
from torch import nn

from freeshap_dq.ntk.factors import FactorStore, NotFactorable, factor_sites


class Toy(nn.Module):
    """Every factor rule: word + position embeddings (position ids broadcast as (1, L)), a layer norm,
    a linear layer applied twice (shared weights), an RMS-norm-free tanh block, mean pooling, a linear head."""

    def __init__(self, vocab=11, hidden=6, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(vocab, hidden, padding_idx=0)
        self.positions = nn.Embedding(16, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.scale = nn.Parameter(torch.randn(hidden))  # no factor rule: left to vmap
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids, mask):
        positions = torch.arange(ids.shape[1])[None]
        h = self.norm(self.words(ids) + self.positions(positions))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h)))) * self.scale
        keep = (mask > 0).float()[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def per_example_gradient(model, name, ids, mask, c):
    param = dict(model.named_parameters())[name]
    param.requires_grad_(True)
    try:
        return torch.autograd.grad(model(ids[None], mask[None])[0, c], param)[0].reshape(-1)
    finally:
        param.requires_grad_(False)


@pytest.fixture
def toy():
    model = Toy()
    model.requires_grad_(False)
    ids = torch.tensor([[3, 4, 0, 0], [5, 5, 6, 7], [2, 0, 0, 0]])  # 0 = padding
    mask = (ids > 0).long()
    ids[0, 2] = 9  # a padded position holding a real id: its gradient must not count
    return model, ids, mask


def test_sites_cover_every_rule_and_leave_the_rest(toy):
    model, _, _ = toy
    names = [n for n, _ in model.named_parameters()]
    sites = factor_sites(model, names)
    assert set(names) - set(sites) == {"scale"}
    assert {site.rule for site, _ in sites.values()} == {"embedding", "norm", "linear"}


@pytest.mark.parametrize("lo_hi", [None, (5, 17)])  # whole tensors, and slices that start and end mid-row
def test_factored_pieces_equal_autograd_per_example_gradients(toy, lo_hi):
    model, ids, mask = toy
    names = [n for n, _ in model.named_parameters() if n != "scale"]
    store = FactorStore(model, factor_sites(model, names))
    store.collect(model, ids, mask, classes=[0, 2])
    assert store.nbytes > 0
    assert set(store.sites) == set(names)  # the position table too, though its lookup is broadcast over the batch
    for name in store.sites:
        size = dict(model.named_parameters())[name].numel()
        lo, hi = lo_hi if lo_hi and lo_hi[1] <= size else (0, size)
        for ci, c in enumerate([0, 2]):
            wide = torch.full((len(ids), hi - lo + 7), float("nan"))  # written through a strided view
            store.piece(0, name, ci, lo, hi, out=wide[:, 3:3 + hi - lo])
            assert wide[:, :3].isnan().all() and wide[:, 3 + hi - lo:].isnan().all()
            pieces = wide[:, 3:3 + hi - lo]
            for b in range(len(ids)):
                keep = mask[b] > 0
                expected = per_example_gradient(model, name, ids[b][keep], mask[b][keep], c)[lo:hi]
                torch.testing.assert_close(pieces[b], expected, rtol=1e-5, atol=1e-6, msg=f"{name} class {c}")


def test_a_module_applied_across_examples_is_left_to_vmap(toy):
    model, ids, mask = toy

    class Mixing(nn.Module):  # the shared layer sees the batch flattened: examples are not its leading axis
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            h = self.inner.words(ids)
            return self.inner.head(self.inner.shared(h.reshape(-1, h.shape[-1])).reshape(*h.shape).mean(1))

    mixing = Mixing(model)
    store = FactorStore(mixing, factor_sites(mixing, ["inner.shared.weight", "inner.head.weight"]))
    store.collect(mixing, ids, mask, classes=[0])
    assert list(store.sites) == ["inner.head.weight"]
    with pytest.raises(NotFactorable, match="changed shape"):  # fit on the first batch, not on a later one
        store.sites = factor_sites(mixing, ["inner.shared.weight"])
        store.collect(mixing, ids, mask, classes=[0])
