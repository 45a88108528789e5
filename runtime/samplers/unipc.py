"""UniPC for flow matching: the default Wan 2.2 sampler (official `FlowUniPCMultistepScheduler`
with solver_order 2, "bh2", data prediction, lower_order_final, no disabled corrector).

UniPC (Zhao et al. 2023, arXiv:2302.04867) in the data-prediction form. With
alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_next - lambda_now and
B(h) = expm1(-h) ("bh2"), one step k does:

1. x0_k = x_k - sigma_k * v_k (the model predicts the flow noise - x0).
2. UniC corrector (k >= 1): re-derive x_k from x_{k-1} with x0_{k-1}, x0_k (and x0_{k-2}
   when the previous predictor was of order 2). The model is not evaluated again.
3. UniP predictor of order p (1 at the first and the last step, else 2):
   x_{k+1} = (sigma'/sigma) x_k - alpha' expm1(-h) x0_k - alpha' B(h) * 0.5 * D1,
   D1 = (x0_{k-1} - x0_k) / r, r = (lambda_{k-1} - lambda_k) / h.
At the last step sigma' = 0, so lambda' = +inf and expm1(-inf) = -1: the update is x0_k.
"""
from __future__ import annotations

import torch

from .base import FlowSampler, log_snr
from .schedules import unipc_schedule


class UniPCSampler(FlowSampler):
    name = "unipc"

    def __init__(self, steps: int, shift: float):
        super().__init__(unipc_schedule(steps, shift), shift)

    def reset(self) -> None:
        super().reset()
        self._x0: list[torch.Tensor] = []  # the last two data predictions, newest last
        self._last_sample: torch.Tensor | None = None  # input of the last predictor
        self.corrected_sample: torch.Tensor | None = None  # sample the last predictor started from

    def _step(self, v: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[k] * v
        if k > 0:
            x = self._correct(x0, k, x)
        self._x0 = (self._x0 + [x0])[-2:]
        order = min(2, self.steps - k, len(self.orders) + 1)
        self.orders.append(order)
        self._last_sample = x
        self.corrected_sample = x
        return self._predict(x, k, order)

    def _predict(self, x: torch.Tensor, k: int, order: int) -> torch.Tensor:
        """UniP-order: from x at sigmas[k] to sigmas[k + 1]."""
        s, s_next = self.sigmas[k], self.sigmas[k + 1]
        alpha_next = 1 - s_next
        lam = log_snr(s)
        h = log_snr(s_next) - lam
        b_h = torch.expm1(-h)  # also h*phi_1(-h): the two coincide for "bh2"
        x_next = s_next / s * x - alpha_next * b_h * self._x0[-1]
        if order == 2:
            r = (log_snr(self.sigmas[k - 1]) - lam) / h
            d1 = (self._x0[-2] - self._x0[-1]) / r
            x_next = x_next - alpha_next * b_h * (0.5 * d1)
        return x_next

    def _correct(self, x0_new: torch.Tensor, k: int, x_pred: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last step (sigmas[k-1] -> sigmas[k]) with x0_new included."""
        order = self.orders[-1]
        s_prev, s = self.sigmas[k - 1], self.sigmas[k]
        alpha = 1 - s
        lam_prev = log_snr(s_prev)
        h = log_snr(s) - lam_prev
        hh = -h
        b_h = torch.expm1(hh)
        m0 = self._x0[-1]
        base = s / s_prev * self._last_sample - alpha * b_h * m0
        d1_t = x0_new - m0
        if order == 1:
            return base - alpha * b_h * (0.5 * d1_t)
        # Order 2: coefficients rho solve [[1, 1], [r, 1]] rho = [g1, g2] with
        # g_n = n! * phi_{n+1}(hh) / B(h) built by the recursion phi_{n+1} = phi_n / hh - 1/n!.
        phi = b_h / hh - 1
        g1 = phi / b_h
        phi = phi / hh - 0.5
        g2 = phi * 2 / b_h
        r = (log_snr(self.sigmas[k - 2]) - lam_prev) / h
        rho0 = (g1 - g2) / (1 - r)
        rho1 = g1 - rho0
        d1 = (self._x0[-2] - m0) / r
        return base - alpha * b_h * (rho0 * d1 + rho1 * d1_t)
