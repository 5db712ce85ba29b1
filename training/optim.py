"""MADGRAD (Defazio & Jelassi, 2021: "Adaptivity without Compromise"), the official optimizer,
with its usual update done by multi-tensor operations.

The madgrad package updates one parameter at a time: about 8 small operations for each of the
generator's ~120 parameter tensors, ~1000 kernel launches a step, which on a GPU cost more host
time than the arithmetic. `FastMADGRAD` does the same arithmetic, in the same order, with
`torch._foreach_*` operations over all parameters at once, and keeps the package's state layout,
so checkpoints written by either load into either. Per step k (from 0), for every parameter p
with gradient g, lr' = lr + eps and lambda = lr' sqrt(k + 1):

    g   <- g + weight_decay p                     (weight decay as in the package, not decoupled)
    nu  <- nu + lambda g^2;   s <- s + lambda g   (sums of squared and of plain gradients)
    z   =  x0 - s / (nu^(1/3) + eps)              (x0: the parameter's first value)
    p   <- momentum p + (1 - momentum) z
"""

import math

import madgrad
import torch


class FastMADGRAD(madgrad.MADGRAD):
    """madgrad.MADGRAD with the dense float32 update (momentum > 0, eps > 0) in foreach
    operations; every other case (sparse or half-precision gradients, momentum 0, eps 0, decoupled
    weight decay) runs the package's own step."""

    def _can_fuse(self) -> bool:
        for group in self.param_groups:
            if group["momentum"] == 0 or group["eps"] == 0 or group.get("decouple_decay", False):
                return False
            for p in group["params"]:
                if p.grad is not None and (p.grad.is_sparse or p.dtype != torch.float32 or p.grad.dtype != torch.float32):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._can_fuse():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "k" not in self.state:
            self.state["k"] = torch.tensor([0], dtype=torch.long)
        k = int(self.state["k"])
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            eps, decay, momentum = group["eps"], group["weight_decay"], group["momentum"]
            lr = group["lr"] + eps if group["lr"] != 0 else 0.0
            lamb = lr * math.pow(k + 1, 0.5)
            for p in params:
                state = self.state[p]
                if "grad_sum_sq" not in state:
                    state["grad_sum_sq"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                    state["x0"] = p.detach().clone()
            grad_sum_sq = [self.state[p]["grad_sum_sq"] for p in params]
            s = [self.state[p]["s"] for p in params]
            x0 = [self.state[p]["x0"] for p in params]
            grads = [p.grad for p in params]
            if decay != 0:
                grads = torch._foreach_add(grads, params, alpha=decay)
            torch._foreach_addcmul_(grad_sum_sq, grads, grads, value=lamb)
            rms = torch._foreach_pow(grad_sum_sq, 1 / 3)
            torch._foreach_add_(rms, eps)
            torch._foreach_add_(s, grads, alpha=lamb)
            z = torch._foreach_addcdiv(x0, s, rms, value=-1)
            ck = 1 - momentum
            torch._foreach_mul_(params, 1 - ck)  # p is a moving average of z
            torch._foreach_add_(params, z, alpha=ck)
        self.state["k"] += 1
        return loss
