"""The linear probe both diagnostics fit (standardised features, Adam 1e-2, 400 full-batch steps)."""
import torch
from torch import nn


def fit_linear_probe(X_fit: torch.Tensor, y_fit: torch.Tensor, num_classes: int, *others: torch.Tensor):
    """Standardise with the fit rows' statistics, fit a linear classifier on them; returns the probe
    and the standardised ``X_fit`` and ``others``."""
    mu, sd = X_fit.mean(0), X_fit.std(0) + 1e-6
    X_fit, others = (X_fit - mu) / sd, [(x - mu) / sd for x in others]
    lin = nn.Linear(X_fit.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(X_fit), y_fit).backward()
        opt.step()
    return lin, X_fit, *others
