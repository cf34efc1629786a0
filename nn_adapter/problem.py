"""A torch network as an occore control problem (DDPNOpt, Liu et al. 2021, Sec. 2; E-MSA, Li et al. 2018).

Stage t of the network (see :mod:`nn_adapter.stages`) is the dynamics x_{t+1} = f_t(x_t, u_t);
the states are the activations of the whole batch (the batch axis is part of the state), the
controls are each stage's parameters (one dict per stage), the running cost is the weight decay
l_t(u_t) = weight_decay/2 |u_t|^2 and the terminal cost is the loss, Phi(x_T) = loss_fn(x_T, targets).
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from occore.errors import InputError, ShapeError
from occore.result import Result
from occore.types import Policy, Trajectory
from occore.validation import is_real

from .errors import DataDependentForwardError, DataError, DtypeError
from .local_model import DenseGains, ExactQ, NetworkLocalModel
from .stages import split_stages

logger = logging.getLogger("nn_adapter")

__all__ = ["NetworkProblem"]


def per_sample_rho(batch_size: int, scale: float = 1.0) -> float:
    """E-MSA's penalty weight ``scale`` per sample for a loss averaged over ``batch_size`` samples:
    scale / B (the Hamiltonian carries 1/B per sample, the feasibility terms do not).

    Example:
        >>> per_sample_rho(32)
        0.03125
    """
    return scale / batch_size


class NetworkProblem:
    """Full-batch training of ``model`` as a control problem (implements ``ControlProblem``).

    Args:
        model: an ``nn.Sequential`` or a list of stages (see :func:`nn_adapter.split_stages`);
            a chain: exact DDP needs each stage's input to be its state, which a skip connection
            between stages breaks (a residual block can be one stage; see :mod:`nn_adapter.stages`
            for why any model's hook-recorded stages, as DDPNOpt uses them, are not taken here);
            dropout and batch norm must be in eval mode. Never modified (until :meth:`load_into`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor`` (e.g. ``nn.CrossEntropyLoss()``),
            written with torch operations that ``torch.func`` can differentiate.
        inputs: (B, ...) the batch, B >= 1, finite; copied to the model's device (in its dtype).
            The states are differentiated, so x_0 = pre(inputs) must be floating point.
        targets: (B, ...) what ``loss_fn`` compares the outputs with, finite; copied likewise.
            For torch's classification losses (``CrossEntropyLoss``, ``NLLLoss``) integer class
            indices in [0, C) (or probabilities shaped like the outputs); for the regression
            losses (``MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``, ``BCELoss``,
            ``BCEWithLogitsLoss``) floats shaped exactly like the outputs (no broadcasting).
        weight_decay: wd >= 0 of the running cost wd/2 |u_t|^2 (torch's ``weight_decay``).
        memory_limit: bytes the DDP local model may use (None: no limit); beyond its estimate
            :meth:`local_model`'s backward pass raises :class:`nn_adapter.errors.MemoryLimitError`.
        value_hessian: "batch" (exact batched DDP) or "per_sample" (DDPNOpt's block-diagonal V_xx);
            see :mod:`nn_adapter.local_model`.

    Attributes:
        horizon: T, the number of stages.
        stages: the :class:`~nn_adapter.stages.Stage` list; ``pre`` the leading parameter-free
            modules.

    Every check runs before any solver work, on private copies: nothing passed is modified.

    Raises:
        UnsupportedModuleError: a module cannot be a stage (a ``TypeError``).
        DataDependentForwardError: a stage's forward branches on the values of its input (``if
            x.sum() > 0``, ``x.item()``): ``torch.func`` cannot differentiate it per sample; the
            module is named (an ``UnsupportedModuleError``).
        DtypeError: a model in another dtype than float32 or float64 (half precision), integer
            (non-floating) states x_0, or targets of a dtype the loss cannot take (a
            ``TypeError`` and an ``InputError``).
        DataError: an empty batch, NaN or inf in inputs or targets, class indices out of range
            (an ``InputError``).
        ShapeError: inputs the first stage cannot take, targets of another length, or targets
            shaped unlike the outputs for a loss that would broadcast them.
        InputError: a loss that is not a scalar or that fails on the outputs, or bad options.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
        >>> prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y)
        >>> traj = prob.rollout(prob.initial_controls())
        >>> prob.horizon, torch.equal(traj.xs[-1], net(x))
        (2, True)
    """

    inner_methods = ("lbfgs", "gradient")

    def __init__(self, model, loss_fn, inputs: Tensor, targets: Tensor, weight_decay: float = 0.0,
                 memory_limit: int | None = 2 ** 30, value_hessian: str = "batch"):
        self.pre, self.stages = split_stages(model)
        self.horizon = len(self.stages)
        first = next(iter(self.stages[0].param_dict().values()))
        self.dtype, self.device = first.dtype, first.device
        if self.dtype not in (torch.float32, torch.float64):
            raise DtypeError("model", "float32 or float64 parameters", self.dtype,
                             f"module {self.stages[0].name!r} ({type(self.stages[0].module).__name__}); "
                             "DDP's and iLQR's Cholesky solves have no half-precision kernel and "
                             "E-MSA's L-BFGS overflows in float16: convert the model, e.g. "
                             "model.float(); nn_adapter.DDPNOpt trains under torch.autocast")
        if not callable(loss_fn):
            raise InputError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        if not (_is_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise InputError(f"weight_decay={weight_decay!r}: expected a finite number >= 0")
        self.weight_decay = float(weight_decay)
        if memory_limit is not None and not (_is_number(memory_limit) and memory_limit > 0):
            raise InputError(f"memory_limit={memory_limit!r}: expected a positive number of bytes or None")
        self.memory_limit = memory_limit
        if not isinstance(value_hessian, str) or value_hessian not in ("batch", "per_sample"):
            raise InputError(f"value_hessian={value_hessian!r}: expected 'batch' or 'per_sample'")
        self.value_hessian = value_hessian
        self.inputs, self.targets = self._check_data(inputs, targets)
        self.batch_size = self.inputs.shape[0]
        self.x0 = self._pre(self.inputs)
        if not isinstance(self.x0, Tensor) or not self.x0.is_floating_point():
            first = self.stages[0]
            raise DtypeError("inputs", "floating-point states x_0 = pre(inputs) (the stages are "
                             "differentiated in them)",
                             getattr(self.x0, "dtype", type(self.x0).__name__),
                             f"x_0 goes into module {first.name!r} "
                             f"({type(first.module).__name__}); convert the inputs, e.g. "
                             "inputs.float(); index inputs (nn.Embedding) cannot be states")
        self._check_forward()
        logger.debug("%r", self)

    @property
    def emsa_rho(self) -> float:
        """E-MSA's default penalty weight on this problem (``occore.EMSA()`` with ``rho=None``):
        1/B for a loss averaged over the B samples (the Hamiltonian carries 1/B per sample, the
        feasibility terms do not, so rho = 1 per sample), 1 for a summed loss. Measured on WINE
        and DIGITS with B = 32-512, 20 iterations: of rho = 0.1/B, 1/B and
        10/B the best of the three in all six cases, while rho = 1 barely moves the loss
        (1.05 -> 0.74 on WINE; 1/B: 0.007)."""
        summed = getattr(self.loss_fn, "reduction", "mean") == "sum"
        return 1.0 if summed else per_sample_rho(self.batch_size)

    def __repr__(self) -> str:
        return (f"NetworkProblem(horizon={self.horizon}, batch={self.batch_size}, "
                f"controls={[s.numel for s in self.stages]}, stages={[s.names for s in self.stages]}, "
                f"weight_decay={self.weight_decay:g}, dtype={self.dtype}, device={self.device})")

    # -- validation ---------------------------------------------------------------------------
    def _check_data(self, inputs, targets):
        for name, v in (("inputs", inputs), ("targets", targets)):
            if not isinstance(v, Tensor):
                raise InputError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
            if v.dim() == 0:
                raise ShapeError(name, "(B, ...)", tuple(v.shape), "needs a batch axis")
            if v.is_complex():
                raise DtypeError(name, "a real dtype", v.dtype)
        if inputs.shape[0] == 0:
            raise DataError("inputs", f"the batch is empty (shape {tuple(inputs.shape)}); "
                            "a problem needs at least one sample")
        if inputs.shape[0] != targets.shape[0]:
            raise ShapeError("targets", f"({inputs.shape[0]}, ...) (one per input)",
                             tuple(targets.shape))
        # private copies (on the model's device, floating inputs in its dtype): trajectories and
        # results hand x_0 out, and nothing handed out may alias the user's tensors
        out = []
        for name, v in (("inputs", inputs), ("targets", targets)):
            dtype = self.dtype if v.is_floating_point() else v.dtype
            v = v.detach().to(device=self.device, dtype=dtype, copy=True)
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise DataError(name, "contains NaN or inf")
            out.append(v)
        return tuple(out)

    def _pre(self, x):
        with torch.no_grad():
            for module in self.pre:
                x = module(x)
        return x

    def _check_forward(self):
        """One forward pass and the loss: clear errors before any solver work."""
        x = self.x0
        with torch.no_grad():
            for stage in self.stages:
                try:
                    y = stage.forward(stage.param_dict(), x)
                except Exception as err:    # noqa: BLE001 - re-raised with the module named
                    _raise_for_module(stage, x, err)
                if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != self.batch_size:
                    raise ShapeError(f"stage {stage.index} output", f"({self.batch_size}, ...)",
                                     getattr(y, "shape", type(y).__name__),
                                     f"modules {stage.names} must keep the batch axis")
                _check_per_sample(stage, x)
                x = y
            _check_targets(self.loss_fn, x, self.targets)
            with warnings.catch_warnings():
                # torch warns (and broadcasts) when a regression target is shaped unlike the input
                warnings.filterwarnings("error", message=".*target size.*different to the input",
                                        category=UserWarning)
                try:
                    loss = self.loss_fn(x, self.targets)
                except UserWarning as err:
                    raise ShapeError("targets", tuple(x.shape), tuple(self.targets.shape),
                                     f"loss_fn would broadcast them: {err}") from None
                except InputError:      # already typed (nn_adapter.MMCLoss), naming its argument
                    raise
                except Exception as err:    # noqa: BLE001
                    raise InputError(f"loss_fn failed on outputs {tuple(x.shape)} and targets "
                                     f"{tuple(self.targets.shape)}: {err}") from err
        if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise InputError(f"loss_fn must return a scalar tensor (a 0-d tensor), got {shape}; "
                             "use reduction='mean' or 'sum'")

    def check_controls(self, us, name: str = "us") -> list:
        """``us`` checked as controls of this problem (a list of T parameter dicts shaped,
        typed and placed like the model's, with finite values); returns it (not copied).

        Raises:
            ShapeError: not a list of T dicts with the stages' keys, or a tensor of another shape.
            InputError: not tensors, another dtype or device, or NaN/inf values; each message
                names ``name`` and the entry, e.g. ``us0[1]['weight']``.
        """
        self._check_structure(us, name)
        bad = [(t, k) for t, u in enumerate(us) for k, v in u.items()
               if not bool(torch.isfinite(v).all())]
        if bad:
            t, k = bad[0]
            raise InputError(f"{name}[{t}][{k!r}]: contains NaN or inf")
        return us

    def _check_structure(self, us, name="us"):
        if not isinstance(us, (list, tuple)) or len(us) != self.horizon:
            raise ShapeError(name, f"a list of {self.horizon} parameter dicts",
                             f"{type(us).__name__} of length {len(us) if hasattr(us, '__len__') else '?'}")
        for stage, u in zip(self.stages, us):
            ref = stage.param_dict()
            if not isinstance(u, dict) or set(u) != set(ref):
                raise ShapeError(f"{name}[{stage.index}]", f"a dict with keys {sorted(ref)}",
                                 sorted(u) if isinstance(u, dict) else type(u).__name__)
            for k, v in ref.items():
                where = f"{name}[{stage.index}][{k!r}]"
                if not isinstance(u[k], Tensor):
                    raise InputError(f"{where}: expected a tensor, got {type(u[k]).__name__}")
                if tuple(u[k].shape) != tuple(v.shape):
                    raise ShapeError(where, tuple(v.shape), tuple(u[k].shape))
                if u[k].dtype != v.dtype or u[k].device != v.device:
                    raise InputError(f"{where}: expected dtype {v.dtype} on {v.device} (the model's), "
                                     f"got {u[k].dtype} on {u[k].device}")

    # -- the protocol -------------------------------------------------------------------------
    def initial_controls(self) -> list[dict[str, Tensor]]:
        """The model's current parameters, copied (one dict per stage)."""
        return [{k: v.detach().clone() for k, v in s.param_dict().items()} for s in self.stages]

    def _cost(self, xT, us):
        """J as a tensor: the loss plus wd/2 |u|^2."""
        cost = self.loss_fn(xT, self.targets)
        if self.weight_decay:
            reg = sum((v * v).sum() for u in us for v in u.values())
            cost = cost + 0.5 * self.weight_decay * reg
        return cost

    def rollout(self, us) -> Trajectory:
        """States x_0..x_T of controls ``us`` (list of T parameter dicts) and the cost."""
        self._check_structure(us)          # (non-finite controls: a non-finite cost, a Status)
        xs = [self.x0]
        with torch.no_grad():
            for stage, u in zip(self.stages, us):
                xs.append(stage.forward(u, xs[-1]))
            cost = float(self._cost(xs[-1], us).item())
        # own copies: a Result must not alias the caller's tensors
        return Trajectory(xs=xs, us=[{k: v.detach().clone() for k, v in u.items()} for u in us], cost=cost)

    def rollout_policy(self, ref: Trajectory, policy: Policy, alpha: float) -> Trajectory:
        """Layer-by-layer feedback pass u_t = ref.us_t + alpha k_t + K_t (x_t - ref.xs_t).

        ``policy.K[t]`` is an (m_t, B n_t) matrix, a callable of the flat dx_t, or None (no
        feedback)."""
        xs, us = [self.x0], []
        with torch.no_grad():
            for t, stage in enumerate(self.stages):
                K = policy.K[t]
                u = {k: v + alpha * policy.k[t][k] for k, v in ref.us[t].items()}
                if K is not None:                 # None: no feedback (K_0, x_0 being fixed)
                    dx = (xs[t] - ref.xs[t]).reshape(-1)
                    fb = self.unflatten(t, K(dx) if callable(K) else K @ dx)
                    u = {k: v + fb[k] for k, v in u.items()}
                us.append(u)
                xs.append(stage.forward(u, xs[t]))
            cost = float(self._cost(xs[-1], us).item())
        return Trajectory(xs=xs, us=us, cost=cost)

    def local_model(self, traj: Trajectory, second_order: bool = False) -> NetworkLocalModel:
        """The network local model at ``traj``: exact / Gauss-Newton batched DDP
        (:class:`~nn_adapter.local_model.ExactQ`, lazy) with dense gains."""
        return NetworkLocalModel(ExactQ(self, traj, self.value_hessian), DenseGains())

    # -- E-MSA extension ----------------------------------------------------------------------
    def hamiltonian_grad(self, traj: Trajectory, costates, rho: float, us):
        """Augmented Hamiltonians Ht_t(us_t) (T,) float64 and their gradients (parameter dicts)."""
        from .hamiltonian import hamiltonian_grad
        return hamiltonian_grad(self, traj, costates, rho, us)

    def maximize_hamiltonian(self, traj: Trajectory, costates, rho: float, inner):
        """New controls maximising every stage's augmented Hamiltonian (``inner.method`` "lbfgs"
        or "gradient"), from ``traj.us``."""
        from .hamiltonian import maximize_hamiltonian
        return maximize_hamiltonian(self, traj, costates, rho, inner)

    # -- helpers ------------------------------------------------------------------------------
    def unflatten(self, t: int, flat: Tensor) -> dict[str, Tensor]:
        """A flat (m_t,) vector as stage t's parameter dict (``param_names`` order)."""
        out, i = {}, 0
        for k, v in self.stages[t].param_dict().items():
            out[k] = flat[i:i + v.numel()].view(v.shape)
            i += v.numel()
        return out

    def load_into(self, model, us) -> None:
        """Copy controls ``us`` (a list of T parameter dicts, or a :class:`occore.Result` of this
        problem: its ``us``) into the parameters of ``model`` (same architecture), in place."""
        if isinstance(us, Result):
            us = us.us
        self.check_controls(us)
        _, stages = split_stages(model, check_mode=False)
        if [s.param_names for s in stages] != [s.param_names for s in self.stages]:
            raise ShapeError("model", f"stages with parameters {[s.param_names for s in self.stages]}",
                             [s.param_names for s in stages])
        for stage, u in zip(stages, us):
            for k, p in stage.param_dict().items():
                if p.shape != u[k].shape:
                    raise ShapeError(f"model stage {stage.index} {k!r}", tuple(u[k].shape), tuple(p.shape))
        with torch.no_grad():
            for stage, u in zip(stages, us):
                for k, p in stage.param_dict().items():
                    p.copy_(u[k])


def _raise_for_module(stage, x: Tensor, err: Exception) -> None:
    """The stage's forward on ``x`` raised ``err``: re-raise it as a ShapeError naming the module
    of the stage that fails (the head or one of its followers) and the input it was given.

    Raises:
        ShapeError: always.
    """
    y, failed, prev = x, None, None
    with torch.no_grad():
        for i, (name, module) in enumerate(zip(stage.names, stage.modules)):
            if not isinstance(y, Tensor):       # the module before returned a tuple, a dict...
                raise ShapeError(f"module {prev!r} output", "one tensor (the input of the next "
                                 f"module, {name!r} ({type(module).__name__}))",
                                 type(y).__name__, str(err)) from err
            try:
                y = stage.module_fn(stage.params, y) if i == 0 else module(y)
            except Exception as inner:      # noqa: BLE001 - this module is the one that fails
                failed, err = (name, module), inner
                break
            prev = name
    name, module = failed or (stage.name, stage.module)
    if failed is None or name == stage.name:
        what, y = ("inputs" if stage.index == 0 else f"stage {stage.index} input"), x
    else:
        what = f"module {name!r} input"
    raise ShapeError(what, f"what module {name!r} ({type(module).__name__}) accepts",
                     tuple(y.shape), str(err)) from err


def _is_number(value) -> bool:
    return is_real(value)


def _data_dependent(err: Exception) -> bool:
    text = str(err)
    return "data-dependent control flow" in text or ".item()" in text


def _check_per_sample(stage, x: Tensor) -> None:
    """Run ``stage`` under ``torch.func.vmap`` on one sample, as the local model does: a forward
    that branches on tensor values (``if``, ``.item()``, ``bool()``) cannot run there.

    Other failures under ``vmap`` are left to the solver that meets them: DDP and iLQR raise
    UnsupportedModuleError naming the stage's modules (E-MSA does not vmap).

    Raises:
        DataDependentForwardError: naming the first such module of the stage.
    """
    params = stage.param_dict()
    try:
        vmap(lambda xi: stage.forward(params, xi[None])[0])(x[:1])
        return
    except RuntimeError as err:
        if not _data_dependent(err):
            logger.debug("stage %d does not run under vmap: %s", stage.index, err)
            return
    culprit = f"stage {stage.index} (modules {list(stage.names)})"
    y = x[:1]
    for i, (name, module) in enumerate(zip(stage.names, stage.modules)):
        def call(z, module=module, head=i == 0):
            return functional_call(module, params, (z,)) if head else module(z)
        try:
            vmap(lambda yi: call(yi[None])[0])(y)
        except RuntimeError as err:
            if _data_dependent(err):
                culprit = f"module {name!r} ({type(module).__name__})"
            break
        y = call(y)
    raise DataDependentForwardError(
        f"{culprit}: its forward branches on the values of its input (a Python if/while on a "
        "tensor, .item(), bool() or float() of a tensor), which torch.func cannot differentiate "
        "per sample; write it with tensor operations (torch.where, torch.clamp, masks)")


_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss,
                      nn.BCEWithLogitsLoss)


def _check_targets(loss_fn, outputs: Tensor, targets: Tensor) -> None:
    """Targets that torch's own losses would refuse deep inside, or silently broadcast.

    Raises:
        DtypeError, ShapeError, DataError: naming ``targets``.
    """
    if isinstance(loss_fn, _INDEX_LOSSES):
        if targets.is_floating_point():                     # class probabilities
            if targets.shape != outputs.shape:
                raise ShapeError("targets", f"{tuple(outputs.shape)} (class probabilities shaped "
                                 "like the outputs) or integer class indices",
                                 tuple(targets.shape))
            return
        if targets.dtype == torch.bool:
            raise DtypeError("targets", f"integer class indices for {type(loss_fn).__name__}",
                             targets.dtype)
        want = outputs.shape[:1] + outputs.shape[2:]
        if outputs.dim() < 2 or targets.shape != want:
            raise ShapeError("targets", f"{tuple(want)} (one class index per sample)",
                             tuple(targets.shape))
        classes = outputs.shape[1]
        valid = targets != loss_fn.ignore_index
        kept = targets[valid]
        if kept.numel() and not bool(((kept >= 0) & (kept < classes)).all()):
            raise DataError("targets", f"class indices must lie in [0, {classes}) (the outputs' "
                            f"second axis), got {int(kept.min())}..{int(kept.max())}")
    elif isinstance(loss_fn, _REGRESSION_LOSSES):
        if not targets.is_floating_point():
            raise DtypeError("targets", f"floating-point targets for {type(loss_fn).__name__}",
                             targets.dtype, "convert them, e.g. targets.float()")
        if targets.shape != outputs.shape:
            raise ShapeError("targets", tuple(outputs.shape), tuple(targets.shape),
                             f"{type(loss_fn).__name__} would broadcast them; the outputs' shape")
