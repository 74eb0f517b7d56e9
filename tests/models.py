"""Tiny deterministic base classifiers for exactness tests.

IntegerLinear reads each noised pixel back as its integer m = 4q * x~ (exact: x~ is the
float32 nearest m/(4q)) and scores classes with integer weights in float64, so every
logit is an exact integer: the argmax does not depend on batch size, chunking or BLAS.
"""
import torch


class IntegerLinear(torch.nn.Module):
    def __init__(self, dim, num_classes, q, seed=0, bias_scale=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = q
        self.register_buffer("weight", torch.randint(-3, 4, (dim, num_classes), generator=g).double())
        self.register_buffer("bias", torch.randint(-bias_scale * q, bias_scale * q + 1,
                                                   (num_classes,), generator=g).double())
        self.calls = []
        self.eval()

    def forward(self, x):
        self.calls.append(x.shape[0])
        m = torch.round(x.reshape(x.shape[0], -1).double() * (4 * self.q))
        return m @ self.weight + self.bias
