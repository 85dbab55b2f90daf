"""The probes the diagnostics fit: a linear classifier (standardised features, Adam 1e-2, 400
full-batch steps) and a ridge regression."""
import torch
from torch import nn


def standardise(X_fit: torch.Tensor, *others: torch.Tensor):
    """``X_fit`` and ``others`` standardised with the fit rows' mean and standard deviation."""
    mu, sd = X_fit.mean(0), X_fit.std(0) + 1e-6
    return (X_fit - mu) / sd, [(x - mu) / sd for x in others]


def fit_ridge(X_fit: torch.Tensor, Y_fit: torch.Tensor, X_test: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    """Ridge regression (standardised features + bias, float64) fitted on the fit rows; returns
    its predictions for ``X_test``."""
    X_fit, (X_test,) = standardise(X_fit, X_test)
    A = torch.cat([X_fit, torch.ones(len(X_fit), 1)], 1).double()
    W = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ Y_fit.double())
    return torch.cat([X_test, torch.ones(len(X_test), 1)], 1).double() @ W


def fit_linear_probe(X_fit: torch.Tensor, y_fit: torch.Tensor, num_classes: int, *others: torch.Tensor):
    """Standardise with the fit rows' statistics, fit a linear classifier on them; returns the probe
    and the standardised ``X_fit`` and ``others``."""
    X_fit, others = standardise(X_fit, *others)
    lin = nn.Linear(X_fit.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(X_fit), y_fit).backward()
        opt.step()
    return lin, X_fit, *others
