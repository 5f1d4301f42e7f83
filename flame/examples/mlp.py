"""A two-layer MLP and its mean-squared-error loss: flame-compile's built-in default.

    flame-compile flame/examples/mlp.py:loss --arg x:f32[32,4] --arg y:f32[32,1] --grad
"""
import flame.nn as nn
import flame.nn.functional as F


class MLP(nn.Module):
    """Linear 4->8, SiLU, Linear 8->1."""

    def __init__(self, d_in=4, d_hidden=8, d_out=1):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = F.silu(self.fc1(x))
        return self.fc2(h)


model = MLP()   # the weights `loss` reads; traced, they are the graph's @p inputs


def loss(x, y):
    """The training objective: mean squared error of the model's prediction."""
    return F.mse_loss(model(x), y)
